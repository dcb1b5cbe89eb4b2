"""The CUDA kernels, on two backends through one parametrized fixture, ``device``:

* ``cudasim`` (marker ``cudasim``): the unchanged ``.cu`` sources run on the
  CPU by the tests/cudasim emulator, on NumPy arrays;
* ``cupy`` (marker ``gpu``): the same kernels compiled by CuPy (NVRTC) and run
  on a real CUDA GPU, on CuPy arrays; skipped, with the reason, unless
  ``gpucnn.backend.cuda_available()``.  Launches synchronize after each kernel
  (``GPUCNN_CUDA_SYNC_CHECK=1``) so a fault names the launch that caused it.

The test bodies are shared: inputs are built with NumPy, moved with
``device.put`` and results brought back with ``device.get`` (which also checks
that the result lives on the backend's device).  ``pytest -m cudasim`` runs the
emulator half, ``pytest -m gpu`` the GPU half.

Every kernel is compared with
  * an independent NumPy reference written here (float64, loops over kernel
    offsets only: a scatter formulation for the backward passes, so it shares
    no index algebra with the gather kernels), and
  * the library's own NumPy layer path (gpucnn.layers.Conv2D / MaxPool2D),
by calling gpucnn.cuda.ops on the backend's arrays.  Shapes are small:
threaded emulated blocks (the backward-weight reduction) cost ~100 us per
CUDA thread.

The launcher's checks (dtype, contiguity, int32 scalars, grid) are tested
with a fake module builder that records launches; those need neither the
emulator nor a GPU and run on the CPU only.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest

from gpucnn.cuda import loader, ops
from kernel_backends import BACKENDS, CUDASIM_ERROR as _CUDASIM_ERROR, cudasim, kernel_backend

TESTS = pathlib.Path(__file__).resolve().parent

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


# ---------------------------------------------------------------------------
# The backend fixture: emulator (NumPy arrays) or CuPy (GPU arrays); shared
# with tests/test_softmax_xent_sim.py through tests/kernel_backends.py
# ---------------------------------------------------------------------------

@pytest.fixture(params=BACKENDS)
def device(request, monkeypatch):
    """Run the kernels on the emulator or on the GPU, for one test."""
    with kernel_backend(request, monkeypatch) as dev:
        yield dev


# ---------------------------------------------------------------------------
# Independent NumPy references (float64)
# ---------------------------------------------------------------------------

def _out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def _taps(a, u, v, sh, sw, oh, ow):
    """a[:, :, u + i*sh, v + j*sw] for i < oh, j < ow (a is already padded)."""
    return a[:, :, u:u + sh * (oh - 1) + 1:sh, v:v + sw * (ow - 1) + 1:sw]


def ref_conv_forward(x, W, b, stride, padding):
    (sh, sw), (ph, pw) = stride, padding
    N, C, H, Wd = x.shape
    O, _, KH, KW = W.shape
    OH, OW = _out(H, KH, sh, ph), _out(Wd, KW, sw, pw)
    xpad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = np.zeros((N, O, OH, OW))
    for u in range(KH):
        for v in range(KW):
            y += np.einsum("nchw,oc->nohw", _taps(xpad, u, v, sh, sw, OH, OW), W[:, :, u, v].astype(np.float64))
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def ref_conv_backward_input(dy, W, x_shape, stride, padding):
    """Scatter: every (output, tap) pair adds dy * W to the input it read."""
    (sh, sw), (ph, pw) = stride, padding
    N, C, H, Wd = x_shape
    O, _, KH, KW = W.shape
    OH, OW = dy.shape[2:]
    dxpad = np.zeros((N, C, H + 2 * ph, Wd + 2 * pw))
    for u in range(KH):
        for v in range(KW):
            _taps(dxpad, u, v, sh, sw, OH, OW)[...] += np.einsum(
                "nohw,oc->nchw", dy.astype(np.float64), W[:, :, u, v].astype(np.float64))
    return dxpad[:, :, ph:ph + H, pw:pw + Wd]


def ref_conv_backward_weight(x, dy, w_shape, stride, padding):
    (sh, sw), (ph, pw) = stride, padding
    O, C, KH, KW = w_shape
    OH, OW = dy.shape[2:]
    xpad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dW = np.zeros(w_shape)
    for u in range(KH):
        for v in range(KW):
            dW[:, :, u, v] = np.einsum("nohw,nchw->oc", dy.astype(np.float64),
                                       _taps(xpad, u, v, sh, sw, OH, OW))
    return dW, dy.astype(np.float64).sum(axis=(0, 2, 3))


def ref_maxpool_forward(x, kernel, stride):
    """Explicit windows; numpy.argmax gives the first maximum (first NaN)."""
    (kh, kw), (sh, sw) = kernel, stride
    N, C, H, W = x.shape
    OH, OW = (H - kh) // sh + 1, (W - kw) // sw + 1
    y = np.empty((N, C, OH, OW), x.dtype)
    arg = np.empty((N, C, OH, OW), np.int32)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    win = x[n, c, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    k = int(np.argmax(win))  # row-major, first max, NaN wins
                    u, v = divmod(k, kw)
                    y[n, c, i, j] = win[u, v]
                    arg[n, c, i, j] = (i * sh + u) * W + (j * sw + v)
    return y, arg


def ref_maxpool_backward(dy, arg, x_shape):
    N, C, H, W = x_shape
    dx = np.zeros((N * C, H * W))
    planes = np.repeat(np.arange(N * C), dy[0, 0].size)
    np.add.at(dx, (planes, arg.reshape(-1)), dy.reshape(-1).astype(np.float64))
    return dx.reshape(x_shape)


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------

# (N, C, H, W, O, KH, KW, stride, padding, bias)
CONV_CASES = [
    (1, 1, 5, 5, 1, 3, 3, (1, 1), (0, 0), True),       # batch 1, smallest
    (2, 3, 7, 9, 3, 3, 3, (1, 1), (1, 1), True),       # "same" conv, > 256 outputs (2 blocks)
    (2, 2, 8, 7, 3, 3, 2, (2, 1), (1, 0), True),       # non-square kernel, mixed stride
    (1, 3, 9, 8, 2, 2, 3, (3, 2), (2, 1), False),      # stride 3, padding 2, no bias
    (2, 2, 6, 6, 2, 1, 1, (3, 3), (0, 0), True),       # 1x1 kernel, stride > kernel: gaps
    (2, 1, 5, 6, 2, 5, 4, (1, 2), (2, 2), True),       # kernel as big as the image
    (1, 2, 7, 7, 3, 4, 4, (2, 3), (1, 2), False),      # even kernel, odd strides
]


def _ids(cases):
    return ["N{}C{}H{}W{}-O{}K{}x{}-s{}-p{}-{}".format(*c[:7], "".join(map(str, c[7])),
                                                       "".join(map(str, c[8])), "b" if c[9] else "nob")
            for c in cases]


def _conv_arrays(case, dtype, seed=0):
    N, C, H, W, O, KH, KW, stride, padding, bias = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    Wt = rng.standard_normal((O, C, KH, KW)).astype(dtype)
    b = rng.standard_normal(O).astype(dtype) if bias else None
    OH, OW = _out(H, KH, stride[0], padding[0]), _out(W, KW, stride[1], padding[1])
    dy = rng.standard_normal((N, O, OH, OW)).astype(dtype)
    return x, Wt, b, dy


# (N, C, H, W, kernel, stride)
POOL_CASES = [
    (1, 1, 4, 4, (2, 2), (2, 2)),     # batch 1, classic 2x2
    (2, 3, 7, 7, (3, 3), (2, 2)),     # overlapping windows
    (2, 2, 9, 8, (3, 2), (1, 2)),     # non-square, stride 1 rows: heavy overlap
    (1, 2, 9, 9, (2, 2), (3, 3)),     # stride > kernel: gaps get 0
    (2, 3, 8, 9, (3, 3), (3, 2)),     # floor output size drops a border
    (2, 2, 5, 5, (5, 5), (1, 1)),     # one window per plane
    (1, 3, 9, 9, (1, 1), (1, 1)),     # identity pooling
]


def _pool_ids(cases):
    return ["N{}C{}H{}W{}-k{}{}-s{}{}".format(*c[:4], *c[4], *c[5]) for c in cases]


# ---------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", CONV_CASES, ids=_ids(CONV_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_forward(case, dtype, device):
    x, W, b, _ = _conv_arrays(case, dtype)
    stride, padding = case[7], case[8]
    y = ops.conv2d_forward(device.put(x), device.put(W), None if b is None else device.put(b),
                           stride, padding)
    assert y.dtype == dtype and y.flags.c_contiguous
    np.testing.assert_allclose(device.get(y), ref_conv_forward(x, W, b, stride, padding), **TOL[dtype])


@pytest.mark.parametrize("case", CONV_CASES, ids=_ids(CONV_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_backward_input(case, dtype, device):
    x, W, _, dy = _conv_arrays(case, dtype)
    stride, padding = case[7], case[8]
    dx = ops.conv2d_backward_input(device.put(dy), device.put(W), x.shape, stride, padding)
    assert dx.shape == x.shape and dx.dtype == dtype
    np.testing.assert_allclose(device.get(dx), ref_conv_backward_input(dy, W, x.shape, stride, padding),
                               **TOL[dtype])


@pytest.mark.parametrize("case", CONV_CASES, ids=_ids(CONV_CASES))
@pytest.mark.parametrize("method", ["kernel", "gemm"])
def test_conv2d_backward_weight(case, method, device):
    x, W, _, dy = _conv_arrays(case, np.float32)
    stride, padding = case[7], case[8]
    dW, db = ops.conv2d_backward_weight(device.put(x), device.put(dy), W.shape, stride, padding,
                                        method=method)
    ref_dW, ref_db = ref_conv_backward_weight(x, dy, W.shape, stride, padding)
    assert dW.shape == W.shape and dW.dtype == np.float32 and db.dtype == np.float32
    np.testing.assert_allclose(device.get(dW), ref_dW, **TOL[np.float32])
    np.testing.assert_allclose(device.get(db), ref_db, **TOL[np.float32])


@pytest.mark.parametrize("case", CONV_CASES[1:3], ids=_ids(CONV_CASES[1:3]))
def test_conv2d_backward_weight_f64(case, device):
    x, W, _, dy = _conv_arrays(case, np.float64)
    stride, padding = case[7], case[8]
    dW, db = ops.conv2d_backward_weight(device.put(x), device.put(dy), W.shape, stride, padding)
    ref_dW, ref_db = ref_conv_backward_weight(x, dy, W.shape, stride, padding)
    np.testing.assert_allclose(device.get(dW), ref_dW, **TOL[np.float64])
    np.testing.assert_allclose(device.get(db), ref_db, **TOL[np.float64])


def test_conv2d_backward_weight_long_reduction(device):
    """N*OH*OW > 256: every thread of a full 256-thread block sums several terms."""
    case = (2, 1, 12, 12, 1, 2, 2, (1, 1), (1, 1), True)   # 2*13*13 = 338 terms
    x, W, _, dy = _conv_arrays(case, np.float32, seed=3)
    dW, db = ops.conv2d_backward_weight(device.put(x), device.put(dy), W.shape, (1, 1), (1, 1))
    ref_dW, ref_db = ref_conv_backward_weight(x, dy, W.shape, (1, 1), (1, 1))
    np.testing.assert_allclose(device.get(dW), ref_dW, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(device.get(db), ref_db, rtol=1e-5, atol=1e-4)


def test_conv_kernels_deterministic(device):
    """Same inputs, same bits: the kernels use no atomics (a determinism check, not accuracy)."""
    x, W, b, dy = (device.put(a) for a in _conv_arrays(CONV_CASES[2], np.float32, seed=7))
    s, p = CONV_CASES[2][7], CONV_CASES[2][8]
    first = (ops.conv2d_forward(x, W, b, s, p), ops.conv2d_backward_input(dy, W, x.shape, s, p),
             *ops.conv2d_backward_weight(x, dy, W.shape, s, p))
    second = (ops.conv2d_forward(x, W, b, s, p), ops.conv2d_backward_input(dy, W, x.shape, s, p),
              *ops.conv2d_backward_weight(x, dy, W.shape, s, p))
    for a, c in zip(first, second):
        assert device.get(a).tobytes() == device.get(c).tobytes()


def test_conv_accepts_non_contiguous_inputs(device):
    """ops copies views to C order itself; the launcher only ever sees contiguous arrays."""
    x, W, b, dy = _conv_arrays(CONV_CASES[1], np.float32)
    xt = device.xp.asfortranarray(device.put(x))
    assert not xt.flags.c_contiguous
    y = ops.conv2d_forward(xt, device.put(W), device.put(b), (1, 1), (1, 1))
    np.testing.assert_allclose(device.get(y), ref_conv_forward(x, W, b, (1, 1), (1, 1)), **TOL[np.float32])


# ---------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", POOL_CASES, ids=_pool_ids(POOL_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_maxpool2d(case, dtype, device):
    N, C, H, W, kernel, stride = case
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    y_d, arg_d = ops.maxpool2d_forward(device.put(x), kernel, stride)
    y, arg = device.get(y_d), device.get(arg_d)
    ref_y, ref_arg = ref_maxpool_forward(x, kernel, stride)
    assert arg.dtype == np.int32 and arg.shape == y.shape
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(arg, ref_arg)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = ops.maxpool2d_backward(device.put(dy), arg_d, x.shape, kernel, stride)
    np.testing.assert_allclose(device.get(dx), ref_maxpool_backward(dy, ref_arg, x.shape), **TOL[dtype])


@pytest.mark.parametrize("case", POOL_CASES[:4], ids=_pool_ids(POOL_CASES[:4]))
def test_maxpool2d_ties_first_max_wins(case, device):
    """Few distinct values -> many tied maxima; the first in row-major order wins."""
    N, C, H, W, kernel, stride = case
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2, size=(N, C, H, W)).astype(np.float32)
    x[0, 0] = 1.0                                           # a plane of all ties
    y_d, arg_d = ops.maxpool2d_forward(device.put(x), kernel, stride)
    y, arg = device.get(y_d), device.get(arg_d)
    ref_y, ref_arg = ref_maxpool_forward(x, kernel, stride)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(arg, ref_arg)
    (sh, sw), (OH, OW) = stride, y.shape[2:]
    top_left = (np.arange(OH)[:, None] * sh) * W + np.arange(OW)[None, :] * sw
    np.testing.assert_array_equal(arg[0, 0], top_left)      # all tied: tap (0, 0) wins
    dy = np.ones(y.shape, np.float32)
    dx = ops.maxpool2d_backward(device.put(dy), arg_d, x.shape, kernel, stride)
    np.testing.assert_allclose(device.get(dx), ref_maxpool_backward(dy, arg, x.shape))


def test_maxpool2d_nan_and_inf(device):
    x = np.full((1, 1, 4, 4), -np.inf, np.float32)
    x[0, 0, 0, 1] = np.nan      # window (0,0): NaN after a -inf; wins
    x[0, 0, 1, 0] = np.nan      # same window, a later NaN: does not replace the first
    x[0, 0, 3, 3] = np.nan      # window (1,1): NaN as the last tap
    x[0, 0, 2, 2] = 5.0
    # window (0,1) and (1,0): all -inf -> first tap, value -inf
    y_d, arg_d = ops.maxpool2d_forward(device.put(x), (2, 2), (2, 2))
    y, arg = device.get(y_d), device.get(arg_d)
    ref_y, ref_arg = ref_maxpool_forward(x, (2, 2), (2, 2))
    np.testing.assert_array_equal(arg, ref_arg)
    np.testing.assert_array_equal(y, ref_y)                 # NaNs compare equal here
    assert arg[0, 0, 0, 0] == 1 and np.isnan(y[0, 0, 0, 0])
    assert arg[0, 0, 1, 1] == 15 and np.isnan(y[0, 0, 1, 1])
    assert arg[0, 0, 0, 1] == 2 and y[0, 0, 0, 1] == -np.inf


def test_maxpool2d_backward_overlap_sums_in_window_order(device):
    """One input element that is the max of several overlapping windows gets their sum."""
    x = np.zeros((1, 1, 5, 5), np.float32)
    x[0, 0, 2, 2] = 1.0                                     # center of all four 3x3/s2 windows
    y, arg = ops.maxpool2d_forward(device.put(x), (3, 3), (2, 2))
    assert (device.get(arg) == 12).all()
    dy = np.array([[[[1.0, 2.0], [4.0, 8.0]]]], np.float32)
    dx = ops.maxpool2d_backward(device.put(dy), arg, x.shape, (3, 3), (2, 2))
    expected = np.zeros((1, 1, 5, 5), np.float32)
    expected[0, 0, 2, 2] = 15.0
    np.testing.assert_array_equal(device.get(dx), expected)


# ---------------------------------------------------------------------------
# Parity with the library's NumPy layer path
# ---------------------------------------------------------------------------

def _layers():
    try:
        from gpucnn.layers import Conv2D, MaxPool2D
    except Exception as exc:  # pragma: no cover - the layers are written in parallel
        pytest.skip(f"gpucnn.layers not importable yet: {exc!r}")
    return Conv2D, MaxPool2D


@pytest.mark.parametrize("case", CONV_CASES, ids=_ids(CONV_CASES))
def test_conv2d_matches_numpy_layer(case, device):
    Conv2D, _ = _layers()
    N, C, H, W, O, KH, KW, stride, padding, bias = case
    x, Wt, b, dy = _conv_arrays(case, np.float32, seed=11)
    layer = Conv2D(C, O, (KH, KW), stride=stride, padding=padding, bias=bias)
    layer.params["W"][...] = Wt
    if bias:
        layer.params["b"][...] = b
    y_np = layer.forward(x)
    dx_np = layer.backward(dy)
    tol = dict(rtol=1e-4, atol=1e-4)
    xd, Wd, dyd = device.put(x), device.put(Wt), device.put(dy)
    bd = device.put(b) if bias else None
    np.testing.assert_allclose(device.get(ops.conv2d_forward(xd, Wd, bd, stride, padding)), y_np, **tol)
    np.testing.assert_allclose(device.get(ops.conv2d_backward_input(dyd, Wd, x.shape, stride, padding)),
                               dx_np, **tol)
    dW, db = ops.conv2d_backward_weight(xd, dyd, Wt.shape, stride, padding)
    np.testing.assert_allclose(device.get(dW), layer.grads["W"], **tol)
    if bias:
        np.testing.assert_allclose(device.get(db), layer.grads["b"], **tol)


@pytest.mark.parametrize("case", POOL_CASES, ids=_pool_ids(POOL_CASES))
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool2d_matches_numpy_layer(case, ties, device):
    _, MaxPool2D = _layers()
    N, C, H, W, kernel, stride = case
    rng = np.random.default_rng(5)
    x = (rng.integers(0, 3, size=(N, C, H, W)) if ties else rng.standard_normal((N, C, H, W))).astype(np.float32)
    layer = MaxPool2D(kernel, stride)
    y_np = layer.forward(x)
    y, arg = ops.maxpool2d_forward(device.put(x), kernel, stride)
    np.testing.assert_array_equal(device.get(y), y_np)
    np.testing.assert_array_equal(device.get(arg), layer.argmax)   # same int32 plane-index convention
    assert layer.argmax.dtype == np.int32
    dy = rng.standard_normal(y.shape).astype(np.float32)
    np.testing.assert_allclose(device.get(ops.maxpool2d_backward(device.put(dy), arg, x.shape, kernel, stride)),
                               layer.backward(dy), rtol=1e-6, atol=1e-6)


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
    s, p = CONV_CASES[2][7], CONV_CASES[2][8]
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
    with pytest.raises(ValueError, match="method"):
        ops.conv2d_backward_weight(x, dy, W.shape, 1, 1, method="fft")
    assert fake.launches == []


def test_signatures_parsed_from_sources():
    for filename, kernels in loader.KERNEL_FILES.items():
        for kernel in kernels:
            params = loader.kernel_signature(kernel)
            assert params and all(p.dtype in (np.float32, np.float64, np.int32) for p in params)
            want = np.float64 if kernel.endswith("_f64") else np.float32
            floats = {p.dtype for p in params if p.is_array and p.dtype != np.int32}
            assert floats == {np.dtype(want)}, kernel


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
from test_kernels_sim import CONV_CASES, POOL_CASES, _conv_arrays
with loader.use_module_builder(lambda c, n, o: cudasim.load_module(code=c, name=n, options=o)):
    for case in CONV_CASES[:{n_conv}]:
        x, W, b, dy = _conv_arrays(case, np.float32)
        s, p = case[7], case[8]
        if {all_kernels}:
            ops.conv2d_forward(x, W, b, s, p)
            ops.conv2d_backward_input(dy, W, x.shape, s, p)
        ops.conv2d_backward_weight(x, dy, W.shape, s, p)
    for N, C, H, W, k, s in (POOL_CASES if {all_kernels} else []):
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
