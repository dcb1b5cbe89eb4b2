"""The batch-last train-step kernels other than convolution, against independent float64 references.

kernels/pool.cu, dense.cu, elementwise.cu, loss.cu, optim.cu and batch.cu through
their wrappers gpucnn.cuda.pool / dense / elementwise / loss / optim / batch, on
the two kernel backends of tests/backends.py (fixture ``device``): ``cudasim``
(the unchanged .cu on the CPU emulator, NumPy arrays) and ``cupy`` (a real GPU;
skipped, with the reason, without one).

The references are written here, in float64 NumPy (loops over windows, scatter
forms for the backward passes, column-wise log-sum-exp, the optimizer
arithmetic of gpucnn/optim.py re-typed); none of gpucnn's own NumPy functional
code is used.  Also here: the fused pool + relu rule on tied, zero and NaN
windows, bit-identity of the loss forward across its launch paths and of the
GEMMs across calls, outputs prefilled with garbage, launch counts and grids
with a recording fake builder (lenet5's shapes), argument errors, and the ASan /
TSan runs of every kernel (slow).  The emulator runs threaded blocks at about
100 us per CUDA thread, so the shapes are small.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from backends import CUDASIM_ERROR, KERNEL_BACKENDS, cudasim, recording_fixture, use_backend
from gpucnn.cuda import batch, dense, elementwise, loader, loss, optim, pool

TESTS = pathlib.Path(__file__).resolve().parent
F32, F64 = np.float32, np.float64
DTYPES = [F32, F64]
STEP_FILES = ("pool.cu", "dense.cu", "elementwise.cu", "loss.cu", "optim.cu", "batch.cu")


@pytest.fixture(params=KERNEL_BACKENDS)
def device(request, monkeypatch):
    """The kernels on the emulator (NumPy arrays) or the GPU (CuPy arrays)."""
    with use_backend(request.param, request, monkeypatch) as dev:
        yield dev


def tol(dtype, terms=1):
    """Tolerance of a kernel result against float64, for sums of ``terms`` products."""
    if np.dtype(dtype) == np.float32:
        return dict(rtol=2e-5, atol=2e-5 * max(1.0, terms / 16) ** 0.5)
    return dict(rtol=1e-12, atol=1e-12 * max(1.0, terms / 16))


def rng_for(*key):
    return np.random.default_rng(abs(hash(key)) % (1 << 32))


def garbage(device, shape, dtype):
    """An output buffer full of NaN (or -7 for ints): must be overwritten everywhere."""
    fill = np.nan if np.dtype(dtype).kind == "f" else (7 if np.dtype(dtype) == np.uint8 else -7)
    return device.put(np.full(shape, fill, dtype))


# ---------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------

def ref_relu(z):
    with np.errstate(invalid="ignore"):
        return np.where(z > 0, z, np.where(np.isnan(z), z, 0.0))


def ref_relu_grad(z):
    with np.errstate(invalid="ignore"):
        return np.where(z > 0, 1.0, np.where(z == 0, 0.5, np.where(z < 0, 0.0, np.nan)))


def ref_pool_forward(x, kernel, stride, relu):
    """relu (optional) THEN max-pool with the first-max / first-NaN rule: (y, tap, factor)."""
    C, H, W, N = x.shape
    (KH, KW), (SH, SW) = kernel, stride
    OH, OW = (H - KH) // SH + 1, (W - KW) // SW + 1
    z = ref_relu(x.astype(F64)) if relu else x.astype(F64)
    y = np.empty((C, OH, OW, N))
    tap = np.empty((C, OH, OW, N), np.uint8)
    factor = np.empty((C, OH, OW, N))
    for c in range(C):
        for i in range(OH):
            for j in range(OW):
                for n in range(N):
                    win = z[c, i * SH:i * SH + KH, j * SW:j * SW + KW, n].reshape(-1)
                    nans = np.flatnonzero(np.isnan(win))
                    t = int(nans[0]) if nans.size else int(np.argmax(win))   # argmax: the first maximum
                    u, v = divmod(t, KW)
                    y[c, i, j, n], tap[c, i, j, n] = win[t], t
                    factor[c, i, j, n] = ref_relu_grad(x[c, i * SH + u, j * SW + v, n]) if relu else 1.0
    return y, tap, factor


def ref_pool_backward(dy, tap, factor, x_shape, kernel, stride):
    """Scatter dy * factor to each window's tap, windows in increasing (i, j)."""
    C, H, W, N = x_shape
    (KH, KW), (SH, SW) = kernel, stride
    _, OH, OW, _ = dy.shape
    dx = np.zeros(x_shape)
    for c in range(C):
        for n in range(N):
            for i in range(OH):
                for j in range(OW):
                    u, v = divmod(int(tap[c, i, j, n]), KW)
                    f = 1.0 if factor is None else float(factor[c, i, j, n])
                    dx[c, i * SH + u, j * SW + v, n] += float(dy[c, i, j, n]) * f
    return dx


def ref_act(z, act):
    z = z.astype(F64)
    if act == "relu":
        return ref_relu(z)
    if act == "sigmoid":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-z))
    if act == "tanh":
        return np.tanh(z)
    return z


def ref_act_backward(dy, saved, act):
    dy, s = dy.astype(F64), None if saved is None else saved.astype(F64)
    if act == "relu":
        return dy * ref_relu_grad(s)
    if act == "sigmoid":
        return dy * (s * (1 - s))
    if act == "tanh":
        return dy * (1 - s * s)
    return dy


def ref_xent(logits, labels):
    """(loss, probs, correct) of BL logits (K, N), column by column, in float64."""
    z = logits.astype(F64)
    K, N = z.shape
    probs, rows, correct = np.empty((K, N)), np.empty(N), 0
    for n in range(N):
        col = z[:, n]
        m = np.nan if np.isnan(col).any() else col.max()
        with np.errstate(invalid="ignore"):
            logp = (col - m) - np.log(np.sum(np.exp(col - m)))
        probs[:, n] = np.exp(logp)
        y = int(labels[n])
        valid = 0 <= y < K
        rows[n] = -logp[y] if valid else np.nan
        first_max = 0
        for k in range(1, K):
            if col[k] > col[first_max]:
                first_max = k
        correct += int(valid and not np.isnan(m) and first_max == y)
    return rows.mean(), probs, correct


# ---------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------

# (C, H, W, N, kernel, stride, why)
POOL = [
    (1, 1, 1, 1, (1, 1), (1, 1), "everything 1"),
    (2, 4, 4, 3, (2, 2), (2, 2), "classic 2x2"),
    (1, 7, 7, 5, (2, 2), (2, 2), "odd input: last row/column dropped"),
    (2, 7, 6, 2, (3, 3), (2, 2), "overlapping windows"),
    (1, 9, 8, 3, (3, 2), (1, 2), "non-square, heavy overlap"),
    (2, 9, 9, 1, (2, 2), (3, 3), "stride > kernel: gaps get 0"),
    (1, 5, 5, 4, (5, 5), (1, 1), "one window per plane"),
    (1, 6, 9, 2, (2, 3), (3, 1), "non-square kernel and stride"),
    (1, 8, 3, 7, (4, 1), (2, 3), "tall kernel"),
    (11, 5, 6, 37, (3, 2), (2, 2), "backward: C > 8 channels loop in a thread, N over two warps"),
]
POOL_IDS = [f"C{c}H{h}W{w}N{n}k{k[0]}x{k[1]}s{s[0]}x{s[1]}" for c, h, w, n, k, s, _ in POOL]


@pytest.mark.parametrize("case", POOL, ids=POOL_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("values", ["normal", "ties"])
def test_pool_parity(case, dtype, relu, values, device):
    C, H, W, N, k, s, _ = case
    rng = rng_for("pool", case, values)
    if values == "ties":   # small integers: many tied maxima, exact zeros, all-negative windows
        x = rng.integers(-2, 2, size=(C, H, W, N)).astype(dtype)
    else:
        x = rng.standard_normal((C, H, W, N)).astype(dtype)
    y, tap, factor = pool.max_pool_forward(device.put(x), k, s, relu=relu)
    ry, rtap, rfactor = ref_pool_forward(x, k, s, relu)
    np.testing.assert_array_equal(device.get(tap), rtap)
    np.testing.assert_array_equal(device.get(y), ry.astype(dtype))
    if relu:
        np.testing.assert_array_equal(device.get(factor), rfactor.astype(dtype))
    else:
        assert factor is None
    dy = rng.standard_normal(ry.shape).astype(dtype)
    dx = pool.max_pool_backward(device.put(dy), tap, factor, x.shape, k, s)
    want = ref_pool_backward(dy, rtap, rfactor if relu else None, x.shape, k, s)
    np.testing.assert_allclose(device.get(dx), want, **tol(dtype, 4))
    if relu:   # equals relu-then-maxpool's backward: relu'(x) * (plain pool backward of relu(x))
        _, ptap, _ = ref_pool_forward(ref_relu(x.astype(F64)), k, s, False)
        comp = ref_relu_grad(x.astype(F64)) * ref_pool_backward(dy, ptap, None, x.shape, k, s)
        np.testing.assert_allclose(device.get(dx), comp, **tol(dtype, 4))


def _windows(rows, dtype):
    """x (1, 2, 2*len(rows), 1): one 2x2 window per row of 4 values (row-major taps)."""
    x = np.empty((1, 2, 2 * len(rows), 1), dtype)
    for w, (a, b, c, d) in enumerate(rows):
        x[0, :, 2 * w:2 * w + 2, 0] = [[a, b], [c, d]]
    return x


NAN = float("nan")


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_fused_relu_rule_on_ties_zeros_and_nan(dtype, device):
    rows = [(2, 3, 3, 1),          # tie: the first 3 (tap 1) wins; factor 1
            (0, -1, 0, -2),        # m = 0: y 0, tap 0, factor 1/2 (z[0] == 0 exactly)
            (-1, 0, -3, -1),       # m = 0 but z[0] < 0: tap 0, factor 0
            (-3, -1, -1, -2),      # all negative: tap 0, factor 0
            (-1, NAN, 2, NAN),     # NaN wins: the first NaN (tap 1), y NaN, factor NaN
            (NAN, 5, 1, 1),        # NaN first
            (-0.0, 0.0, -1, 0),    # signed zeros: z[0] == 0 -> factor 1/2
            (1, 1, 1, 1)]          # all tied positive: tap 0, factor 1
    x = _windows(rows, dtype)
    want_y = [3, 0, 0, 0, NAN, NAN, 0, 1]
    want_tap = [1, 0, 0, 0, 1, 0, 0, 0]
    want_factor = [1, 0.5, 0, 0, NAN, NAN, 0.5, 1]
    y, tap, factor = pool.max_pool_forward(device.put(x), 2, 2, relu=True)
    np.testing.assert_array_equal(device.get(y).reshape(-1), np.array(want_y, dtype))
    np.testing.assert_array_equal(device.get(tap).reshape(-1), want_tap)
    np.testing.assert_array_equal(device.get(factor).reshape(-1), np.array(want_factor, dtype))
    # without relu: first max / first NaN of the raw values
    y, tap, factor = pool.max_pool_forward(device.put(x), 2, 2)
    assert factor is None
    np.testing.assert_array_equal(device.get(y).reshape(-1), np.array([3, 0, 0, -1, NAN, NAN, 0, 1], dtype))
    np.testing.assert_array_equal(device.get(tap).reshape(-1), [1, 0, 1, 1, 1, 0, 0, 0])
    # backward of the fused pass: dz at the tap = dy * factor, 0 elsewhere
    y, tap, factor = pool.max_pool_forward(device.put(x), 2, 2, relu=True)
    dy = np.full((1, 1, len(rows), 1), 2.0, dtype)
    dx = device.get(pool.max_pool_backward(device.put(dy), tap, factor, x.shape, 2, 2))
    for w, (t, f) in enumerate(zip(want_tap, want_factor)):
        got = dx[0, :, 2 * w:2 * w + 2, 0].reshape(-1)
        want = np.zeros(4)
        want[t] = 2 * f
        np.testing.assert_array_equal(got, want.astype(dtype))


def test_pool_outputs_fully_overwritten(device):
    x = rng_for("pool-garbage").standard_normal((2, 7, 5, 3))
    shape = (2, 3, 2, 3)
    y, tap, factor = pool.max_pool_forward(device.put(x), 3, 2, relu=True, y_out=garbage(device, shape, F64),
                                           tap_out=garbage(device, shape, np.uint8),
                                           factor_out=garbage(device, shape, F64))
    ry, rtap, rf = ref_pool_forward(x, (3, 3), (2, 2), True)
    np.testing.assert_array_equal(device.get(y), ry)
    np.testing.assert_array_equal(device.get(tap), rtap)
    np.testing.assert_array_equal(device.get(factor), rf)
    dy = np.ones(shape)
    dx = pool.max_pool_backward(device.put(dy), tap, None, x.shape, 3, 2, out=garbage(device, x.shape, F64))
    np.testing.assert_array_equal(device.get(dx), ref_pool_backward(dy, rtap, None, x.shape, (3, 3), (2, 2)))


# ---------------------------------------------------------------------------
# Dense layers
# ---------------------------------------------------------------------------

# (Fin, Fout, N): everything 1, one partial tile, several tiles each way with
# remainders, a long reduction (default KS > 1), lenet5's fc1 at a small batch.
DENSE = [(1, 1, 1), (37, 11, 5), (5, 33, 70), (300, 40, 3), (400, 120, 2)]
ACTS = [None, "relu", "sigmoid", "tanh"]


def _dense_arrays(Fin, Fout, N, dtype, key=0):
    rng = rng_for("dense", Fin, Fout, N, key)
    x = rng.standard_normal((Fin, N)).astype(dtype)
    W = (rng.standard_normal((Fout, Fin)) / np.sqrt(Fin) * 2).astype(dtype)
    b = rng.standard_normal(Fout).astype(dtype)
    return x, W, b


@pytest.mark.parametrize("shape", DENSE, ids=[f"{a}to{b}N{n}" for a, b, n in DENSE])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_dense_forward(shape, dtype, act, device):
    Fin, Fout, N = shape
    x, W, b = _dense_arrays(Fin, Fout, N, dtype)
    for bias in (True, False):
        z_ref = W.astype(F64) @ x.astype(F64) + (b.astype(F64)[:, None] if bias else 0)
        y, z = dense.dense_forward(device.put(x), device.put(W), device.put(b) if bias else None, act,
                                   y_out=garbage(device, (Fout, N), dtype))
        np.testing.assert_allclose(device.get(y), ref_act(z_ref, act), **tol(dtype, Fin))
        if act == "relu":
            np.testing.assert_allclose(device.get(z), z_ref, **tol(dtype, Fin))
        else:
            assert z is None
    y, z = dense.dense_forward(device.put(x), device.put(W), device.put(b), act, write_z=True)
    np.testing.assert_allclose(device.get(z), W.astype(F64) @ x.astype(F64) + b.astype(F64)[:, None],
                               **tol(dtype, Fin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_forward_special_values(dtype, device):
    """z exactly 0 (zero weights), huge |z| for sigmoid/tanh, NaN propagating through relu."""
    Fin, Fout, N = 3, 4, 5
    x = np.ones((Fin, N), dtype) * 40
    W = np.array([[0, 0, 0], [1, 1, 1], [-1, -1, -1], [1, 0, 0]], dtype)
    b = np.zeros(Fout, dtype)
    x[0, 4] = np.nan
    for act, want_row in (("relu", [0, 120, 0, 40]), ("sigmoid", [0.5, 1, 0, 1]), ("tanh", [0, 1, -1, 1])):
        y, _ = dense.dense_forward(device.put(x), device.put(W), device.put(b), act)
        y = device.get(y)
        for f in range(Fout):
            np.testing.assert_allclose(y[f, :4], want_row[f], rtol=1e-6, atol=1e-30)
        assert np.isnan(y[1:, 4]).all() and y[0, 4] != y[0, 4]     # 0 * NaN = NaN too
    y, z = dense.dense_forward(device.put(x), device.put(W), device.put(b), "relu")
    dz, db = dense.dense_backward_act(device.put(np.full((Fout, N), 4.0, dtype)), z, "relu")
    dz = device.get(dz)
    np.testing.assert_array_equal(dz[0, :4], 2.0)          # relu'(0) = 1/2
    np.testing.assert_array_equal(dz[2, :4], 0.0)
    np.testing.assert_array_equal(dz[1, :4], 4.0)
    assert np.isnan(dz[:, 4]).all() and np.isnan(device.get(db)).all()


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 33), (2, 300), (3, 257)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_dense_backward_act(shape, dtype, act, device):
    F, N = shape
    rng = rng_for("dba", shape, act)
    dy = rng.standard_normal((F, N)).astype(dtype)
    if act == "relu":
        saved = rng.integers(-2, 3, size=(F, N)).astype(dtype)            # exact zeros included
    elif act in ("sigmoid", "tanh"):
        saved = ref_act(rng.standard_normal((F, N)), act).astype(dtype)
    else:
        saved = None
    want = ref_act_backward(dy, saved, act)
    dz, db = dense.dense_backward_act(device.put(dy), None if saved is None else device.put(saved), act,
                                      dz_out=garbage(device, (F, N), dtype), db_out=garbage(device, (F,), dtype))
    np.testing.assert_allclose(device.get(dz), want, **tol(dtype))
    np.testing.assert_allclose(device.get(db), want.sum(axis=1), **tol(dtype, N))
    dz2, db2 = dense.dense_backward_act(device.put(dy), None if saved is None else device.put(saved), act,
                                        has_bias=False, block=32)
    assert db2 is None
    np.testing.assert_array_equal(device.get(dz2), device.get(dz))


@pytest.mark.parametrize("dims", [(1, 1, 1), (11, 37, 5), (33, 7, 70), (20, 45, 300)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_gradients(dims, dtype, device):
    """dW = dz x^T (gemm_nt, K = the batch) and dx = W^T dz (gemm_tn, K = Fout)."""
    Fout, Fin, N = dims
    rng = rng_for("grads", dims)
    dz = rng.standard_normal((Fout, N)).astype(dtype)
    x = rng.standard_normal((Fin, N)).astype(dtype)
    W = rng.standard_normal((Fout, Fin)).astype(dtype)
    dW = dense.dense_weight_grad(device.put(dz), device.put(x), out=garbage(device, (Fout, Fin), dtype))
    np.testing.assert_allclose(device.get(dW), dz.astype(F64) @ x.astype(F64).T, **tol(dtype, N))
    dx = dense.dense_input_grad(device.put(W), device.put(dz), out=garbage(device, (Fin, N), dtype))
    np.testing.assert_allclose(device.get(dx), W.astype(F64).T @ dz.astype(F64), **tol(dtype, Fout))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_k_groups_agree_and_are_deterministic(dtype, device):
    """Every in-block split of K (KS = 1..4) is correct; a given KS gives the same bits every call."""
    rng = rng_for("ks", dtype)
    Fout, Fin, N = 9, 35, 150
    dz = rng.standard_normal((Fout, N)).astype(dtype)
    x = rng.standard_normal((Fin, N)).astype(dtype)
    want = dz.astype(F64) @ x.astype(F64).T
    for ks in (1, 2, 3, 4):
        a = device.get(dense.dense_weight_grad(device.put(dz), device.put(x), k_groups=ks))
        b = device.get(dense.dense_weight_grad(device.put(dz), device.put(x), k_groups=ks))
        np.testing.assert_allclose(a, want, **tol(dtype, N))
        assert a.tobytes() == b.tobytes()
        y, _ = dense.dense_forward(device.put(x.T.copy()), device.put(dz), None, k_groups=ks)
        np.testing.assert_allclose(device.get(y), want, **tol(dtype, N))
        dx = dense.dense_input_grad(device.put(dz.T.copy()), device.put(x.T.copy()), k_groups=ks)
        np.testing.assert_allclose(device.get(dx), want, **tol(dtype, N))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_row_tiles_over_y_and_z_give_the_same_bits(dtype, device, monkeypatch):
    """Past gridDim.y's limit the GEMM row tiles go over y and z (kernels/dense.cu).  With the
    limit forced to 2, 70 rows (3 tiles) launch as GY = 2, GZ = 2 -- one spare row of blocks,
    which must exit without writing -- and every product gives the bits of the one-axis grid."""
    rng = rng_for("rows-yz", dtype)
    M, K, N = 70, 19, 37
    W = rng.standard_normal((M, K)).astype(dtype)             # forward: Fout = M rows
    x = rng.standard_normal((K, N)).astype(dtype)
    b = rng.standard_normal(M).astype(dtype)
    dz = rng.standard_normal((M, N)).astype(dtype)            # dW = dz x2^T: Fout = M rows
    x2 = rng.standard_normal((K, N)).astype(dtype)
    Wt = rng.standard_normal((K, M)).astype(dtype)            # dx = Wt^T dz2: Fin = M rows
    dz2 = rng.standard_normal((K, N)).astype(dtype)

    def products():
        y, _ = dense.dense_forward(device.put(x), device.put(W), device.put(b), "tanh",
                                   y_out=garbage(device, (M, N), dtype))
        dW = dense.dense_weight_grad(device.put(dz), device.put(x2), out=garbage(device, (M, K), dtype))
        dx = dense.dense_input_grad(device.put(Wt), device.put(dz2), out=garbage(device, (M, N), dtype))
        return [device.get(a).tobytes() for a in (y, dW, dx)]

    assert dense.gemm_launch(M, N, K)[0][1:] == (3, 1)
    plain = products()
    monkeypatch.setattr(loader, "MAX_GRID", (loader.MAX_GRID[0], 2, 2))
    assert dense.gemm_launch(M, N, K)[0][1:] == (2, 2)
    assert products() == plain


# ---------------------------------------------------------------------------
# Elementwise activation backward
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1,), (3, 5, 7, 2), (300,)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_act_backward(shape, dtype, act, device):
    rng = rng_for("act", shape, act)
    dy = rng.standard_normal(shape).astype(dtype)
    if act == "relu":
        saved = rng.integers(-2, 3, size=shape).astype(dtype)
        saved.reshape(-1)[0] = np.nan
    elif act:
        saved = ref_act(rng.standard_normal(shape), act).astype(dtype)
    else:
        saved = None
    want = ref_act_backward(dy, saved, act)
    got = elementwise.act_backward(device.put(dy), None if saved is None else device.put(saved), act,
                                   out=garbage(device, shape, dtype))
    np.testing.assert_allclose(device.get(got), want, **tol(dtype))
    if act == "relu":
        assert np.isnan(device.get(got).reshape(-1)[0])
    # in place (out = dy)
    d = device.put(dy.copy())
    assert elementwise.act_backward(d, None if saved is None else device.put(saved), act, out=d) is d
    np.testing.assert_allclose(device.get(d), want, **tol(dtype))


# ---------------------------------------------------------------------------
# Softmax cross-entropy
# ---------------------------------------------------------------------------

XENT_PATHS = {"fused": dict(fused_max_rows=1 << 30), "split64": dict(fused_max_rows=0, block=64),
              "split32": dict(fused_max_rows=0, block=32)}
XENT = [(10, 1), (1, 5), (3, 7), (10, 37), (37, 9), (1000, 3), (32, 33), (10, 70)]


def _xent_arrays(K, N, dtype, label_dtype=np.int64, spread=3.0, key=0):
    rng = rng_for("xent", K, N, key)
    return (rng.standard_normal((K, N)) * spread).astype(dtype), rng.integers(0, K, size=N).astype(label_dtype)


def _run_xent(device, logits, labels, path="fused", scale=1.0):
    l, p, c = loss.xent_forward(device.put(logits), device.put(labels), **XENT_PATHS[path])
    g = loss.xent_backward(p, device.put(labels), scale)
    return device.get(l), device.get(p), device.get(c), device.get(g)


def _check_xent(got, logits, labels, dtype, scale=1.0):
    l, p, c, g = got
    rl, rp, rc = ref_xent(logits, labels)
    K, N = logits.shape
    assert l.shape == (1,) and l.dtype == dtype and c.shape == (1,) and c.dtype == np.int32
    t = dict(rtol=1e-5, atol=1e-6) if dtype == F32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(l[0], rl, **t)
    np.testing.assert_allclose(p, rp, **t)
    assert int(c[0]) == rc
    onehot = np.zeros((K, N))
    onehot[labels, np.arange(N)] = 1
    np.testing.assert_allclose(g, (rp - onehot) * (scale / N), **t)


@pytest.mark.parametrize("KN", XENT, ids=[f"K{k}N{n}" for k, n in XENT])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", sorted(XENT_PATHS))
def test_xent_parity(KN, dtype, path, device):
    logits, labels = _xent_arrays(*KN, dtype)
    _check_xent(_run_xent(device, logits, labels, path), logits, labels, dtype)


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_xent_label_dtypes_and_scale(label_dtype, dtype, device):
    logits, labels = _xent_arrays(10, 11, dtype, label_dtype, key=1)
    _check_xent(_run_xent(device, logits, labels, scale=0.25), logits, labels, dtype, scale=0.25)


@pytest.mark.parametrize("dtype", DTYPES)
def test_xent_forward_bits_equal_across_launch_paths(dtype, device):
    logits, labels = _xent_arrays(10, 70, dtype, spread=10.0, key=2)
    runs = [_run_xent(device, logits, labels, path) for path in ("fused", "split64", "split32", "fused")]
    l, p, c = loss.xent_forward(device.put(logits), device.put(labels))        # the defaults (fused here)
    runs.append((device.get(l), device.get(p), device.get(c), runs[0][3]))
    first = [a.tobytes() for a in runs[0]]
    for r in runs[1:]:
        assert [a.tobytes() for a in r] == first


@pytest.mark.parametrize("dtype", DTYPES)
def test_xent_backward_bits(dtype, device):
    """(p - onehot) * dtype(scale / N), the NumPy path's very operations, given the same probs."""
    logits, labels = _xent_arrays(37, 13, dtype, key=3)
    _, p, _ = loss.xent_forward(device.put(logits), device.put(labels))
    probs = device.get(p)
    onehot = np.zeros_like(probs)
    onehot[labels, np.arange(13)] = 1
    for scale in (1.0, 0.3, 7):
        got = device.get(loss.xent_backward(device.put(probs), device.put(labels), scale,
                                            out=garbage(device, probs.shape, dtype)))
        want = (probs - onehot) * np.dtype(dtype).type(scale / 13)
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("path", sorted(XENT_PATHS))
def test_xent_correct_count_ties_nan_and_invalid_labels(path, device):
    K, N = 4, 8
    logits = np.zeros((K, N), F32)
    cols = [([1, 3, 3, 0], 1, True),       # tie: the first maximum (k = 1) is the prediction
            ([1, 3, 3, 0], 2, False),
            ([5, 0, 0, 0], 0, True),
            ([0, 0, 0, 0], 0, True),       # all tied: k = 0
            ([0, np.nan, 9, 0], 2, False),  # a NaN logit: wrong (and its loss NaN)
            ([0, 1, 2, 3], 3, True),
            ([0, 1, 2, 3], 4, False),      # invalid label (K): wrong, NaN
            ([-np.inf, 1, 0, 0], 1, True)]  # -inf gets p = 0
    labels = np.zeros(N, np.int64)
    for n, (col, y, _) in enumerate(cols):
        logits[:, n], labels[n] = col, y
    l, p, c = loss.xent_forward(device.put(logits), device.put(labels), **XENT_PATHS[path])
    assert int(device.get(c)[0]) == sum(ok for *_, ok in cols)
    assert np.isnan(device.get(l)[0])
    p = device.get(p)
    assert np.isnan(p[:, 4]).all() and np.isfinite(np.delete(p, 4, axis=1)).all() and p[0, 7] == 0
    g = device.get(loss.xent_backward(device.put(p), device.put(labels)))
    assert np.isnan(g[:, [4, 6]]).all() and np.isfinite(np.delete(g, [4, 6], axis=1)).all()
    good = [0, 1, 2, 3, 5, 7]      # the valid, NaN-free columns match the reference
    _, rp, _ = ref_xent(logits[:, good], labels[good])
    np.testing.assert_allclose(p[:, good], rp, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
def test_xent_invalid_labels_give_nan_not_errors(label_dtype, device):
    logits, labels = _xent_arrays(10, 5, F64, label_dtype, key=4)
    labels[1], labels[3] = -1, 10
    if label_dtype == np.int64:
        labels[4] = (1 << 32) + 2      # high word set: invalid, not label 2
    for path in XENT_PATHS:
        l, p, c, g = _run_xent(device, logits, labels, path)
        bad = [1, 3] + ([4] if label_dtype == np.int64 else [])
        good = [n for n in range(5) if n not in bad]
        assert np.isnan(l[0]) and np.isnan(g[:, bad]).all() and np.isfinite(g[:, good]).all()
        np.testing.assert_allclose(p.sum(axis=0), 1, rtol=1e-12)
        assert int(c[0]) == ref_xent(logits[:, good], labels[good])[2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_xent_extreme_logits(dtype, device):
    K = 37
    logits = np.zeros((K, 5), dtype)
    logits[:, 0] = 80
    logits[:, 1] = -80
    logits[::2, 2], logits[1::2, 2] = 80, -80
    logits[:, 3] = np.linspace(-80, 80, K)
    logits[5, 4], logits[:5, 4] = 80, -80
    labels = np.array([0, 36, 1, 36, 0], np.int64)
    got = _run_xent(device, logits, labels)
    assert all(np.isfinite(a).all() for a in got)
    _check_xent(got, logits, labels, dtype)


# ---------------------------------------------------------------------------
# Optimizers (the arithmetic of gpucnn/optim.py, re-typed here)
# ---------------------------------------------------------------------------

def numpy_sgd(p, g, v, lr, mu, wd, nesterov):
    t = p.dtype.type
    if wd:
        g = g + t(wd) * p
    if mu:
        v *= t(mu)
        v += g
        g = g + t(mu) * v if nesterov else v
    p -= t(lr) * g


def numpy_adam(p, g, m, v, lr, betas, eps, wd, k):
    t = p.dtype.type
    b1, b2 = betas
    if wd:
        g = g + t(wd) * p
    m *= t(b1)
    m += t(1 - b1) * g
    v *= t(b2)
    v += t(1 - b2) * (g * g)
    step = lr / (1 - b1**k)
    denom = (v * t(1 / (1 - b2**k))) ** 0.5 + t(eps)
    p -= t(step) * m / denom


SGD_CASES = [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 1e-2, True), (0.0, 5e-4, False), (0.5, 0.1, False)]


@pytest.mark.parametrize("mu,wd,nesterov", SGD_CASES, ids=[f"mu{m}wd{w}{'N' if n else ''}" for m, w, n in SGD_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_matches_numpy_bit_for_bit(mu, wd, nesterov, dtype, device):
    rng = rng_for("sgd", mu, wd, nesterov)
    n = 1000
    p = rng.standard_normal(n).astype(dtype)
    v = np.zeros(n, dtype)
    dp, dv = device.put(p.copy()), device.put(v.copy())
    hyper = optim.new_hyper(dp, optim.SGD_HYPER_SIZE)
    for step, lr in enumerate([0.1, 0.05, 0.05, 0.01]):       # a schedule: only hyper changes
        g = rng.standard_normal(n).astype(dtype)
        numpy_sgd(p, g, v, lr, mu, wd, nesterov)
        optim.write_hyper(hyper, optim.sgd_hyper(lr))
        optim.sgd_update(dp, device.put(g), dv if mu else None, hyper, mu, wd, nesterov)
        assert device.get(dp).tobytes() == p.tobytes(), f"step {step}"
        assert device.get(dv).tobytes() == v.tobytes()


ADAM_CASES = [((0.9, 0.999), 1e-8, 0.0), ((0.8, 0.99), 1e-6, 0.1), ((0.0, 0.5), 1e-3, 0.0)]


@pytest.mark.parametrize("betas,eps,wd", ADAM_CASES, ids=[f"b{b[0]}_{b[1]}wd{w}" for b, _, w in ADAM_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_matches_numpy_bit_for_bit(betas, eps, wd, dtype, device):
    rng = rng_for("adam", betas, wd)
    n = 777
    p = rng.standard_normal(n).astype(dtype)
    m, v = np.zeros(n, dtype), np.zeros(n, dtype)
    dp, dm, dv = device.put(p.copy()), device.put(m.copy()), device.put(v.copy())
    hyper = optim.new_hyper(dp, optim.ADAM_HYPER_SIZE)
    for k, lr in enumerate([1e-3, 1e-3, 5e-4, 1e-4, 1e-4], start=1):
        g = rng.standard_normal(n).astype(dtype)
        numpy_adam(p, g, m, v, lr, betas, eps, wd, k)
        optim.write_hyper(hyper, optim.adam_hyper(lr, betas, k))
        optim.adam_update(dp, device.put(g), dm, dv, hyper, betas, eps, wd)
        for got, want in ((dp, p), (dm, m), (dv, v)):
            assert device.get(got).tobytes() == want.tobytes(), f"step {k}"


def test_optimizer_hyper_values():
    assert optim.sgd_hyper(0.1) == (0.1,)
    s, c2 = optim.adam_hyper(1e-3, (0.9, 0.999), 3)
    assert s == 1e-3 / (1 - 0.9**3) and c2 == 1 / (1 - 0.999**3)
    h = np.empty(2, F32)
    optim.write_hyper(h, (s, c2))
    assert h.tolist() == [float(F32(s)), float(F32(c2))]
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        optim.adam_hyper(1e-3, (0.9, 0.999), 0)


# ---------------------------------------------------------------------------
# Batch gather
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sample", [(1, 3, 4), (2, 5, 7), (1, 1, 1), (3, 2, 6)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("int_dtype", [np.int32, np.int64])
def test_gather_batch(sample, dtype, int_dtype, device):
    rng = rng_for("gather", sample, int_dtype)
    Ntotal = 45
    images = rng.standard_normal((Ntotal,) + sample).astype(dtype)
    labels = rng.integers(0, 10, Ntotal).astype(int_dtype)
    for N in (1, 7, 33):
        idx = rng.permutation(Ntotal)[:N].astype(int_dtype)
        x, y = batch.gather_batch(device.put(images), device.put(labels), device.put(idx),
                                  x_out=garbage(device, sample + (N,), dtype), y_out=garbage(device, (N,), np.int32))
        np.testing.assert_array_equal(device.get(x), np.moveaxis(images[idx], 0, -1))
        np.testing.assert_array_equal(device.get(y), labels[idx].astype(np.int32))


def test_gather_batch_invalid_indices_and_labels(device):
    images = np.arange(5 * 6, dtype=F32).reshape(5, 1, 2, 3)
    labels = np.array([0, 1, -4, (1 << 31) + 3, 4], np.int64)
    idx = np.array([4, 5, -1, 2, 3, (1 << 32) + 1, 0], np.int64)
    x, y = batch.gather_batch(device.put(images), device.put(labels), device.put(idx))
    x, y = device.get(x), device.get(y)
    assert y.tolist() == [4, -1, -1, -1, -1, -1, 0]
    for n, i in enumerate(idx):
        if 0 <= i < 5:
            np.testing.assert_array_equal(x[..., n], images[i])
        else:
            assert np.isnan(x[..., n]).all()


def _augment_reference(images, idx, key, start, fill, m, flip):
    """Per-sample loops: the shifted (and mirrored) images, sample n's three draws taken one by
    one from the counters 3 (start + n) + r of key's stream."""
    from gpucnn.random import hash_uniform

    N = len(idx)
    _, C, H, W = images.shape
    out = np.full((C, H, W, N), fill, images.dtype)
    for n, i in enumerate(idx):
        u = [float(hash_uniform(key, (1,), np, np.float64, start=3 * (start + n) + r)[0]) for r in range(3)]
        dy, dx = (int(np.floor(u[r] * (2 * m + 1))) - m for r in (0, 1))
        src = images[i]
        for h in range(H):
            for w in range(W):
                ww = W - 1 - w if (flip and u[2] < 0.5) else w
                sh, sw = h - dy, ww - dx
                if 0 <= sh < H and 0 <= sw < W:
                    out[:, h, w, n] = src[:, sh, sw]
    return out


@pytest.mark.parametrize("sample,m,flip", [((1, 5, 7), 2, False), ((2, 6, 4), 1, True), ((3, 3, 3), 3, True),
                                           ((1, 4, 4), 0, True)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_batch_augment(sample, m, flip, dtype, device):
    """The fused shift (+ mirror) gather: bit for bit the NumPy path's augment_batch, and a
    per-pixel loop reference; shifts of every size and both mirror states occur."""
    from gpucnn.data.augment import augment_batch
    from gpucnn.functional.layout import to_internal

    rng = rng_for("gather_augment", sample, m, flip)
    Ntotal = 40
    images = rng.standard_normal((Ntotal,) + sample).astype(dtype)
    labels = rng.integers(0, 10, Ntotal).astype(np.int64)
    fill = -0.4242
    # starts: the epoch's first sample, a later batch, one past 2**32 (the position's high word)
    for N, int_dtype, start in ((1, np.int32, 0), (7, np.int64, 64), (37, np.int32, 2**32 + 5)):
        key = (5, N)
        idx = rng.integers(0, Ntotal, N).astype(int_dtype)
        words = batch.augment_key_words(key, start)
        x, y = batch.gather_batch_augment(device.put(images), device.put(labels), device.put(idx),
                                          device.put(words), fill=fill, max_shift=m, flip=flip,
                                          x_out=garbage(device, sample + (N,), dtype),
                                          y_out=garbage(device, (N,), np.int32))
        x = device.get(x)
        np.testing.assert_array_equal(x, to_internal(augment_batch(images[idx], key, fill=fill, max_shift=m,
                                                                   flip=flip, start=start)))
        np.testing.assert_array_equal(x, _augment_reference(images, idx, key, start, dtype(fill), m, flip))
        np.testing.assert_array_equal(device.get(y), labels[idx].astype(np.int32))


@pytest.mark.parametrize("sample,m,flip", [((3, 5, 6), 2, True), ((1, 4, 4), 0, False), ((3, 3, 3), 4, False)],
                         ids=str)
def test_gather_batch_augment_u8(sample, m, flip, device):
    """The uint8 variant: gathered, shifted, flipped and normalised per channel in one launch, bit for
    bit the NumPy path (augment_uint8_batch: normalize, then augment_batch) and a per-pixel loop."""
    from gpucnn.data import channel_affine
    from gpucnn.data.augment import augment_uint8_batch
    from gpucnn.functional.layout import to_internal

    rng = rng_for("gather_augment_u8", sample, m, flip)
    Ntotal, C = 30, sample[0]
    images = rng.integers(0, 256, (Ntotal,) + sample, dtype=np.uint8)
    labels = rng.integers(0, 10, Ntotal).astype(np.int64)
    mean, std = rng.uniform(0.2, 0.6, C), rng.uniform(0.15, 0.4, C)
    scale, shift = channel_affine(mean, std, C)
    fill = -0.25
    for N, start in ((1, 0), (33, 2**32 + 3)):
        key = (7, N)
        idx = rng.integers(0, Ntotal, N)
        x, y = batch.gather_batch_augment_u8(device.put(images), device.put(labels), device.put(idx),
                                             device.put(batch.augment_key_words(key, start)), device.put(scale),
                                             device.put(shift), fill=fill, max_shift=m, flip=flip,
                                             x_out=garbage(device, sample + (N,), F32),
                                             y_out=garbage(device, (N,), np.int32))
        x = device.get(x)
        want = augment_uint8_batch(images, idx, key, mean=mean, std=std, fill=fill, max_shift=m, flip=flip,
                                   start=start)
        np.testing.assert_array_equal(x, to_internal(want))
        normed = images.astype(F32) * scale[:, None, None] - shift[:, None, None]   # float32, op by op
        np.testing.assert_array_equal(x, _augment_reference(normed, idx, key, start, F32(fill), m, flip))
        np.testing.assert_array_equal(device.get(y), labels[idx].astype(np.int32))
    put = device.put
    words = put(batch.augment_key_words((0, 0)))
    with pytest.raises(TypeError, match="images must be uint8, got float32"):
        batch.gather_batch_augment_u8(put(images.astype(F32)), put(labels), put(idx), words, put(scale), put(shift),
                                      fill=0.0)
    with pytest.raises(ValueError, match=rf"scale must be a \({C},\) float32 array"):
        batch.gather_batch_augment_u8(put(images), put(labels), put(idx), words, put(scale.astype(np.float64)),
                                      put(shift), fill=0.0)


def test_gather_batch_augment_invalid_indices_and_bad_arguments(device):
    images = np.arange(5 * 6, dtype=F32).reshape(5, 1, 2, 3)
    labels = np.arange(5, dtype=np.int32)
    idx = np.array([4, 5, -1, 0], np.int64)
    words = device.put(batch.augment_key_words((0, 0)))
    x, y = batch.gather_batch_augment(device.put(images), device.put(labels), device.put(idx), words,
                                      fill=0.0, max_shift=1)
    x, y = device.get(x), device.get(y)
    assert y.tolist() == [4, -1, -1, 0]
    assert np.isnan(x[..., 1:3]).all() and not np.isnan(x[..., [0, 3]]).any()
    put = device.put
    with pytest.raises(ValueError, match=r"key_words must be a \(4,\) int32"):
        batch.gather_batch_augment(put(images), put(labels), put(idx), put(np.zeros(2, np.int64)), fill=0.0)
    with pytest.raises(ValueError, match=r"key_words must be a \(4,\) int32"):   # the old (2,) layout
        batch.gather_batch_augment(put(images), put(labels), put(idx), put(np.zeros(2, np.int32)), fill=0.0)
    for bad in (-1, 2 ** 62):
        with pytest.raises(ValueError, match=rf"start must be an int in \[0, 2\*\*62\), got start={bad}"):
            batch.augment_key_words((0, 0), bad)
    with pytest.raises(ValueError, match="max_shift=-1"):
        batch.gather_batch_augment(put(images), put(labels), put(idx), words, fill=0.0, max_shift=-1)
    with pytest.raises(TypeError, match="flip must be a bool, got flip=1"):
        batch.gather_batch_augment(put(images), put(labels), put(idx), words, fill=0.0, flip=1)
    with pytest.raises(ValueError, match=r"\(Ntotal, C, H, W\)"):
        batch.gather_batch_augment(put(images.reshape(5, 6)), put(labels), put(idx), words, fill=0.0)


# ---------------------------------------------------------------------------
# Launch counts and grids (recording fake builder: no emulator, no GPU)
# ---------------------------------------------------------------------------

fake = recording_fixture()


def _z(*shape, dtype=F32):
    return np.zeros(shape, dtype)


@pytest.mark.parametrize("N", [64, 1024])
def test_lenet5_dense_launches(N, fake):
    """lenet5's 400 -> 120 -> 84 -> 10 at N = 64 and 1024: one launch per call, the documented grids."""
    sizes = [400, 120, 84, 10]
    expect_ks = {64: {"fwd": [3, 1, 1], "dW": [1, 1, 1], "dx": [1, 1, 1]},
                 1024: {"fwd": [3, 1, 1], "dW": [4, 4, 4], "dx": [1, 1, 1]}}[N]
    for layer, (fin, fout) in enumerate(zip(sizes, sizes[1:])):
        x, W, b = _z(fin, N), _z(fout, fin), _z(fout)
        dense.dense_forward(x, W, b, "relu" if layer < 2 else None)
        dense.dense_backward_act(_z(fout, N), _z(fout, N), "relu" if layer < 2 else None)
        dense.dense_weight_grad(_z(fout, N), x)
        dense.dense_input_grad(W, _z(fout, N))
        got = fake.take()
        cdiv = loader.ceil_div
        assert got == [
            ("dense_forward", (cdiv(N, 32), cdiv(fout, 32), 1), (64, expect_ks["fwd"][layer], 1)),
            ("dense_backward_act", (fout, 1, 1), (min(256, N), 1, 1)),
            ("gemm_nt", (cdiv(fin, 32), cdiv(fout, 32), 1), (64, expect_ks["dW"][layer], 1)),
            ("gemm_tn", (cdiv(N, 32), cdiv(fin, 32), 1), (64, expect_ks["dx"][layer], 1)),
        ]
    # the grid sizes this gives, for the record (blocks x threads per block)
    fwd1 = dense.gemm_launch(120, N, 400)
    assert fwd1 == (((2 if N == 64 else 32), 4, 1), (64, 3, 1))
    assert dense.gemm_launch(120, 400, N) == ((13, 4, 1), (64, 1 if N == 64 else 4, 1))


@pytest.mark.parametrize("op", ["forward", "weight_grad", "input_grad"])
def test_dense_huge_row_count_launches_within_cuda_limits(op, fake):
    """2,097,121 rows are 65,536 row tiles, one more than gridDim.y allows: they go as 32,768 x 2
    over y and z (the launcher refuses gridDim.y = 65536)."""
    M = 65535 * 32 + 1
    big, one = _z(M, 1), _z(1, 1)
    if op == "forward":
        dense.dense_forward(one, big, _z(M))                  # W (Fout = M, Fin = 1)
    elif op == "weight_grad":
        dense.dense_weight_grad(big, one)                     # dz (Fout = M, N = 1)
    else:
        dense.dense_input_grad(big.reshape(1, M), one)        # W (Fout = 1, Fin = M)
    ((kernel, grid, block),) = fake.take()
    assert grid == (1, 32768, 2), (kernel, grid)
    with pytest.raises(ValueError, match=r"gemm_nt: gridDim\.y = 65536 \(grid \(1, 65536, 1\)\)"):
        loader.launch("gemm_nt", (big, one, big, M, 1, 1), grid=(1, 65536, 1), block=(64, 1, 1))
    with pytest.raises(ValueError, match="at most 2147483615 rows and columns"):
        dense.gemm_launch(2**31 - 32, 1, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocks_past_256_threads_are_covered_by_launch_bounds(dtype, fake):
    """A block of more than 256 threads fits the 64K-register file only when every thread uses
    at most 65536 / threads registers, which ptxas keeps to only for a kernel that declares
    __launch_bounds__ (256 threads x 255 registers always fit).  The loss kernels are launched
    with up to 1024 threads, so they declare it (and the launcher holds launches to it)."""
    K, N = 10, 1000
    logits, labels = _z(K, N, dtype=dtype), np.zeros(N, np.int32)
    loss.xent_forward(logits, labels)                                     # fused: 1 block of 1024
    loss.xent_forward(logits, labels, fused_max_rows=1, block=1024)      # split
    loss.xent_backward(_z(K, N, dtype=dtype), labels, block=1024)
    big = [(kernel, block) for kernel, _, block in fake.take() if np.prod(block) > 256]
    assert [k for k, _ in big] == [loss._kernel(k, dtype) for k in ("xent_forward",) * 2 + ("xent_backward",)]
    for kernel, block in big:
        assert (loader.kernel_launch_bounds(kernel) or 0) >= np.prod(block), (kernel, block)


def test_step_launches_and_grids(fake):
    cdiv = loader.ceil_div
    # pooling (lenet5 pool1 at N = 64)
    x = _z(6, 28, 28, 64)
    y, tap, factor = pool.max_pool_forward(x, 2, 2, relu=True)
    pool.max_pool_backward(y, tap, factor, x.shape, 2, 2)
    pool.max_pool_forward(x, 3, 2)
    assert fake.take() == [("pool_max_forward", (cdiv(6 * 14 * 14 * 64, 256), 1, 1), (256, 1, 1)),
                           ("pool_max_backward", (cdiv(64, 32), 28, 28), (32, 6, 1)),   # h, w from the grid
                           ("pool_max_forward", (cdiv(6 * 13 * 13 * 64, 256), 1, 1), (256, 1, 1))]
    # elementwise
    elementwise.act_backward(_z(16, 10, 10, 64), _z(16, 10, 10, 64), "tanh")
    assert fake.take() == [("act_backward", (cdiv(16 * 100 * 64, 256), 1, 1), (256, 1, 1))]
    # loss: one launch up to 1024 samples, two above
    for N, want in ((64, [("xent_forward", (1, 1, 1), (64, 1, 1))]),
                    (1000, [("xent_forward", (1, 1, 1), (1024, 1, 1))]),
                    (1024, [("xent_forward", (1, 1, 1), (1024, 1, 1))]),
                    (1025, [("xent_forward", (5, 1, 1), (256, 1, 1)), ("xent_mean", (1, 1, 1), (32, 1, 1))])):
        labels = np.zeros(N, np.int64)
        _, p, _ = loss.xent_forward(_z(10, N), labels)
        loss.xent_backward(p, labels)
        assert fake.take() == want + [("xent_backward", (cdiv(N, 256), 10, 1), (256, 1, 1))]
    loss.xent_forward(_z(10, 40), np.zeros(40, np.int32), fused_max_rows=0)
    assert fake.take() == [("xent_forward", (2, 1, 1), (256, 1, 1)), ("xent_mean", (1, 1, 1), (32, 1, 1))]
    # optimizers: one launch per flat buffer
    p = _z(61706)
    optim.sgd_update(p, _z(61706), None, _z(1), 0.0, 0.0, False)
    optim.sgd_update(p, _z(61706), _z(61706), _z(1), 0.9, 5e-4, True)
    optim.adam_update(p, _z(61706), _z(61706), _z(61706), _z(2), (0.9, 0.999), 1e-8, 0.0)
    g = cdiv(61706, 256)
    assert fake.take() == [("sgd_update", (g, 1, 1), (256, 1, 1)), ("sgd_update", (g, 1, 1), (256, 1, 1)),
                           ("adam_update", (g, 1, 1), (256, 1, 1))]
    # batch gather (MNIST, N = 64)
    batch.gather_batch(_z(100, 1, 28, 28), np.zeros(100, np.int64), np.zeros(64, np.int64))
    assert fake.take() == [("gather_batch", (25, 2, 1), (32, 8, 1))]


def test_float64_runs_the_f64_twins_and_scalars_are_typed(fake):
    pool.max_pool_forward(_z(1, 4, 4, 2, dtype=F64), 2, 2)
    dense.dense_forward(_z(3, 2, dtype=F64), _z(4, 3, dtype=F64), None)
    loss.xent_backward(_z(3, 2, dtype=F64), np.zeros(2, np.int32))
    optim.adam_update(_z(5, dtype=F64), _z(5, dtype=F64), _z(5, dtype=F64), _z(5, dtype=F64),
                      _z(2, dtype=F64), (0.9, 0.99), 1e-8, 0.0)
    names = [k for k, *_ in fake.launches]
    assert names == ["pool_max_forward_f64", "dense_forward_f64", "xent_backward_f64", "adam_update_f64"]
    for kernel, _, _, args in fake.launches:
        for prm, a in zip(loader.kernel_signature(kernel), args):
            if prm.is_array:
                assert isinstance(a, np.ndarray) and a.dtype == prm.dtype and a.flags.c_contiguous
            else:
                assert type(a) is prm.dtype.type, f"{kernel}.{prm.name}: {type(a).__name__}"


def test_kernel_files_registered():
    expected = {"pool.cu": {"pool_max_forward", "pool_max_backward"},
                "dense.cu": {"dense_forward", "dense_backward", "dense_backward_act", "gemm_nt", "gemm_tn"},
                "elementwise.cu": {"act_backward"},
                "loss.cu": {"xent_forward", "xent_forward_backward", "xent_mean", "xent_backward"},
                "optim.cu": {"sgd_update", "adam_update"},
                "batch.cu": {"gather_batch", "gather_batch_augment"}}
    float32_only = {"batch.cu": {"gather_batch_augment_u8"},   # uint8 in, float32 out: no float64 twin
                    "optim.cu": {"sgd_update_skip", "adam_update_skip"}}   # fp16's loss scaling: float32
    assert set(loader.KERNEL_FILES["amp.cu"]) == {"amp_scale", "amp_unscale_check", "amp_update"}
    for filename, names in expected.items():
        assert set(loader.KERNEL_FILES[filename]) == (names | {n + "_f64" for n in names}
                                                      | float32_only.get(filename, set()))
        for name in loader.KERNEL_FILES[filename]:
            params = loader.kernel_signature(name)
            want = F64 if name.endswith("_f64") else F32
            assert {p.dtype for p in params if p.is_array and p.dtype.kind == "f"} == {np.dtype(want)}


# ---------------------------------------------------------------------------
# Argument errors (raised before any launch)
# ---------------------------------------------------------------------------

def test_argument_errors(fake):
    x = _z(2, 5, 5, 3)
    with pytest.raises(TypeError, match=r"x has dtype float16.*float32, float64"):
        pool.max_pool_forward(x.astype(np.float16), 2, 2)
    with pytest.raises(TypeError, match="int64"):
        pool.max_pool_forward(x.astype(np.int64), 2, 2)
    with pytest.raises(ValueError, match="4-D"):
        pool.max_pool_forward(x[0], 2, 2)
    with pytest.raises(ValueError, match="larger than the input plane"):
        pool.max_pool_forward(x, (6, 2), 1)
    with pytest.raises(ValueError, match="uint8 tap indexes at most 256"):
        pool.max_pool_forward(_z(1, 17, 17, 1), 17, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        pool.max_pool_forward(np.zeros((2, 5, 5, 6), F32)[..., ::2], 2, 2)
    with pytest.raises(ValueError, match="stride"):
        pool.max_pool_forward(x, 2, 0)
    with pytest.raises(ValueError, match="factor_out"):
        pool.max_pool_forward(x, 2, 2, factor_out=_z(2, 2, 2, 3))
    with pytest.raises(ValueError, match=r"y_out has shape \(2, 2, 2, 2\), expected \(2, 2, 2, 3\)"):
        pool.max_pool_forward(x, 2, 2, y_out=_z(2, 2, 2, 2))
    with pytest.raises(TypeError, match="y_out must have dtype float32"):
        pool.max_pool_forward(x, 2, 2, y_out=_z(2, 2, 2, 3, dtype=F64))
    with pytest.raises(TypeError, match="tap has dtype int32"):
        pool.max_pool_backward(_z(2, 2, 2, 3), np.zeros((2, 2, 2, 3), np.int32), None, x.shape, 2, 2)
    with pytest.raises(ValueError, match="dy has shape"):
        pool.max_pool_backward(_z(2, 2, 2, 2), np.zeros((2, 2, 2, 2), np.uint8), None, x.shape, 2, 2)
    with pytest.raises(TypeError, match="share one dtype"):
        pool.max_pool_backward(_z(2, 2, 2, 3), np.zeros((2, 2, 2, 3), np.uint8), _z(2, 2, 2, 3, dtype=F64),
                               x.shape, 2, 2)

    with pytest.raises(ValueError, match=r"W has shape \(4, 3\).*x has shape \(2, 5\)"):
        dense.dense_forward(_z(2, 5), _z(4, 3), None)
    with pytest.raises(ValueError, match=r"b has shape \(3,\), expected \(4,\)"):
        dense.dense_forward(_z(3, 5), _z(4, 3), _z(3))
    with pytest.raises(TypeError, match="share one dtype"):
        dense.dense_forward(_z(3, 5), _z(4, 3, dtype=F64), None)
    with pytest.raises(ValueError, match="act must be one of"):
        dense.dense_forward(_z(3, 5), _z(4, 3), None, act="gelu")
    with pytest.raises(ValueError, match="z_out given"):
        dense.dense_forward(_z(3, 5), _z(4, 3), None, act="tanh", z_out=_z(4, 5))
    with pytest.raises(ValueError, match="needs saved"):
        dense.dense_backward_act(_z(4, 5), None, "relu")
    with pytest.raises(ValueError, match="power of two"):
        dense.dense_backward_act(_z(4, 5), _z(4, 5), "relu", block=48)
    with pytest.raises(ValueError, match="batch sizes differ"):
        dense.dense_weight_grad(_z(4, 5), _z(3, 6))
    with pytest.raises(ValueError, match=r"dz has shape \(5, 6\)"):
        dense.dense_input_grad(_z(4, 3), _z(5, 6))
    with pytest.raises(ValueError, match="k_groups"):
        dense.dense_weight_grad(_z(4, 5), _z(3, 5), k_groups=5)
    with pytest.raises(ValueError, match="C-contiguous"):
        dense.dense_input_grad(_z(3, 4).T, _z(4, 6))

    with pytest.raises(ValueError, match="saved has shape"):
        elementwise.act_backward(_z(3, 4), _z(4, 3), "tanh")
    with pytest.raises(TypeError, match="float16"):
        elementwise.act_backward(_z(3).astype(np.float16), None, None)

    logits, labels = _z(10, 3), np.zeros(3, np.int64)
    for bad in (np.int16, np.uint8, np.uint32, np.float32):
        with pytest.raises(TypeError, match=np.dtype(bad).name):
            loss.xent_forward(logits, labels.astype(bad))
    with pytest.raises(ValueError, match=r"labels has shape \(2,\), expected \(3,\)"):
        loss.xent_forward(logits, labels[:2])
    with pytest.raises(ValueError, match="multiple of 32"):
        loss.xent_forward(logits, labels, block=48)
    with pytest.raises(ValueError, match="2-D"):
        loss.xent_forward(logits[0], labels)
    with pytest.raises(TypeError, match="host number"):
        loss.xent_backward(logits, labels, scale=np.ones(1))
    with pytest.raises(TypeError, match="correct_out must have dtype int32"):
        loss.xent_forward(logits, labels, correct_out=_z(1))

    p = _z(10)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        optim.sgd_update(p, _z(10), None, _z(1), 0.0, 0.0, True)
    with pytest.raises(ValueError, match="needs the momentum buffer"):
        optim.sgd_update(p, _z(10), None, _z(1), 0.9, 0.0, False)
    with pytest.raises(ValueError, match=r"g has shape \(9,\)"):
        optim.sgd_update(p, _z(9), None, _z(1), 0.0, 0.0, False)
    with pytest.raises(ValueError, match="hyper must be 1-D with at least 2"):
        optim.adam_update(p, _z(10), _z(10), _z(10), _z(1), (0.9, 0.99), 1e-8, 0.0)
    with pytest.raises(TypeError, match=r"share one dtype.*hyper is float64"):
        optim.sgd_update(p, _z(10), None, _z(1, dtype=F64), 0.0, 0.0, False)
    with pytest.raises(ValueError, match="four distinct"):
        optim.adam_update(p, _z(10), p, _z(10), _z(2), (0.9, 0.99), 1e-8, 0.0)

    with pytest.raises(TypeError, match="idx has dtype float32"):
        batch.gather_batch(_z(5, 1, 2, 2), np.zeros(5, np.int64), _z(3))
    with pytest.raises(ValueError, match=r"labels has shape \(4,\), expected \(5,\)"):
        batch.gather_batch(_z(5, 1, 2, 2), np.zeros(4, np.int64), np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="images has dtype int32"):
        batch.gather_batch(np.zeros((5, 4), np.int32), np.zeros(5, np.int64), np.zeros(3, np.int64))
    assert fake.launches == []


# ---------------------------------------------------------------------------
# Sanitizers: every kernel under ASan+UBSan (guard zones poisoned: any
# out-of-range read or write aborts), the synchronizing ones under TSan.
# ---------------------------------------------------------------------------

_SANITIZER_PROBE = r"""
import numpy as np, cudasim
from gpucnn.cuda import loader, pool, dense, elementwise, loss, optim, batch
run_all = {run_all}
rng = np.random.default_rng(0)
with loader.use_module_builder(lambda c, n, o: cudasim.load_module(code=c, name=n, options=o)):
    for dt in (np.float32, np.float64):
        r = lambda *s: rng.standard_normal(s).astype(dt)
        if run_all:
            for (C, H, W, N), k, s in (((2, 7, 6, 3), 3, 2), ((1, 5, 9, 2), (2, 3), (3, 1))):
                x = r(C, H, W, N)
                for relu in (False, True):
                    y, tap, f = pool.max_pool_forward(x, k, s, relu=relu)
                    pool.max_pool_backward(y, tap, f, x.shape, k, s)
            elementwise.act_backward(r(3, 5, 7), r(3, 5, 7), "relu")
            p = r(300)
            optim.sgd_update(p, r(300), r(300), np.array([0.1], dt), 0.9, 0.01, True)
            optim.sgd_update(p, r(300), None, np.array([0.1], dt), 0.0, 0.0, False)
            optim.adam_update(p, r(300), r(300), np.abs(r(300)), np.array([0.1, 2.0], dt), (0.9, 0.99), 1e-8, 0.1)
        for Fin, Fout, N, ks in ((37, 11, 33, None), (5, 40, 3, 4)):
            x, W, b = r(Fin, N), r(Fout, Fin), r(Fout)
            y, z = dense.dense_forward(x, W, b, "relu", k_groups=ks)
            dz, db = dense.dense_backward_act(y, z, "relu", block=32)
            dense.dense_weight_grad(dz, x, k_groups=ks)
            dense.dense_input_grad(W, dz, k_groups=ks)
        for K, N, extra in ((10, 37, dict(fused_max_rows=0, block=32)), (3, 5, dict())):
            labels = rng.integers(-1, K + 1, N)
            l, p, c = loss.xent_forward(r(K, N), labels, **extra)
            if run_all:
                loss.xent_backward(p, labels)
        images, lab = r(40, 1, 3, 11), rng.integers(0, 10, 40)
        batch.gather_batch(images, lab, np.array([0, 39, 41, -1, 7] * 7, np.int64))
        images2 = r(40, 2, 3, 11)
        for m, flip in ((2, True), (3, False)):
            batch.gather_batch_augment(images2, lab, np.array([0, 39, 41, -1, 7] * 7, np.int64),
                                       batch.augment_key_words((1, 2), 7 * m), fill=-0.5, max_shift=m, flip=flip)
print("SANITIZED-OK")
"""


@pytest.mark.slow
@pytest.mark.cudasim
@pytest.mark.parametrize("sanitize, run_all", [("address", True), ("thread", False)])
def test_step_kernels_clean_under_sanitizers(sanitize, run_all):
    if cudasim is None:
        pytest.skip(CUDASIM_ERROR)
    if not cudasim.sanitizer_available(sanitize):
        pytest.skip(f"g++ has no {sanitize} sanitizer runtime")
    paths = [str(TESTS.parent), str(TESTS)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    result = cudasim.run_sanitized(["-c", _SANITIZER_PROBE.format(run_all=run_all)], sanitize, env=env)
    assert result.returncode == 0 and "SANITIZED-OK" in result.stdout, (
        f"{sanitize} sanitizer run failed (rc {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}")
