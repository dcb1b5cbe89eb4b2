"""Float64 gradient checks of every layer, activation, loss and named model.

Every layer configuration of the registry (tests/layer_cases.py) is checked at
each of its input shapes; convolution and pooling also over the shared shape
table (tests/cases.py) and random shapes.

Everything goes through the public checker :func:`gpucnn.testing.check_backward`
(``check_loss`` for losses), which compares the hand-derived backward with
central differences and raises ``AssertionError`` on disagreement.  The last
section shows the checker itself can fail: planted wrong backwards are caught.
"""
from __future__ import annotations

import numpy as np
import pytest
pytest.importorskip("hypothesis", reason="property-based tests need hypothesis (pip install -e '.[dev]')")
from hypothesis import given  # noqa: E402

import gpucnn  # noqa: E402
from cases import CONV_CASES, POOL_CASES, params  # noqa: E402
from gpucnn import layers as L  # noqa: E402
from gpucnn import losses, models  # noqa: E402
from gpucnn.testing import assert_allclose_grad, check_backward, check_loss  # noqa: E402
from helpers import shuffled_arange  # noqa: E402
from layer_cases import shape_params  # noqa: E402
from strategies import conv_configs, hyp, pool_configs  # noqa: E402

F64 = np.float64


def randn(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# --------------------------------------------------------------------------- #
# Conv2D
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("case", params(CONV_CASES, big=False))
@pytest.mark.parametrize("bias", [pytest.param(True, id="bias"), pytest.param(False, id="nobias")])
def test_conv2d_gradients(case, bias):
    gpucnn.seed(1)
    conv = L.Conv2D(case.C, case.O, case.kernel, stride=case.stride, padding=case.padding, bias=bias, dtype=F64)
    if bias:
        conv.params["b"][...] = np.linspace(-0.5, 0.5, case.O)  # non-zero bias
    x = randn((case.N, case.C, case.H, case.W), seed=2)
    check_backward(conv, x)


@hyp(30)
@given(cfg=conv_configs(max_kernel=7, max_stride=3, max_pad=2))
def test_conv2d_gradients_random_shapes(cfg):
    conv = L.Conv2D(cfg["C"], cfg["O"], cfg["kernel"], stride=cfg["stride"],
                    padding=cfg["padding"], bias=cfg["bias"], weight_init="glorot_uniform", dtype=F64)
    x = randn((cfg["N"], cfg["C"], cfg["H"], cfg["W"]), seed=3)
    check_backward(conv, x, max_elements=300, n_directions=12)


def test_conv2d_large_input_uses_random_directions():
    """Above max_elements the checker switches to random directions; still passes."""
    gpucnn.seed(0)
    conv = L.Conv2D(3, 4, 3, stride=2, padding=1, dtype=F64)
    x = randn((2, 3, 9, 11), seed=4)
    check_backward(conv, x, max_elements=50, n_directions=16)


# --------------------------------------------------------------------------- #
# pooling
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("case", params(POOL_CASES, big=False))
def test_maxpool2d_gradients(case):
    pool = L.MaxPool2D(case.kernel, case.stride)
    x = shuffled_arange((case.N, case.C, case.H, case.W), np.random.default_rng(5))
    check_backward(pool, x)


@pytest.mark.parametrize("case", params(POOL_CASES, big=False))
def test_avgpool2d_gradients(case):
    pool = L.AvgPool2D(case.kernel, case.stride)
    check_backward(pool, randn((case.N, case.C, case.H, case.W), seed=6))


@hyp(30)
@given(cfg=pool_configs())
def test_pool_gradients_random_shapes(cfg):
    shape = (cfg["N"], cfg["C"], cfg["H"], cfg["W"])
    x = shuffled_arange(shape, np.random.default_rng(7))
    check_backward(L.MaxPool2D(cfg["kernel"], cfg["stride"]), x)
    check_backward(L.AvgPool2D(cfg["kernel"], cfg["stride"]), x)


# --------------------------------------------------------------------------- #
# every row of the layer registry (tests/layer_cases.py), at each of its input shapes
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("case,shape", shape_params())
def test_layer_case_gradients(case, shape):
    """Dense, Flatten, every activation (PReLU shared and per channel, RReLU and Dropout with their
    fixed draws), BatchNorm, global pooling, Sequential and Residual: one check per row and shape."""
    layer = case.make()
    x = case.x(shape, seed=11)
    fixed = case.forward_kwargs(shape, seed=11)
    forward = (lambda v: layer.forward(v, **fixed)) if fixed else None
    check_backward(layer, x, forward=forward, **case.grad)


# --------------------------------------------------------------------------- #
# losses
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("N,K", [pytest.param(1, 3, id="batch1"), pytest.param(5, 10, id="5x10")])
def test_softmax_cross_entropy_gradient(N, K):
    rng = np.random.default_rng(17)
    logits = 3 * rng.standard_normal((N, K))
    labels = rng.integers(0, K, N)
    check_loss(losses.SoftmaxCrossEntropy(), logits, labels)


@pytest.mark.parametrize("shape", [pytest.param((1, 1), id="1x1"), pytest.param((4, 10), id="4x10"),
                                   pytest.param((2, 3, 2, 2), id="rank4")])
def test_mse_gradient(shape):
    rng = np.random.default_rng(18)
    check_loss(losses.MSE(), rng.standard_normal(shape), rng.standard_normal(shape))


# --------------------------------------------------------------------------- #
# whole models (random-direction variant)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in models.MODELS])
def test_model_gradients(name):
    gpucnn.seed(20)
    # resnet_cifar (1.2M parameters, built for any input) is checked at 1x8x8 to stay cheap
    shape = (1, 8, 8) if name == "resnet_cifar" else (1, 28, 28)
    model = models.build(name, dtype=F64, in_shape=shape)
    x = np.random.default_rng(21).uniform(0, 1, (2,) + shape)
    # max_elements=0: every array (input and every parameter) is checked along
    # random directions -- one forward pair per direction keeps this cheap.
    check_backward(model, x, max_elements=0, n_directions=8)


def test_model_with_loss_end_to_end_gradient():
    """d loss / d x through a model + its loss: chain rule across the boundary."""
    gpucnn.seed(22)
    model = models.build("seed002_c2", dtype=F64)
    loss = models.make_loss("seed002_c2")
    x = np.random.default_rng(23).uniform(0, 1, (2, 1, 28, 28))
    labels = np.array([3, 7])
    loss.forward(model.forward(x), labels)
    dx = model.backward(loss.backward())
    d = np.random.default_rng(24).standard_normal(x.shape)
    eps = 1e-6
    up = float(loss.forward(model.forward(x + eps * d), labels))
    down = float(loss.forward(model.forward(x - eps * d), labels))
    np.testing.assert_allclose((up - down) / (2 * eps), (dx * d).sum(), rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- #
# the checker can fail
# --------------------------------------------------------------------------- #


class WrongSignSigmoid(L.Sigmoid):
    """Planted bug: the derivative's sign is flipped."""

    def backward(self, dy):
        return -super().backward(dy)


class TransposedKernelGradConv(L.Conv2D):
    """Planted bug: dL/dW comes back with its spatial axes transposed."""

    def backward(self, dy):
        dx = super().backward(dy)
        self.grads["W"][...] = self.grads["W"].transpose(0, 1, 3, 2).copy()
        return dx


class OffByOneBiasDense(L.Dense):
    """Planted bug: the bias gradient forgets one sample of the batch."""

    def backward(self, dy):
        dx = super().backward(dy)
        self.grads["b"][...] = dy[1:].sum(axis=0)
        return dx


def test_check_backward_catches_wrong_sign():
    with pytest.raises(AssertionError, match=r"(?s)WrongSignSigmoid: dL/dx.*numeric=.*analytic="):
        check_backward(WrongSignSigmoid(), randn((2, 3), seed=30))


def test_check_backward_catches_transposed_weight_gradient():
    gpucnn.seed(31)
    conv = TransposedKernelGradConv(2, 2, 3, dtype=F64)
    x = randn((1, 2, 5, 5), seed=32)
    with pytest.raises(AssertionError, match=r"(?s)TransposedKernelGradConv: dL/dW.*numeric=.*analytic="):
        check_backward(conv, x)


def test_check_backward_catches_wrong_param_gradient_random_directions():
    gpucnn.seed(33)
    dense = OffByOneBiasDense(3, 4, dtype=F64)
    with pytest.raises(AssertionError, match=r"dL/db"):
        check_backward(dense, randn((3, 3), seed=34), max_elements=0)


class NoInputGradSigmoid(L.Sigmoid):
    """Planted bug: backward forgets to return dL/dx (and says nothing about it)."""

    def backward(self, dy):
        super().backward(dy)
        return None


class AccumulatingDense(L.Dense):
    """Planted bug: backward adds to the parameter gradients instead of overwriting them."""

    def backward(self, dy):
        before = {k: g.copy() for k, g in self.grads.items()}
        dx = super().backward(dy)
        for k, g in before.items():
            self.grads[k][...] += g
        return dx


def test_check_backward_catches_a_missing_input_gradient():
    with pytest.raises(AssertionError, match=r"NoInputGradSigmoid: backward returned None instead of dL/dx"):
        check_backward(NoInputGradSigmoid(), randn((2, 3), seed=40))


def test_check_backward_catches_accumulated_parameter_gradients():
    gpucnn.seed(41)
    with pytest.raises(AssertionError, match=r"(?s)AccumulatingDense: dL/dW, a second forward \+ backward "
                                             r"differs.*never accumulate.*first=.*second="):
        check_backward(AccumulatingDense(3, 4, dtype=F64), randn((2, 3), seed=42))


def test_check_backward_accepts_a_declared_missing_input_gradient():
    gpucnn.seed(43)
    conv = L.Conv2D(1, 2, 3, dtype=F64)
    conv.input_grad = False                # the layer says it has no dL/dx
    check_backward(conv, randn((1, 1, 5, 5), seed=44))
    model = models.build("lenet5", dtype=F64)   # a Sequential asked for none: its first layer skips it
    check_backward(model, np.random.default_rng(45).uniform(0, 1, (2, 1, 28, 28)), max_elements=0,
                   n_directions=4, input_grad=False)
    check_backward(L.Sigmoid(), randn((2, 3), seed=46), input_grad=False)   # any built-in can be asked

    class OwnSigmoid(L.Layer):      # a layer of one's own with backward(dy) only
        def __init__(self):
            super().__init__()
            self.inner = L.Sigmoid()

        def forward(self, x):
            return self.inner.forward(x)

        def backward(self, dy):
            return self.inner.backward(dy)

    with pytest.raises(TypeError, match=r"input_grad=False: OwnSigmoid.backward has no input_grad argument"):
        check_backward(OwnSigmoid(), randn((2, 3), seed=46), input_grad=False)


def test_check_loss_catches_wrong_gradient():
    class HalfMSE(losses.MSE):
        def backward(self, scale=1.0):
            return super().backward(scale) / 2

    rng = np.random.default_rng(35)
    with pytest.raises(AssertionError, match=r"HalfMSE: dL/dpred"):
        check_loss(HalfMSE(), rng.standard_normal((2, 3)), rng.standard_normal((2, 3)))


class NaNForwardSigmoid(L.Sigmoid):
    """Planted bug: forward returns NaN (say, an unstable formula), backward stays finite."""

    def forward(self, x):
        return super().forward(x) * np.nan


def test_check_backward_fails_when_numeric_gradient_is_nan():
    # A NaN numeric gradient can never "agree" with a finite analytic one, but
    # |NaN - a| > tol is False, so it must be rejected explicitly.
    with np.errstate(invalid="ignore"):
        with pytest.raises(AssertionError, match=r"NaNForwardSigmoid: dL/dx"):
            check_backward(NaNForwardSigmoid(), randn((2, 3), seed=38))


@pytest.mark.parametrize("numeric", [
    pytest.param([np.nan, 1.0], id="nan"),
    pytest.param([np.inf, 1.0], id="inf"),      # tol = atol + rtol*|inf| = inf
    pytest.param([-np.inf, 1.0], id="-inf"),
])
def test_assert_allclose_grad_rejects_non_finite_numeric(numeric):
    with pytest.raises(AssertionError, match="w: "):
        assert_allclose_grad(np.array(numeric), np.array([0.5, 1.0]), "w", atol=1e-7, rtol=1e-5)


def test_check_backward_rejects_float32():
    conv = L.Conv2D(1, 1, 3)  # float32 parameters
    with pytest.raises(TypeError, match=r"float64.*float32"):
        check_backward(conv, randn((1, 1, 4, 4), seed=36))
    with pytest.raises(TypeError, match=r"float64.*x has dtype float32"):
        check_backward(L.Sigmoid(), randn((2, 2), seed=37).astype(np.float32))
    with pytest.raises(TypeError, match=r"float64.*pred has dtype float32"):
        check_loss(losses.MSE(), np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32))
