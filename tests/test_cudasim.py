"""Tests of the test-only CUDA emulator (tests/cudasim).

``test_kernel_*`` tests use only correct kernels; the sanitizer tests re-run exactly
those in a subprocess under ASan+UBSan and under TSan and require them clean.
"""
import os
import textwrap
import time

import numpy as np
import pytest

import cudasim
from cudasim import CompileError, CudaSimError, OutOfBoundsWrite, load_module

pytestmark = pytest.mark.cudasim
IN_SANITIZER = bool(os.environ.get("GPUCNN_CUDASIM_SANITIZE"))

CLEAN = r"""
extern "C" __global__ void saxpy(const float* __restrict__ x, float* __restrict__ y, float a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}

extern "C" __global__ void daxpy(const double* x, double* y, double a, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = fma(a, x[i], y[i]);
}

extern "C" __global__ void shift_read(const float* x, float* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = i + 1 < n ? x[i + 1] : 0.0f;
}

// out[z][y][x] = 100*z + 10*y + x over an (nz, ny, nx) volume, 3-D grid and block.
extern "C" __global__ void index3d(float* out, int nx, int ny, int nz) {
  unsigned x = blockIdx.x * blockDim.x + threadIdx.x;
  unsigned y = blockIdx.y * blockDim.y + threadIdx.y;
  unsigned z = blockIdx.z * blockDim.z + threadIdx.z;
  if (x < (unsigned)nx && y < (unsigned)ny && z < (unsigned)nz)
    out[(z * ny + y) * nx + x] = 100.0f * z + 10.0f * y + x;
}

// One partial sum per block (blockDim.x must be a power of two <= 256).
extern "C" __global__ void __launch_bounds__(256) block_sum(const float* x, float* out, int n) {
  __shared__ float s[256];
  int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  s[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k >>= 1) {
    if (t < k) s[t] += s[t + k];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Same with dynamic shared memory (shared_mem = blockDim.x * sizeof(float)).
extern "C" __global__ void block_sum_dyn(const float* x, float* out, int n) {
  extern __shared__ float s[];
  int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  s[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k >>= 1) {
    if (t < k) s[t] += s[t + k];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

__device__ __forceinline__ float warp_allsum(float v) {
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Every element gets its warp's total; the grand total goes through atomicAdd.
extern "C" __global__ void warp_sums(const float* x, float* per_elem, float* total, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? x[i] : 0.0f;
  float w = warp_allsum(v);
  float d = v;
  for (int o = 16; o > 0; o >>= 1) d += __shfl_down_sync(0xffffffffu, d, o);
  if (i < n) per_elem[i] = w;
  if ((threadIdx.x & 31) == 0) atomicAdd(total, d);
}

// out (cols x rows) = in (rows x cols)^T through an 8x8 shared tile; 2-D grid and block.
extern "C" __global__ void transpose(const float* in, float* out, int rows, int cols) {
  __shared__ __align__(16) float tile[8][8 + 1], unused;  /* __shared__ in a comment */
  int c = blockIdx.x * 8 + threadIdx.x, r = blockIdx.y * 8 + threadIdx.y;
  if (r < rows && c < cols) tile[threadIdx.y][threadIdx.x] = in[r * cols + c];
  __syncthreads();
  c = blockIdx.y * 8 + threadIdx.x; r = blockIdx.x * 8 + threadIdx.y;
  if (r < cols && c < rows) out[r * rows + c] = tile[threadIdx.x][threadIdx.y];
}

extern "C" __global__ void histogram(const int* bins, int* hist, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    atomicAdd(&hist[bins[i]], 1);
}
"""

BUGGY = r"""
extern "C" __global__ void saxpy_noguard(const float* x, float* y, float a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  y[i] = a * x[i] + y[i];                        // BUG: no `if (i < n)`
}

extern "C" __global__ void shift_read_oob(const float* x, float* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i + 1];                  // BUG: reads x[n]
}

extern "C" __global__ void block_sum_nosync(const float* x, float* out, int n) {
  __shared__ float s[256];
  int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  s[t] = i < n ? x[i] : 0.0f;
  // BUG: missing __syncthreads() here
  for (int k = blockDim.x / 2; k > 0; k >>= 1) {
    if (t < k) s[t] += s[t + k];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

extern "C" __global__ void writes_const(const float* x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) ((float*)x)[i] = 0.0f;              // BUG: casts away const
}

extern "C" __global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) __syncthreads();         // BUG: barrier in divergent code:
  else __syncwarp();                             // the two halves wait for each other
  out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void dyn_overflow(float* out) {
  extern __shared__ float s[];
  s[threadIdx.x + 1] = 1.0f;                     // BUG: one past shared_mem
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}
"""


@pytest.fixture(scope="module")
def clean():
    return load_module(code=CLEAN, name="clean_kernels.cu")


@pytest.fixture(scope="module")
def buggy():
    return load_module(code=BUGGY, name="buggy_kernels.cu")


def rng():
    return np.random.default_rng(0)


# ------------------------------------------------------------ correct kernels
def test_kernel_saxpy_tail(clean):
    n = 1000  # not a multiple of the block size
    x, y = rng().standard_normal((2, n), dtype=np.float32)
    y0 = y.copy()
    clean.get_function("saxpy")(((n + 255) // 256,), (256,), (x, y, np.float32(2.5), np.int32(n)))
    np.testing.assert_allclose(y, 2.5 * x + y0, rtol=1e-6)


def test_kernel_daxpy_double_and_long_long(clean):
    n = 77
    x, y = rng().standard_normal((2, n))
    y0 = y.copy()
    clean.get_function("daxpy")(3, 32, (x, y, np.float64(-1.5), np.int64(n)))
    np.testing.assert_allclose(y, -1.5 * x + y0, rtol=1e-12)


def test_kernel_shift_read(clean):
    x = np.arange(10, dtype=np.float32)
    out = np.full(10, -1.0, np.float32)
    clean.get_function("shift_read")(2, 8, (x, out, np.int32(10)))
    np.testing.assert_array_equal(out, np.r_[x[1:], 0.0])


def test_kernel_index3d_multidim(clean):
    nz, ny, nx = 5, 7, 9
    out = np.zeros((nz, ny, nx), np.float32)
    block = (4, 2, 3)
    grid = tuple(-(-s // b) for s, b in zip((nx, ny, nz), block))  # (3, 4, 2): none exact
    clean.get_function("index3d")(grid, block, (out, np.int32(nx), np.int32(ny), np.int32(nz)))
    z, y, x = np.indices(out.shape)
    np.testing.assert_array_equal(out, 100 * z + 10 * y + x)


@pytest.mark.parametrize("kernel", ["block_sum", "block_sum_dyn"])
def test_kernel_block_sum(clean, kernel):
    n, bs = 300, 128
    x = rng().standard_normal(n, dtype=np.float32)
    nb = -(-n // bs)
    out = np.zeros(nb, np.float32)
    fn = clean.get_function(kernel)
    assert fn.threaded
    fn(nb, bs, (x, out, np.int32(n)), shared_mem=bs * 4 if kernel.endswith("dyn") else 0)
    expect = [x[i * bs:(i + 1) * bs].sum() for i in range(nb)]
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)


def test_kernel_warp_shuffles_and_atomic_float(clean):
    n = 150
    x = rng().integers(-8, 8, n).astype(np.float32)  # integers: exact in any order
    per_elem = np.zeros(n, np.float32)
    total = np.zeros(1, np.float32)
    fn = clean.get_function("warp_sums")
    assert fn.threaded  # found through the __device__ helper and directly
    fn(3, 64, (x, per_elem, total, np.int32(n)))
    padded = np.r_[x, np.zeros(192 - n, np.float32)].reshape(-1, 32).sum(1)
    np.testing.assert_array_equal(per_elem, np.repeat(padded, 32)[:n])
    assert total[0] == x.sum()


def test_kernel_transpose_shared_tile(clean):
    a = rng().standard_normal((13, 10), dtype=np.float32)
    out = np.zeros((10, 13), np.float32)
    clean.get_function("transpose")((2, 2), (8, 8), (a, out, np.int32(13), np.int32(10)))
    np.testing.assert_array_equal(out, a.T)


@pytest.mark.parametrize("threaded", [False, True])
def test_kernel_histogram_atomics(clean, threaded):
    n = 500
    bins = rng().integers(0, 10, n).astype(np.int32)
    hist = np.zeros(10, np.int32)
    fn = clean.get_function("histogram")
    assert not fn.threaded
    fn(2, 64, (bins, hist, np.int32(n)), threaded=threaded)  # grid-stride loop
    np.testing.assert_array_equal(hist, np.bincount(bins, minlength=10))


# ------------------------------------------------------------ argument checks
def test_python_int_rejected(clean):
    x, y = np.zeros((2, 8), np.float32)
    with pytest.raises(TypeError, match=r"saxpy.*args\[3\] 'n' \(C type int\).*numpy.int32.*Python int"):
        clean.get_function("saxpy")(1, 8, (x, y, np.float32(1), 8))
    with pytest.raises(TypeError, match=r"args\[2\] 'a' \(C type float\).*numpy.float32.*Python float"):
        clean.get_function("saxpy")(1, 8, (x, y, 1.0, np.int32(8)))
    with pytest.raises(TypeError, match=r"args\[2\] 'a'.*numpy.float32.*float64"):
        clean.get_function("saxpy")(1, 8, (x, y, np.float64(1), np.int32(8)))


def test_array_dtype_contiguity_writability(clean):
    fn = clean.get_function("saxpy")
    x, y = np.zeros((2, 8), np.float32)
    with pytest.raises(TypeError, match=r"args\[0\] 'x' \(C type const float\*\) needs a float32 array, got dtype float64"):
        fn(1, 8, (x.astype(np.float64), y, np.float32(1), np.int32(8)))
    with pytest.raises(TypeError, match=r"args\[1\] 'y'.*C-contiguous"):
        fn(1, 8, (x, np.zeros(16, np.float32)[::2], np.float32(1), np.int32(8)))
    with pytest.raises(TypeError, match=r"args\[1\] 'y'.*read-only"):
        ro = y.copy()
        ro.flags.writeable = False
        fn(1, 8, (x, ro, np.float32(1), np.int32(8)))
    with pytest.raises(TypeError, match=r"args\[0\] 'x'.*numpy array.*list"):
        fn(1, 8, ([0.0] * 8, y, np.float32(1), np.int32(8)))


def test_wrong_count_and_bad_launch_config(clean):
    fn = clean.get_function("saxpy")
    x, y = np.zeros((2, 8), np.float32)
    with pytest.raises(TypeError, match=r"saxpy' takes 4 arguments .*const float\* x.*got 3"):
        fn(1, 8, (x, y, np.float32(1)))
    with pytest.raises(CudaSimError, match="more than 1024 threads"):
        fn(1, (64, 32), (x, y, np.float32(1), np.int32(8)))
    with pytest.raises(CudaSimError, match="invalid grid"):
        fn((0,), 8, (x, y, np.float32(1), np.int32(8)))
    with pytest.raises(CudaSimError, match="no __global__ kernel 'nope'.*saxpy"):
        clean.get_function("nope")


def test_sync_in_serial_mode_is_an_error():
    mod = load_module(code=CLEAN, name="clean_kernels.cu", threaded=False)
    out = np.zeros(1, np.float32)
    with pytest.raises(CudaSimError, match=r"__syncthreads\(\) called by a kernel running in serial mode"):
        mod.get_function("block_sum")(1, 32, (np.zeros(32, np.float32), out, np.int32(32)))


# ------------------------------------------------------------ planted bugs
def test_bug_missing_tail_guard_hits_canary(buggy, clean):
    n = 1000
    x, y = np.ones((2, n), np.float32)
    with pytest.raises(OutOfBoundsWrite, match=r"saxpy_noguard.*args\[1\] 'y'.*after its end.*element index 1000"):
        buggy.get_function("saxpy_noguard")(4, 256, (x, y, np.float32(1), np.int32(n)))
    y = np.ones(n, np.float32)
    clean.get_function("saxpy")(4, 256, (x, y, np.float32(1), np.int32(n)))  # the fixed kernel is fine
    assert np.all(y == 2)


def test_bug_out_of_range_read_gives_nan(buggy, clean):
    x = np.arange(10, dtype=np.float32)
    out = np.zeros(10, np.float32)
    buggy.get_function("shift_read_oob")(1, 16, (x, out, np.int32(10)))
    assert np.isnan(out[-1]) and not np.isnan(out[:-1]).any()
    clean.get_function("shift_read")(1, 16, (x, out, np.int32(10)))
    assert not np.isnan(out).any()


def test_bug_missing_syncthreads_reads_nan_shared(buggy):
    n, bs = 512, 256
    x = np.ones(n, np.float32)
    out = np.zeros(2, np.float32)
    buggy.get_function("block_sum_nosync")(2, bs, (x, out, np.int32(n)))
    assert not np.array_equal(out, [bs, bs])  # a partner slot still held the NaN fill
    # the fixed kernel with the same launch: see test_kernel_block_sum


def test_bug_write_through_const_and_shared_overflow(buggy):
    x = np.ones(8, np.float32)
    with pytest.raises(OutOfBoundsWrite, match=r"args\[0\] 'x'.*modified through a const pointer"):
        buggy.get_function("writes_const")(1, 8, (x, np.int32(8)))
    with pytest.raises(CudaSimError, match="past the end of dynamic shared memory"):
        buggy.get_function("dyn_overflow")(1, 8, (np.zeros(8, np.float32),), shared_mem=32)


def test_bug_divergent_barrier_times_out(buggy, monkeypatch):
    monkeypatch.setenv("GPUCNN_CUDASIM_BARRIER_TIMEOUT", "1")
    with pytest.raises(CudaSimError, match="deadlock: not every thread reached the barrier"):
        buggy.get_function("divergent_barrier")(1, 32, (np.zeros(32, np.float32),))


# ------------------------------------------------------------ build & cache
def test_compile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCNN_CUDASIM_CACHE", str(tmp_path))
    src = 'extern "C" __global__ void fill(float* y, float v) { y[threadIdx.x] = v; }'
    before = dict(cudasim.stats)
    load_module(code=src, name="fill.cu")
    assert cudasim.stats["compiles"] == before["compiles"] + 1
    cudasim._memo.clear()  # forget the in-process copy: the .so comes from the disk cache
    t = time.perf_counter()
    mod = load_module(code=src, name="fill.cu")
    assert time.perf_counter() - t < 0.5
    assert cudasim.stats["compiles"] == before["compiles"] + 1
    assert cudasim.stats["disk_hits"] == before["disk_hits"] + 1
    load_module(code=src, name="fill.cu")
    assert cudasim.stats["memory_hits"] == before["memory_hits"] + 1
    y = np.zeros(4, np.float32)
    mod.get_function("fill")(1, 4, (y, np.float32(3)))
    assert np.all(y == 3)


def test_compile_error_names_real_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCNN_CUDASIM_CACHE", str(tmp_path))
    src = '#line 40 "kernels/fake.cu"\nextern "C" __global__ void k(float* y) {\n  y[0] = undeclared;\n}\n'
    with pytest.raises(CompileError, match=r"kernels/fake\.cu:41:.*undeclared"):
        load_module(code=src, name="fake.cu")


@pytest.mark.skipif(IN_SANITIZER, reason="already inside a sanitizer run")
def test_sanitized_module_needs_runtime():
    with pytest.raises(CudaSimError, match="run_sanitized"):
        load_module(code=CLEAN, sanitize="address")


# ------------------------------------------------------------ sanitizer subprocesses
def _needs(sanitize):
    if IN_SANITIZER:
        pytest.skip("already inside a sanitizer run")
    if not cudasim.sanitizer_available(sanitize):
        pytest.skip(f"{cudasim.SAN_LIB[sanitize]} not found by g++ -print-file-name")


def _script(body):
    return ["-c", "import numpy as np\nfrom cudasim import load_module\nimport test_cudasim as T\n"
            + textwrap.dedent(body)]


@pytest.mark.parametrize("sanitize", ["address", "thread"])
def test_clean_kernels_under_sanitizer(sanitize):
    _needs(sanitize)
    r = cudasim.run_sanitized(["-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_kernel_"],
                              sanitize)
    report = r.stdout[-3000:] + r.stderr[-5000:]
    assert r.returncode == 0, report
    assert "passed" in r.stdout and "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, report


def test_asan_catches_out_of_range_read():
    _needs("address")
    r = cudasim.run_sanitized(_script("""
        m = load_module(code=T.BUGGY, name="buggy_kernels.cu")
        x = np.arange(10, dtype=np.float32); out = np.zeros(10, np.float32)
        m.get_function("shift_read_oob")(1, 16, (x, out, np.int32(10)))
        print("NOT CAUGHT")
    """), "address")
    assert r.returncode != 0 and "NOT CAUGHT" not in r.stdout, r.stdout + r.stderr
    assert "ERROR: AddressSanitizer: use-after-poison" in r.stderr, r.stderr[-4000:]
    assert "READ of size 4" in r.stderr and "buggy_kernels.cu:9" in r.stderr, r.stderr[-4000:]


def test_tsan_catches_missing_syncthreads():
    _needs("thread")
    r = cudasim.run_sanitized(_script("""
        m = load_module(code=T.BUGGY, name="buggy_kernels.cu")
        x = np.ones(64, np.float32); out = np.zeros(1, np.float32)
        m.get_function("block_sum_nosync")(1, 64, (x, out, np.int32(64)))
        print("NOT CAUGHT")
    """), "thread")
    assert r.returncode != 0 and "NOT CAUGHT" not in r.stdout, r.stdout + r.stderr
    assert "WARNING: ThreadSanitizer: data race" in r.stderr and "buggy_kernels.cu:1" in r.stderr, r.stderr[-4000:]
