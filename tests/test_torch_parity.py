"""Forward and backward parity with PyTorch (CPU, float64) on randomized shapes.

Every row of the layer registry (tests/layer_cases.py) is compared with its
PyTorch twin (``layer_cases.TWINS``); convolution, pooling and dense layers
also on random configurations, with weights copied into
``torch.nn.functional`` calls.  The backward is torch autograd of
``sum(y * dy)``, so dx and the parameter gradients are compared for the same
upstream gradient.  Tolerances (helpers.TORCH_RTOL/ATOL =
1e-10/1e-12) allow only for a different summation order; batch normalisation
rows state their own (1e-9/1e-11: a variance's square root in the chain).
Also: max-pool tie rule and its int32 plane-index argmax.
"""
from __future__ import annotations

import numpy as np
import pytest
pytest.importorskip("hypothesis", reason="property-based tests need hypothesis (pip install -e '.[dev]')")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import gpucnn  # noqa: E402
from gpucnn import layers as L  # noqa: E402
from gpucnn import losses, models  # noqa: E402
from helpers import assert_torch_close, shuffled_arange, to_torch  # noqa: E402
from layer_cases import params as layer_params  # noqa: E402
from layer_cases import randomize, torch_name, torch_twin  # noqa: E402
from strategies import conv_configs, hyp, pool_configs  # noqa: E402

F64 = np.float64


def torch_backward(y_t, dy, *inputs):
    """Gradients of sum(y * dy) w.r.t. ``inputs`` (torch tensors)."""
    return torch.autograd.grad(y_t, inputs, grad_outputs=to_torch(dy))


# --------------------------------------------------------------------------- #
# Conv2D, pooling, Dense
# --------------------------------------------------------------------------- #


@hyp(40)
@given(cfg=conv_configs(max_kernel=5, max_stride=3, max_pad=2, max_extra=5, max_channels=3),
       seed=st.integers(0, 2**16))
def test_conv2d_parity(cfg, seed):
    rng = np.random.default_rng(seed)
    conv = L.Conv2D(cfg["C"], cfg["O"], cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
                    bias=cfg["bias"], dtype=F64)
    conv.params["W"][...] = rng.standard_normal(conv.params["W"].shape)
    if cfg["bias"]:
        conv.params["b"][...] = rng.standard_normal(cfg["O"])
    x = rng.standard_normal((cfg["N"], cfg["C"], cfg["H"], cfg["W"]))

    y = conv.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = conv.backward(dy)

    x_t, W_t = to_torch(x, True), to_torch(conv.params["W"], True)
    b_t = to_torch(conv.params["b"], True) if cfg["bias"] else None
    y_t = F.conv2d(x_t, W_t, b_t, stride=cfg["stride"], padding=cfg["padding"])
    assert_torch_close(y, y_t, "Conv2D y")
    grads = torch_backward(y_t, dy, *[t for t in (x_t, W_t, b_t) if t is not None])
    assert_torch_close(dx, grads[0], "Conv2D dx")
    assert_torch_close(conv.grads["W"], grads[1], "Conv2D dW")
    if cfg["bias"]:
        assert_torch_close(conv.grads["b"], grads[2], "Conv2D db")


@hyp(40)
@given(cfg=pool_configs(), seed=st.integers(0, 2**16))
def test_maxpool2d_parity(cfg, seed):
    rng = np.random.default_rng(seed)
    x = shuffled_arange((cfg["N"], cfg["C"], cfg["H"], cfg["W"]), rng)  # distinct: no ties
    pool = L.MaxPool2D(cfg["kernel"], cfg["stride"])
    y = pool.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = pool.backward(dy)
    x_t = to_torch(x, True)
    y_t, idx_t = F.max_pool2d(x_t, cfg["kernel"], cfg["stride"], return_indices=True)
    assert_torch_close(y, y_t, "MaxPool2D y")
    assert_torch_close(dx, torch_backward(y_t, dy, x_t)[0], "MaxPool2D dx")
    # torch's return_indices are the same plane index h*W + w
    np.testing.assert_array_equal(pool.argmax, idx_t.numpy())


@hyp(40)
@given(cfg=pool_configs(), seed=st.integers(0, 2**16))
def test_avgpool2d_parity(cfg, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((cfg["N"], cfg["C"], cfg["H"], cfg["W"]))
    pool = L.AvgPool2D(cfg["kernel"], cfg["stride"])
    y = pool.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = pool.backward(dy)
    x_t = to_torch(x, True)
    y_t = F.avg_pool2d(x_t, cfg["kernel"], cfg["stride"])
    assert_torch_close(y, y_t, "AvgPool2D y")
    assert_torch_close(dx, torch_backward(y_t, dy, x_t)[0], "AvgPool2D dx")


@hyp(30)
@given(N=st.integers(1, 5), fin=st.integers(1, 12), fout=st.integers(1, 12), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_dense_parity(N, fin, fout, bias, seed):
    rng = np.random.default_rng(seed)
    dense = L.Dense(fin, fout, bias=bias, dtype=F64)
    dense.params["W"][...] = rng.standard_normal((fout, fin))
    if bias:
        dense.params["b"][...] = rng.standard_normal(fout)
    x = rng.standard_normal((N, fin))
    y = dense.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = dense.backward(dy)
    x_t, W_t = to_torch(x, True), to_torch(dense.params["W"], True)
    b_t = to_torch(dense.params["b"], True) if bias else None
    y_t = F.linear(x_t, W_t, b_t)
    assert_torch_close(y, y_t, "Dense y")
    grads = torch_backward(y_t, dy, *[t for t in (x_t, W_t, b_t) if t is not None])
    assert_torch_close(dx, grads[0], "Dense dx")
    assert_torch_close(dense.grads["W"], grads[1], "Dense dW")
    if bias:
        assert_torch_close(dense.grads["b"], grads[2], "Dense db")


# --------------------------------------------------------------------------- #
# every row of the layer registry (tests/layer_cases.py) against its PyTorch twin
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("case", layer_params(where=lambda c: c.torch))
@hyp(25)
@given(data=st.data())
def test_layer_case_parity(case, data):
    """Output, dL/dx, every parameter gradient and every running buffer after the forward, for a
    row's layer with random parameters (its fixed draw, if stochastic) on one of its shapes."""
    shape = data.draw(st.sampled_from(case.shapes), label="shape")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    layer = randomize(case.make(), rng)
    x = case.draw(rng, shape, case.scale)
    fixed = case.fixed(rng, shape) if case.fixed else {}
    twin = torch_twin(layer, **fixed)            # parameters and buffers as they are before the forward
    y = layer.forward(x, **fixed)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    names = [n for n, _, _ in layer.named_parameters()]
    x_t = to_torch(x, True)
    y_t = twin(x_t)
    grads = torch_backward(y_t, dy, x_t, *[twin.get_parameter(torch_name(n)) for n in names])
    rtol, atol = case.parity_tol
    assert_torch_close(y, y_t, f"{case.id} y", rtol, atol)
    assert_torch_close(dx, grads[0], f"{case.id} dx", rtol, atol)
    for (name, owner, key), g_t in zip(layer.named_parameters(), grads[1:]):
        assert_torch_close(owner.grads[key], g_t, f"{case.id} d{name}", rtol, atol)
    for name, owner, key in layer.named_buffers():
        assert_torch_close(owner.buffers[key], twin.get_buffer(name), f"{case.id} buffer {name}", rtol, atol)


def test_rrelu_training_draws_within_bounds_and_backward_uses_them():
    gpucnn.seed(5)
    layer = L.RReLU(0.1, 0.3)
    x = -np.ones((50, 40))
    y = layer.forward(x)
    slopes = -y
    assert slopes.min() >= 0.1 and slopes.max() <= 0.3
    assert np.unique(slopes).size > 100  # really drawn per element
    # backward reuses the forward's draw (no fresh randomness)
    np.testing.assert_array_equal(layer.backward(np.ones_like(x)), slopes)


# --------------------------------------------------------------------------- #
# losses
# --------------------------------------------------------------------------- #


@hyp(30)
@given(N=st.integers(1, 6), K=st.integers(2, 10), seed=st.integers(0, 2**16))
def test_softmax_cross_entropy_parity(N, K, seed):
    rng = np.random.default_rng(seed)
    logits = 4 * rng.standard_normal((N, K))
    labels = rng.integers(0, K, N)
    ce = losses.SoftmaxCrossEntropy()
    loss = ce.forward(logits, labels)
    grad = ce.backward()
    z_t = to_torch(logits, True)
    loss_t = F.cross_entropy(z_t, to_torch(labels.astype(np.int64)), reduction="mean")
    (g_t,) = torch.autograd.grad(loss_t, z_t)
    assert_torch_close(loss, loss_t, "CE loss")
    assert_torch_close(grad, g_t, "CE dlogits")


@hyp(30)
@given(shape=st.sampled_from([(1, 1), (4, 10), (3, 2, 2, 2), (5, 3)]), seed=st.integers(0, 2**16))
def test_mse_parity(shape, seed):
    rng = np.random.default_rng(seed)
    a, y = rng.standard_normal(shape), rng.standard_normal(shape)
    mse = losses.MSE()
    loss = mse.forward(a, y)
    grad = mse.backward()
    a_t = to_torch(a, True)
    loss_t = 0.5 * ((a_t - to_torch(y)) ** 2).sum() / shape[0]
    (g_t,) = torch.autograd.grad(loss_t, a_t)
    assert_torch_close(loss, loss_t, "MSE loss")
    assert_torch_close(grad, g_t, "MSE dpred")


def test_loss_backward_scale():
    rng = np.random.default_rng(3)
    ce = losses.SoftmaxCrossEntropy()
    ce.forward(rng.standard_normal((3, 4)), np.array([0, 1, 3]))
    np.testing.assert_allclose(ce.backward(scale=2.5), 2.5 * ce.backward(), rtol=1e-14)


# --------------------------------------------------------------------------- #
# whole lenet5 against an equivalent torch model
# --------------------------------------------------------------------------- #


def torch_lenet5():
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    ).double()


def test_lenet5_parity():
    gpucnn.seed(11)
    model = models.build("lenet5", dtype=F64)
    rng = np.random.default_rng(12)
    for _, layer, _ in model.named_parameters():  # non-zero biases too
        if "b" in layer.params:
            layer.params["b"][...] = 0.1 * rng.standard_normal(layer.params["b"].shape)
    tmodel = torch_lenet5()
    tparams = dict(tmodel.named_parameters())
    with torch.no_grad():
        for name, layer, key in model.named_parameters():
            idx = name.split(".")[0]
            tkey = f"{idx}.{'weight' if key == 'W' else 'bias'}"
            tparams[tkey].copy_(to_torch(layer.params[key]))

    x = rng.uniform(0, 1, (3, 1, 28, 28))
    labels = np.array([1, 7, 4])
    loss = models.make_loss("lenet5")
    logits = model.forward(x)
    L_val = loss.forward(logits, labels)
    dx = model.backward(loss.backward())

    x_t = to_torch(x, True)
    logits_t = tmodel(x_t)
    L_t = F.cross_entropy(logits_t, to_torch(labels.astype(np.int64)))
    L_t.backward()
    assert logits.shape == (3, 10)
    assert_torch_close(logits, logits_t, "lenet5 logits")
    assert_torch_close(L_val, L_t, "lenet5 loss")
    assert_torch_close(dx, x_t.grad, "lenet5 dx")
    for name, layer, key in model.named_parameters():
        idx = name.split(".")[0]
        tkey = f"{idx}.{'weight' if key == 'W' else 'bias'}"
        assert_torch_close(layer.grads[key], tparams[tkey].grad, f"lenet5 grad {name}")


# --------------------------------------------------------------------------- #
# max-pool ties: first maximum in row-major window order; int32 plane argmax
# --------------------------------------------------------------------------- #


def test_maxpool_all_equal_window_sends_gradient_to_top_left():
    pool = L.MaxPool2D(2)
    x = np.full((1, 1, 2, 2), 7.0)
    pool.forward(x)
    np.testing.assert_array_equal(pool.backward(np.full((1, 1, 1, 1), 5.0))[0, 0], [[5.0, 0.0], [0.0, 0.0]])
    assert pool.argmax.dtype == np.int32
    assert pool.argmax[0, 0, 0, 0] == 0


def test_maxpool_tie_goes_to_first_in_row_major_order():
    pool = L.MaxPool2D(2)
    x = np.array([[[[1.0, 3.0], [3.0, 2.0]]]])
    pool.forward(x)
    np.testing.assert_array_equal(pool.backward(np.ones((1, 1, 1, 1)))[0, 0], [[0.0, 1.0], [0.0, 0.0]])
    assert pool.argmax[0, 0, 0, 0] == 1  # plane index h*W + w of (0, 1)


def test_maxpool_ties_in_every_window_of_a_larger_map():
    # 4x6 map of 2x2 windows; every window has a tie between two positions
    x = np.array([[0, 9, 5, 1, 2, 2],
                  [9, 0, 5, 1, 1, 0],
                  [3, 3, 0, 0, 4, 1],
                  [3, 3, 0, 0, 4, 4]], dtype=np.float64)[None, None]
    pool = L.MaxPool2D(2)
    pool.forward(x)
    # window (0,0): 9 at (0,1) and (1,0) -> (0,1) = 1;  (0,1): 5 at (0,2),(1,2) -> 2
    # (0,2): 2 at (0,4),(0,5) -> 4;  (1,0): all 3 -> (2,0) = 12;  (1,1): all 0 -> (2,2) = 14
    # (1,2): 4 at (2,4),(3,4),(3,5) -> (2,4) = 16
    np.testing.assert_array_equal(pool.argmax[0, 0], [[1, 2, 4], [12, 14, 16]])
    assert pool.argmax.dtype == np.int32
    dx = pool.backward(np.arange(1.0, 7.0).reshape(1, 1, 2, 3))[0, 0]
    expected = np.zeros((4, 6))
    for g, (h, w) in zip(range(1, 7), [(0, 1), (0, 2), (0, 4), (2, 0), (2, 2), (2, 4)]):
        expected[h, w] = g
    np.testing.assert_array_equal(dx, expected)


def test_maxpool_ties_with_overlapping_windows():
    # 3x3 all-equal map, kernel 2 stride 1: all four windows pick their own top-left
    pool = L.MaxPool2D(2, 1)
    pool.forward(np.ones((1, 1, 3, 3)))
    np.testing.assert_array_equal(pool.argmax[0, 0], [[0, 1], [3, 4]])
    dx = pool.backward(np.ones((1, 1, 2, 2)))[0, 0]
    np.testing.assert_array_equal(dx, [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


@hyp(25)
@given(cfg=pool_configs(), seed=st.integers(0, 2**16))
def test_maxpool_argmax_is_plane_index_of_first_max(cfg, seed):
    """Against a brute-force scan with few distinct values (many ties)."""
    rng = np.random.default_rng(seed)
    N, C, H, W = cfg["N"], cfg["C"], cfg["H"], cfg["W"]
    (kh, kw), (sh, sw) = cfg["kernel"], cfg["stride"]
    x = rng.integers(0, 3, (N, C, H, W)).astype(F64)
    pool = L.MaxPool2D(cfg["kernel"], cfg["stride"])
    y = pool.forward(x)
    assert pool.argmax.dtype == np.int32 and pool.argmax.shape == y.shape
    Ho, Wo = y.shape[2:]
    for n in range(N):
        for c in range(C):
            for i in range(Ho):
                for j in range(Wo):
                    best = None
                    for u in range(kh):  # row-major scan; strict > keeps the first
                        for v in range(kw):
                            h, w = i * sh + u, j * sw + v
                            if best is None or x[n, c, h, w] > x[n, c, best[0], best[1]]:
                                best = (h, w)
                    assert pool.argmax[n, c, i, j] == best[0] * W + best[1]
                    assert y[n, c, i, j] == x[n, c, best[0], best[1]]
