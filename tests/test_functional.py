"""Every functional op on every backend, against independent float64 references.

The ops take batch-last arrays (``(C, H, W, N)`` images, ``(F, N)`` vectors,
gpucnn.functional.layout); the references are written in NCHW, so the tests
convert with ``bl`` / ``nchw`` at the boundary.

One parametrised test per op over ``backend`` in {numpy, cudasim, cupy}
(tests/backends.py): the NumPy path, the CUDA kernels on the CPU emulator, and
the kernels on a real GPU (skipped without one).  Shapes come from the one
table in tests/cases.py; references from tests/references.py (scatter-form
loops that share no index algebra with the library).  Because every backend is
held to the same reference, the backends agree with each other too.
"""
from __future__ import annotations

import numpy as np
import pytest

from backends import BACKENDS, KERNEL_BACKENDS, backend_fixture
from cases import CONV_CASES, POOL_CASES, params
from gpucnn.functional import activation as A
from gpucnn.functional import conv as C
from gpucnn.functional import dense as Lin
from gpucnn.functional import loss as Loss
from gpucnn.functional import pooling as P
from references import (ref_avgpool_backward, ref_avgpool_forward, ref_conv_backward_input,
                        ref_conv_backward_weight, ref_conv_forward, ref_maxpool_backward,
                        ref_maxpool_forward)

backend = backend_fixture()
DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]


def bl(a):
    """NCHW / (N, F) -> batch-last, contiguous."""
    return np.ascontiguousarray(np.moveaxis(a, 0, -1))


def nchw(a):
    """batch-last -> NCHW / (N, F)."""
    return np.ascontiguousarray(np.moveaxis(a, -1, 0))


def plane_index(tap, x_shape, kernel, stride):
    """Batch-last uint8 taps -> NCHW int plane indices h * W + w (the references' convention)."""
    (kh, kw), (sh, sw) = kernel, stride
    tap = nchw(tap.astype(np.int64))
    Ho, Wo = tap.shape[2:]
    rows = (np.arange(Ho) * sh)[:, None] + tap // kw
    cols = (np.arange(Wo) * sw)[None, :] + tap % kw
    return rows * x_shape[3] + cols


def _skip_big(case, backend):
    if case.big and backend.name == "cudasim":
        pytest.skip("too slow for the CPU emulator (runs on numpy and on a GPU)")


# --------------------------------------------------------------------------- #
# conv2d
# --------------------------------------------------------------------------- #
def _conv(backend, case, dtype, *, input_grad=True, seed=0):
    x, W, b, dy = case.arrays(dtype, seed)
    put = backend.put
    y, saved = C.conv2d_forward(put(bl(x)), put(W), None if b is None else put(b), case.stride, case.padding)
    dx, dW, db = C.conv2d_backward(put(bl(dy)), saved, input_grad=input_grad)
    get = lambda a: None if a is None else nchw(backend.get(a))  # noqa: E731
    return (x, W, b, dy), (get(y), get(dx), dW, db)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", params(CONV_CASES))
def test_conv2d(case, dtype, backend):
    _skip_big(case, backend)
    (x, W, b, dy), (y, dx, dW, db) = _conv(backend, case, dtype)
    tol = backend.tol(dtype)
    assert y.dtype == dtype and dx.shape == x.shape
    np.testing.assert_allclose(y, ref_conv_forward(x, W, b, case.stride, case.padding), **tol)
    np.testing.assert_allclose(dx, ref_conv_backward_input(dy, W, x.shape, case.stride, case.padding), **tol)
    ref_dW, ref_db = ref_conv_backward_weight(x, dy, W.shape, case.stride, case.padding)
    np.testing.assert_allclose(backend.get(dW), ref_dW, **_reduction_tol(tol, case))
    if case.bias:
        np.testing.assert_allclose(backend.get(db), ref_db, **_reduction_tol(tol, case))
    else:
        assert db is None


def _reduction_tol(tol, case):
    """dW sums N*OH*OW terms: allow float32 rounding to grow with the reduction length."""
    terms = case.N * case.out_hw[0] * case.out_hw[1]
    return dict(rtol=tol["rtol"], atol=tol["atol"] * max(1.0, np.sqrt(terms)))


FUSIONS = [("relu", None), ("sigmoid", None), ("tanh", None), (None, ((2, 2), (2, 2))),
           ("relu", ((2, 2), (2, 2))), ("sigmoid", ((3, 2), (1, 2))), ("relu", ((3, 3), (2, 2)))]


@pytest.mark.parametrize("act,pool", FUSIONS, ids=[f"{a}-pool{p[0][0]}x{p[0][1]}s{p[1][0]}" if p else f"{a}"
                                                   for a, p in FUSIONS])
@pytest.mark.parametrize("case", [c for c in params(CONV_CASES, big=False) if min(c.values[0].out_hw) >= 3][:4])
def test_conv2d_fused_epilogue(case, act, pool, backend):
    """conv -> act -> maxpool in one call equals the three steps done by the references."""
    x, W, b, _ = case.arrays(np.float64, seed=3)
    put = backend.put
    y, saved = C.conv2d_forward(put(bl(x)), put(W), None if b is None else put(b), case.stride, case.padding,
                                act=act, pool=pool)
    z = ref_conv_forward(x, W, b, case.stride, case.padding)
    f, df = (lambda v: v, lambda v: np.ones_like(v)) if act is None else ACTIVATIONS[act][2:]
    a = f(z)
    want, arg = (a, None) if pool is None else ref_maxpool_forward(a, *pool)
    np.testing.assert_allclose(nchw(backend.get(y)), want, rtol=1e-12, atol=1e-12)
    dy = np.random.default_rng(4).standard_normal(want.shape)
    dx, dW, db = C.conv2d_backward(put(bl(dy)), saved)
    da = dy if pool is None else ref_maxpool_backward(dy, arg, a.shape)
    dz = da * df(z)
    np.testing.assert_allclose(nchw(backend.get(dx)), ref_conv_backward_input(dz, W, x.shape, case.stride,
                                                                              case.padding), rtol=1e-10, atol=1e-12)
    ref_dW, ref_db = ref_conv_backward_weight(x, dz, W.shape, case.stride, case.padding)
    np.testing.assert_allclose(backend.get(dW), ref_dW, rtol=1e-10, atol=1e-12)
    if case.bias:
        np.testing.assert_allclose(backend.get(db), ref_db, rtol=1e-10, atol=1e-12)


def test_conv2d_first_layer_skips_input_gradient(backend):
    _, (_, dx, dW, _) = _conv(backend, CONV_CASES[2], np.float64, input_grad=False)
    assert dx is None and dW.shape == (3, 2, 3, 2)


def test_conv2d_writes_gradients_into_given_buffers(backend):
    case = CONV_CASES[1]
    x, W, b, dy = case.arrays(np.float64)
    put = backend.put
    y, saved = C.conv2d_forward(put(bl(x)), put(W), put(b), case.stride, case.padding)
    dW_out, db_out = put(np.full(W.shape, 7.0)), put(np.full(b.shape, 7.0))
    _, dW, db = C.conv2d_backward(put(bl(dy)), saved, dW_out=dW_out, db_out=db_out)
    assert dW is dW_out and db is db_out                      # overwritten in place, not accumulated
    ref_dW, ref_db = ref_conv_backward_weight(x, dy, W.shape, case.stride, case.padding)
    np.testing.assert_allclose(backend.get(dW), ref_dW, **backend.tol(np.float64))
    np.testing.assert_allclose(backend.get(db), ref_db, **backend.tol(np.float64))


def test_conv2d_rejects_unknown_fusions(backend):
    x, W, b, dy = CONV_CASES[0].arrays(np.float32)
    with pytest.raises(ValueError, match="act must be None or one of .*got act='gelu'"):
        C.conv2d_forward(backend.put(bl(x)), backend.put(W), backend.put(b), (1, 1), (0, 0), act="gelu")


@pytest.mark.gpu
def test_conv2d_kernels_deterministic(monkeypatch, request):
    """Same inputs, same bits, twice (no atomics).  GPU only: the emulator runs threads in a
    fixed order, so there the test could not fail.  (``_conv`` returns y and dx on the host,
    dW and db on the device: its first GPU run failed on calling ``get`` on y.)"""
    from backends import use_backend

    with use_backend("cupy", request, monkeypatch) as b:
        runs = [_conv(b, CONV_CASES[13], np.float32, seed=7)[1] for _ in range(2)]
        host = lambda a: a if isinstance(a, np.ndarray) else b.get(a)  # noqa: E731
        for first, second in zip(*runs):
            assert (first is None) == (second is None)
            if first is not None:
                assert host(first).tobytes() == host(second).tobytes()


# --------------------------------------------------------------------------- #
# max_pool2d, avg_pool2d
# --------------------------------------------------------------------------- #
def _pool_input(case, dtype, ties, seed=5):
    rng = np.random.default_rng(seed)
    shape = (case.N, case.C, case.H, case.W)
    return (rng.integers(0, 3, size=shape) if ties else rng.standard_normal(shape)).astype(dtype)


def _max_pool(backend, x, kernel, stride, relu=False):
    """(y NCHW, plane-index argmax NCHW, saved) of the op on batch-last arrays."""
    y, saved = P.max_pool2d_forward(backend.put(bl(x)), kernel, stride, relu=relu)
    assert saved.tap.dtype == np.uint8
    return nchw(backend.get(y)), plane_index(backend.get(saved.tap), x.shape, kernel, stride), saved


def _max_pool_backward(backend, dy, saved):
    return nchw(backend.get(P.max_pool2d_backward(backend.put(bl(dy)), saved)))


@pytest.mark.parametrize("ties", [pytest.param(False, id="distinct"), pytest.param(True, id="ties")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", params(POOL_CASES))
def test_max_pool2d(case, dtype, ties, backend):
    _skip_big(case, backend)
    x = _pool_input(case, dtype, ties)
    y, arg, saved = _max_pool(backend, x, case.kernel, case.stride)
    ref_y, ref_arg = ref_maxpool_forward(x, case.kernel, case.stride)
    np.testing.assert_array_equal(y, ref_y)                 # selected, not computed: exact
    np.testing.assert_array_equal(arg, ref_arg)             # first maximum wins everywhere
    dy = np.random.default_rng(6).standard_normal(y.shape).astype(dtype)
    np.testing.assert_allclose(_max_pool_backward(backend, dy, saved), ref_maxpool_backward(dy, ref_arg, x.shape),
                               **backend.tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", params(POOL_CASES))
def test_max_pool2d_fused_relu_equals_relu_then_pool(case, dtype, backend):
    """pool(relu(z)) computed as relu of the window maximum: same outputs and taps, and the
    gradient of relu-then-pool -- with relu'(0) = 1/2 (seed 001) -- on ties, zeros and negatives."""
    _skip_big(case, backend)
    rng = np.random.default_rng(9)
    z = rng.integers(-3, 3, size=(case.N, case.C, case.H, case.W)).astype(dtype)   # many ties, zeros
    z[..., ::3] = -np.abs(z[..., ::3]) - 1                                          # windows all negative
    y, arg, saved = _max_pool(backend, z, case.kernel, case.stride, relu=True)
    a = np.maximum(z, 0)
    ref_y, ref_arg = ref_maxpool_forward(a, case.kernel, case.stride)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(arg, ref_arg)            # first maximum of relu(z): 0-windows pick tap 0
    dy = rng.standard_normal(y.shape).astype(dtype)
    relu_grad = np.where(z > 0, 1.0, np.where(z == 0, 0.5, 0.0))
    want = ref_maxpool_backward(dy, ref_arg, z.shape) * relu_grad
    np.testing.assert_allclose(_max_pool_backward(backend, dy, saved), want, **backend.tol(dtype))


def test_max_pool2d_fused_relu_nan_window(backend):
    z = np.array([[[[-1.0, np.nan], [2.0, 3.0]]]], np.float32)
    y, arg, saved = _max_pool(backend, z, (2, 2), (2, 2), relu=True)
    assert np.isnan(y[0, 0, 0, 0]) and arg[0, 0, 0, 0] == 1        # the first NaN wins
    dx = _max_pool_backward(backend, np.ones((1, 1, 1, 1), np.float32), saved)
    assert np.isnan(dx[0, 0, 0, 1]) and (dx.ravel()[[0, 2, 3]] == 0).all()


def test_max_pool2d_all_ties_pick_the_top_left(backend):
    x = np.ones((1, 1, 6, 7), np.float32)
    _, arg, _ = _max_pool(backend, x, (3, 2), (2, 2))
    OH, OW = arg.shape[2:]
    top_left = (np.arange(OH)[:, None] * 2) * 7 + np.arange(OW)[None, :] * 2
    np.testing.assert_array_equal(arg[0, 0], top_left)


def test_max_pool2d_nan_and_inf(backend):
    x = np.full((1, 1, 4, 4), -np.inf, np.float32)
    x[0, 0, 0, 1] = np.nan      # window (0,0): NaN after a -inf; wins
    x[0, 0, 1, 0] = np.nan      # same window, a later NaN: does not replace the first
    x[0, 0, 3, 3] = np.nan      # window (1,1): NaN as the last tap
    x[0, 0, 2, 2] = 5.0
    y, arg, saved = _max_pool(backend, x, (2, 2), (2, 2))
    ref_y, ref_arg = ref_maxpool_forward(x, (2, 2), (2, 2))
    np.testing.assert_array_equal(arg, ref_arg)
    np.testing.assert_array_equal(y, ref_y)                 # NaNs compare equal here
    assert arg[0, 0, 0, 0] == 1 and np.isnan(y[0, 0, 0, 0])
    assert arg[0, 0, 1, 1] == 15 and np.isnan(y[0, 0, 1, 1])
    assert arg[0, 0, 0, 1] == 2 and y[0, 0, 0, 1] == -np.inf
    dx = _max_pool_backward(backend, np.ones(y.shape, np.float32), saved)
    np.testing.assert_array_equal(dx, ref_maxpool_backward(np.ones(y.shape), ref_arg, x.shape))


def test_max_pool2d_overlapping_windows_sum_their_gradients(backend):
    x = np.zeros((1, 1, 5, 5), np.float32)
    x[0, 0, 2, 2] = 1.0                                     # the max of all four 3x3/s2 windows
    _, arg, saved = _max_pool(backend, x, (3, 3), (2, 2))
    assert (arg == 12).all()
    dx = _max_pool_backward(backend, np.array([[[[1.0, 2.0], [4.0, 8.0]]]], np.float32), saved)
    expected = np.zeros((1, 1, 5, 5), np.float32)
    expected[0, 0, 2, 2] = 15.0
    np.testing.assert_array_equal(dx, expected)


def test_max_pool2d_refuses_windows_over_256_elements(backend):
    with pytest.raises(ValueError, match=r"at most 256 elements .*kernel=\(17, 16\)"):
        P.max_pool2d_forward(backend.put(np.zeros((1, 20, 20, 1), np.float32)), (17, 16), (1, 1))


@pytest.mark.parametrize("backend", [BACKENDS[0], BACKENDS[2]], indirect=True)   # one xp path: no kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", params(POOL_CASES))
def test_avg_pool2d(case, dtype, backend):
    x = _pool_input(case, dtype, False)
    y, x_shape = P.avg_pool2d_forward(backend.put(bl(x)), case.kernel, case.stride)
    np.testing.assert_allclose(nchw(backend.get(y)), ref_avgpool_forward(x, case.kernel, case.stride),
                               **backend.tol(dtype))
    dy = np.random.default_rng(7).standard_normal(nchw(backend.get(y)).shape).astype(dtype)
    dx = P.avg_pool2d_backward(backend.put(bl(dy)), x_shape, case.kernel, case.stride)
    np.testing.assert_allclose(nchw(backend.get(dx)), ref_avgpool_backward(dy, x.shape, case.kernel, case.stride),
                               **backend.tol(dtype))


# --------------------------------------------------------------------------- #
# linear and the element-wise activations: one xp path (numpy, and cupy on a GPU)
# --------------------------------------------------------------------------- #
XP_BACKENDS = [BACKENDS[0], BACKENDS[2]]


@pytest.mark.parametrize("act", [None, "relu", "sigmoid", "tanh"], ids=str)
@pytest.mark.parametrize("shape", [(1, 400, 120, True), (64, 400, 120, True), (3, 84, 10, False)],
                         ids=["batch1-400x120", "lenet5-fc1", "batch3-nobias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(shape, dtype, act, backend):
    N, fin, fout, bias = shape
    rng = np.random.default_rng(6)
    x, W = rng.standard_normal((N, fin)).astype(dtype), rng.standard_normal((fout, fin)).astype(dtype)
    b = rng.standard_normal(fout).astype(dtype) if bias else None
    dy = rng.standard_normal((N, fout)).astype(dtype)
    y, saved = Lin.dense_forward(backend.put(bl(x)), backend.put(W), None if b is None else backend.put(b), act=act)
    dx, dW, db = Lin.dense_backward(backend.put(bl(dy)), saved)
    X, Wd, Dy = (a.astype(np.float64) for a in (x, W, dy))
    Z = X @ Wd.T + (0 if b is None else b)
    f, df = (lambda z: z, lambda z: np.ones_like(z)) if act is None else ACTIVATIONS[act][2:]
    Dz = Dy * df(Z)
    tol = dict(rtol=backend.tol(dtype)["rtol"], atol=backend.tol(dtype)["atol"] * np.sqrt(max(N, fin)))
    np.testing.assert_allclose(nchw(backend.get(y)), f(Z), **tol)
    np.testing.assert_allclose(nchw(backend.get(dx)), Dz @ Wd, **tol)
    np.testing.assert_allclose(backend.get(dW), Dz.T @ X, **tol)
    if bias:
        np.testing.assert_allclose(backend.get(db), Dz.sum(axis=0), **tol)


def _act_input(dtype, seed=8):
    """N(0, 3) values with some exact zeros (the ReLU family's x = 0 branch)."""
    x = (3 * np.random.default_rng(seed).standard_normal((3, 4, 5, 6))).astype(dtype)
    x.reshape(-1)[::7] = 0
    return x


def _sig(x):
    return 1 / (1 + np.exp(-x))


# (name, forward(x, xp_put) -> (y, saved), backward(dy, saved), reference f, reference f')
ACTIVATIONS = {
    "sigmoid": (A.sigmoid_forward, A.sigmoid_backward, _sig, lambda x: _sig(x) * (1 - _sig(x))),
    "tanh": (A.tanh_forward, A.tanh_backward, np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "scaled_tanh": (lambda x: A.scaled_tanh_forward(x, 1.7159, 0.6666),
                    lambda dy, s: A.scaled_tanh_backward(dy, s, 1.7159, 0.6666),
                    lambda x: 1.7159 * np.tanh(0.6666 * x), lambda x: 1.7159 * 0.6666 * (1 - np.tanh(0.6666 * x) ** 2)),
    "relu": (A.relu_forward, A.relu_backward, lambda x: np.maximum(x, 0),
             lambda x: np.where(x > 0, 1.0, np.where(x == 0, 0.5, 0.0))),
    "leaky_relu": (lambda x: A.slope_forward(x, 0.1), A.slope_backward, lambda x: np.where(x >= 0, x, 0.1 * x),
                   lambda x: np.where(x >= 0, 1.0, 0.1)),
}


@pytest.mark.parametrize("backend", XP_BACKENDS, indirect=True)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation(name, dtype, backend):
    fwd, bwd, f, df = ACTIVATIONS[name]
    x = _act_input(dtype)
    dy = np.random.default_rng(9).standard_normal(x.shape).astype(dtype)
    y, saved = fwd(backend.put(x))
    dx = bwd(backend.put(dy), saved)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    X = x.astype(np.float64)
    np.testing.assert_allclose(backend.get(y), f(X), **tol)
    np.testing.assert_allclose(backend.get(dx), dy * df(X), **tol)


@pytest.mark.parametrize("backend", XP_BACKENDS, indirect=True)
def test_relu_derivative_is_half_at_exactly_zero(backend):
    y, saved = A.relu_forward(backend.put(np.array([[-1.0, 0.0, 2.0, -0.0, np.nan]], np.float32)))
    dx = backend.get(A.relu_backward(backend.put(np.ones((1, 5), np.float32)), saved))
    np.testing.assert_array_equal(dx[:, :4], [[0.0, 0.5, 1.0, 0.5]])
    assert np.isnan(dx[0, 4]) and np.isnan(backend.get(y)[0, 4])      # NaN propagates both ways


def test_relu_derivative_is_nan_at_nan_on_a_cupy_whose_sign_gives_0(monkeypatch):
    """CuPy 13's ``sign(NaN)`` is 0 (NumPy's and CuPy 14's: NaN); ReLU's derivative must
    still be NaN there.  The stand-in plays CuPy 13: its ``sign`` maps NaN to 0."""
    from gpucnn.bench import standin

    with standin.installed(standin.Recorder()) as cp:
        monkeypatch.setattr(cp, "sign", lambda x, out=None: cp.asarray(np.nan_to_num(np.sign(cp.asnumpy(x)), nan=0.0)),
                            raising=False)
        x = cp.asarray(np.array([[-1.0, 0.0, 2.0, -0.0, np.nan]], np.float32))
        dx = cp.asnumpy(A.relu_backward(cp.asarray(np.ones((1, 5), np.float32)), x))
    np.testing.assert_array_equal(dx[:, :4], [[0.0, 0.5, 1.0, 0.5]])
    assert np.isnan(dx[0, 4])


@pytest.mark.parametrize("backend", XP_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prelu_and_softmax(dtype, backend):
    x = _act_input(dtype)
    dy = np.random.default_rng(10).standard_normal(x.shape).astype(dtype)
    a = np.array([0.2, -0.1, 0.3, 0.05], dtype).reshape(1, 4, 1, 1)
    y, saved = A.prelu_forward(backend.put(x), backend.put(a))
    dx, da = A.prelu_backward(backend.put(dy), saved, backend.put(a), (0, 2, 3))
    X, D = x.astype(np.float64), dy.astype(np.float64)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backend.get(y), np.where(X > 0, X, a * X), **tol)
    np.testing.assert_allclose(backend.get(dx), np.where(X > 0, D, a * D), **tol)
    np.testing.assert_allclose(backend.get(da), (D * X * (X <= 0)).sum(axis=(0, 2, 3)), **tol)
    y, saved = A.softmax_forward(backend.put(x), 1)
    e = np.exp(X - X.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(backend.get(y), p, **tol)
    np.testing.assert_allclose(backend.get(A.softmax_backward(backend.put(dy), saved, 1)),
                               p * (D - (D * p).sum(axis=1, keepdims=True)), **tol)


# --------------------------------------------------------------------------- #
# losses
# --------------------------------------------------------------------------- #
def _xent_reference(logits, labels, scale):
    z = logits.astype(np.float64)
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    g = p.copy()
    g[np.arange(len(labels)), labels] -= 1
    return -logp[np.arange(len(labels)), labels].mean(), p, g * scale / len(labels)


@pytest.mark.parametrize("NK", [(1, 10), (5, 1), (37, 10), (9, 37), (130, 10)], ids=lambda nk: f"N{nk[0]}K{nk[1]}")
@pytest.mark.parametrize("spread", [1.0, 60.0], ids=["logits-N01", "logits-large"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy(NK, spread, dtype, backend):
    N, K = NK
    rng = np.random.default_rng(N * 100 + K)
    logits = (spread * rng.standard_normal((N, K))).astype(dtype)
    labels = rng.integers(0, K, N).astype(np.int64)
    loss, saved = Loss.softmax_cross_entropy_forward(backend.put(bl(logits)), backend.put(labels))
    grad = Loss.softmax_cross_entropy_backward(saved, 0.5)
    want_loss, want_p, want_g = _xent_reference(logits, labels, 0.5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    assert loss.shape == () and loss.dtype == dtype and grad.dtype == dtype
    np.testing.assert_allclose(backend.get(loss), want_loss, **tol)
    np.testing.assert_allclose(nchw(backend.get(saved.probs)), want_p, **tol)
    np.testing.assert_allclose(nchw(backend.get(grad)), want_g, **tol)
    assert int(backend.get(saved.correct)) == int((logits.argmax(axis=1) == labels).sum())


def test_softmax_cross_entropy_counts_nan_rows_as_wrong(backend):
    logits = np.zeros((3, 4), np.float32)
    logits[0, 1] = logits[1, 2] = logits[2, 0] = 5
    logits[1, 0] = np.nan
    labels = np.array([1, 2, 0])
    with np.errstate(invalid="ignore"):
        _, saved = Loss.softmax_cross_entropy_forward(backend.put(bl(logits)), backend.put(labels))
    assert int(backend.get(saved.correct)) == 2


@pytest.mark.parametrize("backend", XP_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mse(dtype, backend):
    rng = np.random.default_rng(13)
    pred, target = rng.standard_normal((21, 10)).astype(dtype), rng.standard_normal((21, 10)).astype(dtype)
    loss, saved = Loss.mse_forward(backend.put(pred), backend.put(target), 21)
    grad = Loss.mse_backward(saved, 21, 2.0)
    d = pred.astype(np.float64) - target
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(backend.get(loss), 0.5 * (d * d).sum() / 21, **tol)
    np.testing.assert_allclose(backend.get(grad), 2.0 * d / 21, **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_is_the_stable_two_branch_formula_bit_for_bit(dtype):
    """The branch-free numerator max(e, x >= 0) gives exactly the bits of the two-branch select,
    at the edges too (0, -0, +-inf, NaN, subnormal, saturation), also written in place."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(5000) * 30).astype(dtype)
    x[:7] = [0.0, -0.0, np.inf, -np.inf, np.nan, -1e-40, 88.0]
    with np.errstate(all="ignore"):
        e = np.exp(-np.abs(x))
        want = np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(dtype)
        got = A.sigmoid(x)
        inplace = x.copy()
        assert A.sigmoid(inplace, out=inplace) is inplace
    assert got.dtype == dtype
    assert got.tobytes() == want.tobytes() == inplace.tobytes()
    assert got[3] == 0.0 and got[2] == 1.0 and np.isnan(got[4])
