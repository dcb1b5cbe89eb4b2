"""The checked kernel launcher (gpucnn/cuda/loader.py) and the kernel sanitizer runs.

The launcher's checks -- dtype, contiguity, int32 scalars, arity, the grid it
computes, one build per file with a ``#line`` directive -- are tested with a
fake module builder that records launches: no emulator, no GPU.  The
sanitizer tests run every kernel under ASan/UBSan (guard zones poisoned) and
the shared-memory reductions under TSan, on the CPU emulator.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest

from backends import CUDASIM_ERROR as _CUDASIM_ERROR, cudasim
from cases import CONV_CASES
from gpucnn.cuda import loader, ops

TESTS = pathlib.Path(__file__).resolve().parent


def _conv_arrays(case, dtype, seed=0):
    return case.arrays(dtype, seed)


# ---------------------------------------------------------------------------
# The checked launcher, with a fake module builder (no emulator needed)
# ---------------------------------------------------------------------------

class _Recorder:
    """Module builder whose kernels record their launches and do nothing."""

    def __init__(self):
        self.launches = []
        self.builds = []

    def __call__(self, code, name, options):
        self.builds.append((name, options, code))
        recorder = self

        class Module:
            def get_function(self, kernel):
                def fn(grid, block, args, shared_mem=0):
                    recorder.launches.append((kernel, grid, block, args))
                return fn
        return Module()


@pytest.fixture
def fake():
    rec = _Recorder()
    with loader.use_module_builder(rec):
        yield rec


def _all_ops_once():
    x, W, b, dy = _conv_arrays(CONV_CASES[2], np.float32)
    s, p = CONV_CASES[2].stride, CONV_CASES[2].padding
    ops.conv2d_forward(x, W, b, s, p)
    ops.conv2d_forward(x, W, None, s, p)
    ops.conv2d_backward_input(dy, W, x.shape, s, p)
    ops.conv2d_backward_weight(x, dy, W.shape, s, p)
    xp = np.zeros((2, 3, 7, 7), np.float32)
    y, arg = ops.maxpool2d_forward(xp, 3, 2)
    arg[...] = 0
    ops.maxpool2d_backward(y, arg, xp.shape, (3, 3), (2, 2))


def test_launcher_passes_only_numpy_int32_scalars(fake):
    _all_ops_once()
    names = [k for k, *_ in fake.launches]
    assert names == ["conv2d_forward", "conv2d_forward", "conv2d_backward_input",
                     "conv2d_backward_weight", "conv2d_backward_bias",
                     "maxpool2d_forward", "maxpool2d_backward"]
    for kernel, grid, block, args in fake.launches:
        params = loader.kernel_signature(kernel)
        assert len(args) == len(params)
        for p, a in zip(params, args):
            if p.is_array:
                assert isinstance(a, np.ndarray) and a.dtype == p.dtype and a.flags.c_contiguous
            else:
                assert type(a) is np.int32, f"{kernel}.{p.name} got {type(a).__name__}"
        assert all(type(g) is int for g in grid) and all(type(b) is int for b in block)


def test_launcher_computes_grid(fake):
    _all_ops_once()
    by_name = {}
    for kernel, grid, block, args in fake.launches:
        by_name.setdefault(kernel, (grid, block, args))
    grid, block, args = by_name["conv2d_forward"]
    y = args[3]
    assert block == (256, 1, 1) and grid == (math.ceil(y.size / 256), 1, 1)
    grid, block, args = by_name["conv2d_backward_weight"]
    assert grid == (args[2].size, 1, 1)                      # one block per weight
    assert block[0] in (32, 64, 128, 256) and block[1:] == (1, 1)
    grid, block, args = by_name["conv2d_backward_bias"]
    assert grid == (args[1].size, 1, 1)                      # one block per channel
    grid, block, args = by_name["maxpool2d_backward"]
    assert grid == (math.ceil(args[2].size / 256), 1, 1)


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


def test_launcher_rejects_float64_for_float32_kernel(fake):
    x, W, b, _ = _conv_arrays(CONV_CASES[0], np.float32)
    y = np.empty((1, 1, 3, 3), np.float32)
    with pytest.raises(TypeError, match="float64"):
        loader.launch("conv2d_forward", (x.astype(np.float64), W, b, y, 1, 1, 5, 5, 1, 3, 3,
                                         3, 3, 1, 1, 0, 0, 1), n_threads=y.size)
    assert fake.launches == []


def test_ops_reject_unsupported_dtypes(fake):
    x, W, b, dy = _conv_arrays(CONV_CASES[0], np.float32)
    with pytest.raises(TypeError, match=r"float16.*float32, float64"):
        ops.conv2d_forward(x.astype(np.float16), W, b, 1, 0)
    with pytest.raises(TypeError, match="int64"):
        ops.maxpool2d_forward(x.astype(np.int64), 2, 2)
    with pytest.raises(TypeError, match="share one dtype"):
        ops.conv2d_forward(x, W.astype(np.float64), b, 1, 0)
    with pytest.raises(TypeError, match="argmax has dtype int64"):
        ops.maxpool2d_backward(np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 1, 2, 2), np.int64),
                               (1, 1, 5, 5), 2, 2)
    assert fake.launches == []


def test_launcher_rejects_non_contiguous(fake):
    x = np.zeros((1, 1, 5, 10), np.float32)[:, :, :, ::2]
    W = np.zeros((1, 1, 3, 3), np.float32)
    y = np.empty((1, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        loader.launch("conv2d_forward", (x, W, W, y, 1, 1, 5, 5, 1, 3, 3, 3, 3, 1, 1, 0, 0, 0),
                      n_threads=y.size)
    assert fake.launches == []


def test_launcher_rejects_bad_scalars_and_arity(fake):
    W = np.zeros((1, 1, 3, 3), np.float32)
    y = np.empty((1, 1, 3, 3), np.float32)
    args = [W, W, W, y, 1, 1, 5, 5, 1, 3, 3, 3, 3, 1, 1, 0, 0, 0]
    with pytest.raises(OverflowError, match="int32"):
        loader.launch("conv2d_forward", args[:4] + [2**31] + args[5:], n_threads=9)
    with pytest.raises(TypeError, match="integer"):
        loader.launch("conv2d_forward", args[:4] + [1.5] + args[5:], n_threads=9)
    with pytest.raises(TypeError, match="takes 18 arguments"):
        loader.launch("conv2d_forward", args[:-1], n_threads=9)
    with pytest.raises(TypeError, match="needs a numpy/cupy array"):
        loader.launch("conv2d_forward", [W.tolist()] + args[1:], n_threads=9)
    with pytest.raises(ValueError, match="exactly one"):
        loader.launch("conv2d_forward", args)
    assert fake.launches == []


def test_ops_shape_errors(fake):
    x, W, b, dy = _conv_arrays(CONV_CASES[1], np.float32)
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d_forward(x[:, :2].copy(), W, b, 1, 1)
    with pytest.raises(ValueError, match="bias"):
        ops.conv2d_forward(x, W, b[:2].copy(), 1, 1)
    with pytest.raises(ValueError, match="dy has shape"):
        ops.conv2d_backward_input(dy[:, :, :-1].copy(), W, x.shape, 1, 1)
    with pytest.raises(ValueError, match="dy has shape"):
        ops.conv2d_backward_weight(x, dy[:1].copy(), W.shape, 1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        ops.conv2d_forward(x, np.zeros((3, 3, 11, 3), np.float32), b, 1, 0)
    with pytest.raises(ValueError, match="4-D"):
        ops.maxpool2d_forward(x[0], 2, 2)
    with pytest.raises(ValueError, match="larger than"):
        ops.maxpool2d_forward(x, (8, 2), 1)
    with pytest.raises(ValueError, match="stride"):
        ops.maxpool2d_forward(x, 2, 0)
    assert fake.launches == []


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


# ---------------------------------------------------------------------------
# Sanitizers: every kernel under ASan (guard zones poisoned: any out-of-range
# read or write aborts), the shared-memory reductions under TSan (a missing
# __syncthreads is a data race).  ~40 s, so marked slow.
# ---------------------------------------------------------------------------

_SANITIZER_PROBE = r"""
import numpy as np, cudasim
from gpucnn.cuda import loader, ops
from cases import CONV_CASES, POOL_CASES
with loader.use_module_builder(lambda c, n, o: cudasim.load_module(code=c, name=n, options=o)):
    for case in [c for c in CONV_CASES if not c.big][:{n_conv}]:
        x, W, b, dy = case.arrays(np.float32)
        s, p = case.stride, case.padding
        if {all_kernels}:
            ops.conv2d_forward(x, W, b, s, p)
            ops.conv2d_backward_input(dy, W, x.shape, s, p)
        ops.conv2d_backward_weight(x, dy, W.shape, s, p)
    for N, C, H, W, k, s, *_ in ([c for c in POOL_CASES if not c.big] if {all_kernels} else []):
        x = np.random.default_rng(0).standard_normal((N, C, H, W)).astype(np.float32)
        y, a = ops.maxpool2d_forward(x, k, s)
        ops.maxpool2d_backward(y, a, x.shape, k, s)
print("SANITIZED-OK")
"""


@pytest.mark.slow
@pytest.mark.cudasim
@pytest.mark.parametrize("sanitize, n_conv, all_kernels", [("address", len(CONV_CASES), True),
                                                          ("thread", 3, False)])
def test_kernels_clean_under_sanitizers(sanitize, n_conv, all_kernels):
    if cudasim is None:
        pytest.skip(_CUDASIM_ERROR)
    if not cudasim.sanitizer_available(sanitize):
        pytest.skip(f"g++ has no {sanitize} sanitizer runtime")
    import os
    code = _SANITIZER_PROBE.format(n_conv=n_conv, all_kernels=all_kernels)
    paths = [str(TESTS.parent), str(TESTS)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    result = cudasim.run_sanitized(["-c", code], sanitize, env=env)
    assert result.returncode == 0 and "SANITIZED-OK" in result.stdout, (
        f"{sanitize} sanitizer run failed (rc {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}")
