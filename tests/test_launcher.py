"""The checked kernel launcher (gpucnn/cuda/loader.py) and the kernel sanitizer runs.

The launcher's checks -- dtype, contiguity, exact scalar types, arity, the
grid it computes, one build per file with a ``#line`` directive -- are
tested with a fake module builder that records launches: no emulator, no
GPU.  (Every kernel's own parity, launch shapes and sanitizer runs are in
tests/test_kernels_conv.py and tests/test_kernels_step.py.)
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from backends import recording_fixture
from cases import CONV_CASES
from gpucnn.cuda import loader



def _conv_arrays(case, dtype, seed=0):
    return case.arrays(dtype, seed)


# ---------------------------------------------------------------------------
# The checked launcher, with a fake module builder (no emulator needed)
# ---------------------------------------------------------------------------

fake = recording_fixture()


def _all_ops_once():
    """One call of every kind of launch: n_threads (act_backward), explicit grids (conv, pool)."""
    from gpucnn.cuda import conv, elementwise, pool

    case = CONV_CASES[2]
    x, W, b, dy = _conv_arrays(case, np.float32)
    x, dy = (np.ascontiguousarray(np.moveaxis(a, 0, -1)) for a in (x, dy))   # batch-last
    s, p = case.stride, case.padding
    conv.conv_forward(x, W, b, s, p)
    conv.conv_backward_input(dy, W, x.shape, s, p)
    conv.conv_backward_weight(x, dy, W.shape, s, p)
    elementwise.act_backward(dy, dy, "relu")
    xp = np.zeros((3, 7, 7, 2), np.float32)
    y, tap, _ = pool.max_pool_forward(xp, (3, 3), (2, 2))
    pool.max_pool_backward(y, tap, None, xp.shape, (3, 3), (2, 2))


def test_launcher_passes_only_exact_numpy_scalars(fake):
    _all_ops_once()
    names = [k for k, *_ in fake.launches]
    assert names == ["conv_forward", "conv_backward_input", "conv_backward_weight_partial",
                     "conv_backward_weight_reduce", "act_backward", "pool_max_forward", "pool_max_backward"]
    for kernel, grid, block, args in fake.launches:
        params = loader.kernel_signature(kernel)
        assert len(args) == len(params)
        for p, a in zip(params, args):
            if p.is_array:
                assert isinstance(a, np.ndarray) and a.dtype == p.dtype and a.flags.c_contiguous
            else:
                assert type(a) is p.dtype.type, f"{kernel}.{p.name} got {type(a).__name__}"
        assert all(type(g) is int for g in grid) and all(type(b) is int for b in block)


def test_launcher_computes_one_dimensional_grids(fake):
    dy = np.zeros(1000, np.float32)
    from gpucnn.cuda import elementwise

    elementwise.act_backward(dy, dy, "sigmoid")
    kernel, grid, block, args = fake.launches[-1]
    assert block == (256, 1, 1) and grid == (math.ceil(1000 / 256), 1, 1)
    loader.launch("act_backward", (dy, dy, np.empty_like(dy), 1000, 2), n_threads=1000, block=64)
    assert fake.launches[-1][1:3] == ((16, 1, 1), (64, 1, 1))
    loader.launch("act_backward", (dy, dy, np.empty_like(dy), 1000, 2), grid=(3, 2), block=(8, 4))
    assert fake.launches[-1][1:3] == ((3, 2, 1), (8, 4, 1))
    n = len(fake.launches)
    loader.launch("act_backward", (dy, dy, np.empty_like(dy), 0, 2), n_threads=0)
    assert len(fake.launches) == n          # an empty launch is a no-op


def test_launcher_builds_each_file_once_with_line_directive(fake):
    _all_ops_once()
    _all_ops_once()
    built = [name for name, _, _ in fake.builds]
    launched_files = {loader.kernel_file_of(k) for k, *_ in fake.launches}
    assert sorted(built) == sorted(launched_files)               # each file built once, on first use
    assert set(built) <= set(loader.KERNEL_FILES)
    for name, options, code in fake.builds:
        assert code.startswith(f'#line 1 "kernels/{name}"\n')
        assert options == loader.DEFAULT_OPTIONS


def _act_args(dtype=np.float32, n=9):
    a = np.zeros(n, dtype)
    return [a, a, np.empty_like(a), n, 1]


def test_launcher_rejects_float64_for_float32_kernel(fake):
    args = _act_args()
    args[0] = args[0].astype(np.float64)
    with pytest.raises(TypeError, match="dy must be float32 .*got dtype float64"):
        loader.launch("act_backward", args, n_threads=9)
    assert fake.launches == []


def test_launcher_rejects_non_contiguous_and_read_only(fake):
    args = _act_args(n=18)
    args[0] = args[0][::2]
    args[3] = 9
    with pytest.raises(ValueError, match="C-contiguous"):
        loader.launch("act_backward", args, n_threads=9)
    args = _act_args()
    args[2].flags.writeable = False
    with pytest.raises(ValueError, match="output parameter dz is read-only"):
        loader.launch("act_backward", args, n_threads=9)
    assert fake.launches == []


def test_launcher_rejects_bad_scalars_and_arity(fake):
    args = _act_args()
    with pytest.raises(OverflowError, match="int32"):
        loader.launch("act_backward", args[:3] + [2**31, 1], n_threads=9)
    with pytest.raises(TypeError, match="integer"):
        loader.launch("act_backward", args[:3] + [1.5, 1], n_threads=9)
    with pytest.raises(TypeError, match="takes 5 arguments"):
        loader.launch("act_backward", args[:-1], n_threads=9)
    with pytest.raises(TypeError, match="needs a numpy/cupy array"):
        loader.launch("act_backward", [args[0].tolist()] + args[1:], n_threads=9)
    with pytest.raises(ValueError, match="exactly one"):
        loader.launch("act_backward", args)
    with pytest.raises(ValueError, match="1 to 1024 threads"):
        loader.launch("act_backward", args, grid=1, block=(64, 32))
    with pytest.raises(ValueError, match="shared_mem"):
        loader.launch("act_backward", args, grid=1, block=32, shared_mem=1 << 30)
    assert fake.launches == []


@pytest.mark.parametrize("grid, block, message", [
    ((1, 65536, 1), 32, r"gridDim\.y = 65536 \(grid \(1, 65536, 1\)\) exceeds CUDA's limit of 65535"),
    ((1, 1, 65536), 32, r"gridDim\.z = 65536 .*limit of 65535"),
    ((2**31, 1, 1), 1, r"gridDim\.x = 2147483648 .*limit of 2147483647"),
    (1, (1025, 1, 1), r"blockDim\.x = 1025 .*1\.\.1024"),
    (1, (1, 1025, 1), r"blockDim\.y = 1025 .*1\.\.1024"),
    (1, (1, 1, 65), r"blockDim\.z = 65 .*1\.\.64"),
    (1, (0, 4, 1), r"blockDim\.x = 0 "),
    (1, (64, 32, 1), r"block \(64, 32, 1\) has 2048 threads; CUDA allows 1 to 1024 threads per block"),
])
def test_launcher_refuses_shapes_past_cuda_limits(fake, grid, block, message):
    """A planted bad grid or block is refused before any launch, naming the kernel, the
    dimension, its value and the limit (CUDA would fail it, or the kernel would index past it)."""
    args = _act_args()
    with pytest.raises(ValueError, match=r"^act_backward: " + message):
        loader.launch("act_backward", args, grid=grid, block=block)
    assert fake.launches == []
    loader.launch("act_backward", args, grid=(1, 65535, 1), block=(1, 1, 64))    # at the limits
    loader.launch("act_backward", args, grid=(1, 1, 65535), block=(1024, 1, 1))
    assert [g for _, g, _, _ in fake.launches] == [(1, 65535, 1), (1, 1, 65535)]


def test_launcher_refuses_blocks_past_the_kernels_launch_bounds(fake):
    """dense_backward_act is compiled with __launch_bounds__(DBA_MAX_BLOCK), #define'd 256."""
    assert loader.kernel_launch_bounds("dense_backward_act") == 256
    a = np.zeros((2, 3), np.float32)
    args = (a, a, np.empty_like(a), np.empty(2, np.float32), 2, 3, 0, 1)
    with pytest.raises(ValueError, match=r"dense_backward_act: block \(512, 1, 1\) has 512 threads, more "
                                         r"than the __launch_bounds__\(256\) it is compiled with \(kernels/dense\.cu\)"):
        loader.launch("dense_backward_act", args, n_blocks=2, block=512)
    loader.launch("dense_backward_act", args, n_blocks=2, block=256)
    assert len(fake.launches) == 1


def test_launch_bounds_parsed_from_sources(monkeypatch):
    from gpucnn.cuda import sources

    assert loader.kernel_launch_bounds("conv_backward_input_f64") == 64       # (64, 1): the threads
    assert loader.kernel_launch_bounds("act_backward") is None
    text = ('#define B 128\n'
            'extern "C" __global__ void __launch_bounds__(B) k1(int n) {}\n'
            'extern "C" __global__ void __launch_bounds__(32, 2) k2(int n) {}\n'
            'extern "C" __global__ void k3(int n) {}\n'
            'extern "C" __global__ __launch_bounds__(64) void k4(int n) {}\n')
    monkeypatch.setattr(sources, "read_source", lambda filename: text)
    assert sources._parse_launch_bounds("x.cu") == {"k1": 128, "k2": 32, "k4": 64}
    monkeypatch.setattr(sources, "read_source", lambda filename: text.replace("(B)", "(2 * B)"))
    with pytest.raises(ValueError, match=r"kernels/x\.cu: cannot read the threads of k1's __launch_bounds__\(2 \* B\)"):
        sources._parse_launch_bounds("x.cu")


def test_launch_checks_are_cached_per_shape_but_arrays_checked_every_call(fake):
    args = _act_args()
    loader.launch("act_backward", args, n_threads=9)
    bad = list(args)
    bad[1] = bad[1].astype(np.float64)          # same scalars and shape: the cached entry must not skip this
    with pytest.raises(TypeError, match="saved must be float32"):
        loader.launch("act_backward", bad, n_threads=9)
    assert len(fake.launches) == 1


def test_signatures_parsed_from_sources():
    for filename, kernels in loader.KERNEL_FILES.items():
        for kernel in kernels:
            params = loader.kernel_signature(kernel)
            assert params and all(p.dtype in (np.float32, np.float64, np.int32, np.uint8) for p in params)
            want = np.float64 if kernel.endswith("_f64") else np.float32
            floats = {p.dtype for p in params if p.is_array and p.dtype.kind == "f"}
            assert floats <= {np.dtype(want)}, f"{kernel} mixes float widths: {floats}"


def test_default_builder_without_cupy_raises_clearly():
    from gpucnn import backend
    if backend.cupy is not None:
        pytest.skip("CuPy is installed here")
    loader.clear_cache()
    with pytest.raises(loader.CudaUnavailableError, match="CuPy"):
        loader.warmup()


def test_sync_check_does_not_outlive_the_block_that_set_it(monkeypatch):
    """tests/backends.py sets GPUCNN_CUDA_SYNC_CHECK for a CuPy test inside use_module_builder;
    the monkeypatch is undone only after the block, so the block itself must put the flag back
    (left on, it synced inside every later CUDA-graph capture of the process)."""
    assert not loader._sync_check_enabled()
    monkeypatch.setenv(loader.SYNC_CHECK_ENV, "1")
    with loader.use_module_builder(lambda code, name, options: None):
        assert loader._sync_check_enabled()
    assert not loader._sync_check_enabled()


def test_a_source_tree_compiles_its_own_kernels_over_an_installed_package(monkeypatch, tmp_path):
    """A checkout run with PYTHONPATH=. must not pick up the kernels/ of another checkout that is
    installed in editable mode (which maps gpucnn.kernels there): that loaded stale kernels."""
    import importlib.resources
    from pathlib import Path

    from gpucnn.cuda import sources

    other = tmp_path / "other-checkout" / "kernels"
    other.mkdir(parents=True)
    (other / "stale.cu").write_text('extern "C" __global__ void stale() {}\n')
    real_files = importlib.resources.files
    monkeypatch.setattr(importlib.resources, "files",
                        lambda name: other if name == "gpucnn.kernels" else real_files(name))
    assert sources.kernel_dir() == Path(sources.__file__).resolve().parents[2] / "kernels"
