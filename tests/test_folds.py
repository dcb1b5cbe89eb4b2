"""Issue 25, SIMT fix 7: the small launches of a train step folded into their neighbours.

* the loss: ``xent_forward_backward`` writes dlogits in the forward's launch
  (kernels/loss.cu) -- the bits of ``xent_forward`` then ``xent_backward``;
* a dense layer's backward: ``dense_backward`` (kernels/dense.cu), one launch
  whose blocks compute dW tiles, dx tiles and db rows, dz computed while the
  GEMMs stage it -- the bits of ``dense_backward_act`` + ``gemm_nt`` + ``gemm_tn``.

Checked here: lenet5's fp32 step on the CuPy stand-in is 20 launches and names
the fused kernels; on the emulator (tests/cudasim; and on a GPU, skipped
without one) the fused kernels give the unfused sequence's very bytes on odd
shapes, every activation, with and without bias and input gradient, for any
k-group count per role, float32 and float64, and db equals a NumPy float64 sum;
a lenet5 step through the fused path equals the unfused one bit for bit; bad
arguments are refused with the value named.
"""
from __future__ import annotations

import numpy as np
import pytest

from backends import KERNEL_BACKENDS, use_backend
from gpucnn.cuda import dense, loss

F32, F64 = np.float32, np.float64
DTYPES = [pytest.param(F32, id="f32"), pytest.param(F64, id="f64")]
ACTS = [None, "relu", "sigmoid", "tanh"]


@pytest.fixture(params=KERNEL_BACKENDS)
def device(request, monkeypatch):
    with use_backend(request.param, request, monkeypatch) as dev:
        yield dev


def garbage(device, shape, dtype):
    return device.put(np.full(shape, np.nan, dtype))


# -- the launch count ---------------------------------------------------------------------------


def test_lenet5_fp32_step_is_20_launches_with_the_fused_kernels():
    """27 launches before the folds: xent_backward, and per dense layer dense_backward_act +
    gemm_nt + gemm_tn (lenet5's three dense layers all need dx: conv2 is below the first)."""
    from gpucnn.bench.static import static_step

    names = [k["name"] for k in static_step("lenet5", 64, steps=3, repeats=1)["kernels"]]
    assert len(names) == 20, names
    assert names.count("xent_forward_backward") == 1 and names.count("dense_backward") == 3, names
    assert not {"xent_forward", "xent_backward", "dense_backward_act", "gemm_nt", "gemm_tn"} & set(names), names


# -- dense_backward against the unfused sequence ------------------------------------------------


def _dense_arrays(Fout, Fin, N, act, dtype, key=0):
    rng = np.random.default_rng([Fout, Fin, N, ACTS.index(act), key])
    dy = rng.standard_normal((Fout, N)).astype(dtype)
    if act == "relu":
        saved = rng.integers(-2, 3, size=(Fout, N)).astype(dtype)     # z == 0 exactly included
    elif act == "sigmoid":
        saved = (1 / (1 + np.exp(-rng.standard_normal((Fout, N))))).astype(dtype)
    elif act == "tanh":
        saved = np.tanh(rng.standard_normal((Fout, N))).astype(dtype)
    else:
        saved = None
    x = rng.standard_normal((Fin, N)).astype(dtype)
    W = rng.standard_normal((Fout, Fin)).astype(dtype)
    return dy, saved, x, W


def _unfused(device, dy, saved, x, W, act, has_bias, input_grad, k_groups):
    """Today's sequence: dense_backward_act, gemm_nt, gemm_tn -- (dx, dW, db) as NumPy arrays."""
    ks_w, ks_x = k_groups or (None, None)
    dz, db = dense.dense_backward_act(device.put(dy), None if saved is None else device.put(saved), act,
                                      has_bias=has_bias)
    dW = dense.dense_weight_grad(dz, device.put(x), k_groups=ks_w)
    dx = dense.dense_input_grad(device.put(W), dz, k_groups=ks_x) if input_grad else None
    return tuple(None if a is None else device.get(a) for a in (dx, dW, db))


def _fused(device, dy, saved, x, W, act, has_bias, input_grad, k_groups):
    Fout, N = dy.shape
    Fin = x.shape[0]
    outs = dict(dW_out=garbage(device, (Fout, Fin), dy.dtype),
                dx_out=garbage(device, (Fin, N), dy.dtype) if input_grad else None,
                db_out=garbage(device, (Fout,), dy.dtype) if has_bias else None)
    got = dense.dense_backward(device.put(dy), None if saved is None else device.put(saved), act,
                               device.put(x), device.put(W), has_bias=has_bias, input_grad=input_grad,
                               k_groups=k_groups, **outs)
    return tuple(None if a is None else device.get(a) for a in got)


def _assert_same_bytes(got, want):
    for name, g, w in zip(("dx", "dW", "db"), got, want):
        if w is None:
            assert g is None, name
        else:
            assert g.tobytes() == w.tobytes(), (name, np.nanmax(np.abs(g.astype(F64) - w)))


def _check_dense(device, dims, act, dtype, has_bias=True, input_grad=True, k_groups=None, key=0):
    dy, saved, x, W = _dense_arrays(*dims, act, dtype, key)
    want = _unfused(device, dy, saved, x, W, act, has_bias, input_grad, k_groups)
    got = _fused(device, dy, saved, x, W, act, has_bias, input_grad, k_groups)
    _assert_same_bytes(got, want)
    return dy, saved, got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_dense_backward_bits_equal_the_unfused_sequence(act, dtype, device):
    """Fout 10, Fin 84, N 37: partial tiles in every dimension; db also against NumPy float64."""
    dy, saved, (dx, dW, db) = _check_dense(device, (10, 84, 37), act, dtype)
    dz = dy.astype(F64) if act is None else dy.astype(F64) * {
        "relu": lambda s: np.where(s > 0, 1.0, np.where(s == 0, 0.5, 0.0)),
        "sigmoid": lambda s: s * (1 - s), "tanh": lambda s: 1 - s * s}[act](saved.astype(F64))
    rtol = 1e-5 if dtype == F32 else 1e-12
    np.testing.assert_allclose(db, dz.sum(axis=1), rtol=rtol, atol=rtol * 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims, k_groups", [
    ((3, 5, 1), None),                  # one sample
    ((5, 3, 260), None),                # dW's natural KS = 2 (17 k-slices), dx's 1: the dx role idles a group
    ((9, 35, 70), (3, 1)),              # forced KS per role: groups beyond a role's count idle
    ((33, 40, 20), (1, 4)),             # two row tiles of dW, K = Fout = 33 over 4 groups for dx
], ids=str)
def test_dense_backward_bits_on_odd_shapes_and_k_groups(dims, k_groups, dtype, device):
    _check_dense(device, dims, "relu", dtype, k_groups=k_groups, key=1)


@pytest.mark.parametrize("has_bias, input_grad", [(False, True), (True, False), (False, False)])
def test_dense_backward_without_bias_or_input_grad(has_bias, input_grad, device):
    dx, dW, db = _check_dense(device, (10, 84, 37), "tanh", F32, has_bias, input_grad, key=2)[2]
    assert (db is None) != has_bias and (dx is None) != input_grad


def test_dense_backward_launch_shape():
    """One launch; grid = dW tiles + dx tiles + db rows; block (64, max KS); argument order as the kernel's."""
    from backends import RecordingBuilder
    from gpucnn.cuda import loader

    dy, saved, x, W = _dense_arrays(120, 400, 64, "relu", F32)
    rec = RecordingBuilder()
    with loader.use_module_builder(rec):
        dense.dense_backward(dy, saved, "relu", x, W)
        dense.dense_backward(dy, saved, "relu", x, W, input_grad=False, has_bias=False, k_groups=(2, 3))
    (k1, g1, b1, a1), (k2, g2, b2, a2) = rec.launches
    assert (k1, g1, b1) == ("dense_backward", (4 * 13 + 13 * 2 + 120, 1, 1), (64, 1, 1))
    assert (k2, g2, b2) == ("dense_backward", (4 * 13, 1, 1), (64, 2, 1))     # ks_x unused: not in the block
    assert [int(v) for v in a1[7:]] == [120, 400, 64, 1, 1, 1, 1, 1, 64]


# -- the loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_xent_forward_backward_launches_and_bounds(dtype):
    """1000 samples: one block of 1024 threads (within the kernel's __launch_bounds__); split: + xent_mean."""
    from backends import RecordingBuilder
    from gpucnn.cuda import loader

    logits, labels = np.zeros((10, 1000), dtype), np.zeros(1000, np.int32)
    rec = RecordingBuilder()
    with loader.use_module_builder(rec):
        loss.xent_forward_backward(logits, labels, 0.5)
        loss.xent_forward_backward(logits, labels, 0.5, fused_max_rows=1)
    name = loss._kernel("xent_forward_backward", dtype)
    assert rec.take() == [(name, (1, 1, 1), (1024, 1, 1)), (name, (4, 1, 1), (256, 1, 1)),
                          (loss._kernel("xent_mean", dtype), (1, 1, 1), (32, 1, 1))]
    assert loader.kernel_launch_bounds(name) == 1024


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, path", [(37, {}), (1, {}), (70, {"fused_max_rows": 16, "block": 32})],
                         ids=["N37", "N1", "split"])
def test_xent_forward_backward_bits_equal_the_two_passes(N, path, dtype, device):
    K = 10
    rng = np.random.default_rng([N, 5])
    logits = (rng.standard_normal((K, N)) * 4).astype(dtype)
    labels = rng.integers(0, K, N).astype(np.int64)
    if N > 2:
        labels[1] = K                                       # invalid: NaN loss, NaN column, wrong
        logits[0, 2] = np.nan
    for scale in (1.0, 0.3):
        l0, p0, c0 = loss.xent_forward(device.put(logits), device.put(labels), **path)
        d0 = loss.xent_backward(p0, device.put(labels), scale)
        l1, p1, c1, d1 = loss.xent_forward_backward(device.put(logits), device.put(labels), scale,
                                                     dlogits_out=garbage(device, (K, N), dtype), **path)
        for a, b in ((l0, l1), (p0, p1), (c0, c1), (d0, d1)):
            assert device.get(a).tobytes() == device.get(b).tobytes()


def test_the_train_loss_pass_equals_forward_then_backward(device):
    """SoftmaxCrossEntropy._forward_backward: the loss, count, saved probs and gradient of the two
    public-equivalent passes; afterwards the public backward still answers."""
    from gpucnn import losses

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((10, 13)).astype(F32)
    labels = rng.integers(0, 10, 13)
    a, b = losses.SoftmaxCrossEntropy(check_labels=False), losses.SoftmaxCrossEntropy(check_labels=False)
    value, dy = a._forward_backward(device.put(logits), device.put(labels), 0.5)
    want_value = b._forward(device.put(logits), device.put(labels))
    want_dy = b._backward(0.5)
    assert device.get(value).tobytes() == device.get(want_value).tobytes()
    assert device.get(dy).tobytes() == device.get(want_dy).tobytes()
    assert int(device.get(a.correct)) == int(device.get(b.correct))
    assert device.get(a._backward(0.5)).tobytes() == device.get(want_dy).tobytes()


# -- a lenet5 step -----------------------------------------------------------------------------


def _unfused_dense_backward(dy, saved, input_grad, dW_out, db_out, xp, ws, mode):
    """gpucnn.functional.dense._backward_kernels before the fold (fp32): three launches."""
    from gpucnn.functional.workspace import get

    W, x = saved.W, saved.x
    db = None
    if saved.has_bias:
        db = db_out if db_out is not None else get(ws, "k.db", (W.shape[0],), W.dtype, xp)
    dz, db = dense.dense_backward_act(dy, saved.act_saved, saved.act, db_out=db, has_bias=saved.has_bias,
                                      dz_out=get(ws, "k.dz", dy.shape, dy.dtype, xp))
    dW = dense.dense_weight_grad(dz, x, out=dW_out if dW_out is not None else get(ws, "k.dW", W.shape, W.dtype, xp))
    dx = dense.dense_input_grad(W, dz, out=get(ws, "k.dx", x.shape, dy.dtype, xp)) if input_grad else None
    return dx, dW, db


@pytest.mark.parametrize("device", KERNEL_BACKENDS[:1], indirect=True)
def test_lenet5_step_through_the_folds_equals_the_unfused_step(device, monkeypatch):
    """One lenet5 forward + loss + backward (batch 2, fp32) on the emulator: the loss, the count and
    every parameter gradient have the bits of the step before the folds."""
    import gpucnn as gc
    from gpucnn import losses, models
    from gpucnn.cuda import loader
    from gpucnn.functional import dense as fdense
    from gpucnn.train.trainer import forward_backward

    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 28, 28, 2)).astype(F32)          # batch-last
    y = rng.integers(0, 10, 2)

    def step():
        gc.seed(0)
        model = models.build("lenet5")
        launched = []
        real = loader.launch
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loader, "launch", lambda k, *a, **kw: (launched.append(k), real(k, *a, **kw))[1])
            value, correct = forward_backward(model, losses.SoftmaxCrossEntropy(check_labels=False), x, y, 0.5)
        grads = {n: np.asarray(lay.grads[k]).copy() for n, lay, k in model.named_parameters()}
        return np.asarray(value).tobytes(), int(correct), grads, launched

    value, correct, grads, launched = step()
    assert launched.count("dense_backward") == 3 and "xent_forward_backward" in launched
    monkeypatch.setattr(fdense, "_backward_kernels", _unfused_dense_backward)
    monkeypatch.setattr(losses.SoftmaxCrossEntropy, "_forward_backward",
                        lambda self, out, y, scale, **kw: (self._forward(out, y), self._backward(scale)))
    want_value, want_correct, want_grads, want_launched = step()
    assert "dense_backward" not in want_launched and "xent_backward" in want_launched
    assert (value, correct) == (want_value, want_correct)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        assert g.tobytes() == want_grads[name].tobytes(), name


# -- argument errors ---------------------------------------------------------------------------


def test_bad_arguments_are_refused_with_the_value():
    dy, saved, x, W = _dense_arrays(4, 6, 5, "relu", F32)
    cases = [
        (lambda: dense.dense_backward(dy, None, "relu", x, W), r"act='relu' needs saved"),
        (lambda: dense.dense_backward(dy, saved, "gelu", x, W), r"gelu"),
        (lambda: dense.dense_backward(dy, saved, "relu", x[:, :4].copy(), W), r"\(6, 4\): the batch sizes differ"),
        (lambda: dense.dense_backward(dy, saved, "relu", x, W.T.copy()), r"W has shape \(6, 4\)"),
        (lambda: dense.dense_backward(dy, saved, "relu", x, W, k_groups=(5, 1)), r"ks_w=5"),
        (lambda: dense.dense_backward(dy, saved, "relu", x, W, k_groups=(1, 0)), r"ks_x=0"),
        (lambda: dense.dense_backward(dy, saved, "relu", x, W, red_block=48), r"got 48"),
        (lambda: dense.dense_backward(dy, saved, "relu", x, W, has_bias=False, db_out=np.empty(4, F32)),
         r"db_out given but has_bias is False"),
        (lambda: dense.dense_backward(dy, saved, "relu", x, W, input_grad=False, dx_out=np.empty((6, 5), F32)),
         r"dx_out given but input_grad is False"),
        (lambda: dense.dense_backward(dy, saved, "relu", x, W, dW_out=W), r"may not alias"),
        (lambda: loss.xent_forward_backward(dy, np.zeros(5, np.int32), "2"), r"got str"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            call()
    with pytest.raises(TypeError, match=r"float64"):
        dense.dense_backward(dy, saved, "relu", x.astype(F64), W)
    p = np.zeros((10, 5), F32)
    with pytest.raises(ValueError, match=r"dlogits_out may not alias"):
        loss.xent_forward_backward(p, np.zeros(5, np.int32), 1.0, probs_out=p.copy(), dlogits_out=p)
