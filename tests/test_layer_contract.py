"""The layer contract: what a user overrides is what runs, alone and inside containers.

A subclass of a built-in that overrides ``forward`` or ``backward`` runs through
them inside a Sequential (converted at its boundary, unfused, never split into
micro-batches) and says so in the Sequential's repr; a subclass that leaves
them alone keeps fusion.  ``check_backward`` on such a Sequential sees the
override, so a planted wrong backward fails it.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpucnn
from gpucnn import layers as L
from gpucnn.layers.base import runs_batch_last
from gpucnn.testing import check_backward

F64 = np.float64


class DoubleReLU(L.ReLU):
    """The issue's example: twice a ReLU, with a matching backward."""

    def forward(self, x):
        return super().forward(x) * 2

    def backward(self, dy):
        return super().backward(dy * 2)


class WrongBackwardReLU(DoubleReLU):
    """A planted bug: the backward forgets the factor 2 of the forward."""

    def backward(self, dy):
        return L.ReLU.backward(self, dy)


class Doubled(L.Layer):
    """A layer of one's own from the base class: NCHW in, NCHW out."""

    def forward(self, x):
        self._shape = x.shape
        return 2 * x

    def backward(self, dy):
        assert dy.shape == self._shape          # public layout, batch first
        return 2 * dy


class WideConv(L.Conv2D):
    """A subclass that changes nothing in the passes: it must still fuse."""

    def extra_repr(self):
        return "wide " + super().extra_repr()


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_an_override_runs_alone_and_inside_a_sequential():
    x = _x((3, 5))
    alone = DoubleReLU().forward(x)
    inside = L.Sequential(DoubleReLU()).forward(x)
    np.testing.assert_array_equal(alone, 2 * np.maximum(x, 0))
    np.testing.assert_array_equal(inside, alone)


def test_an_override_runs_inside_a_fused_chain_and_a_residual():
    gpucnn.seed(1)
    x = _x((2, 1, 6, 6), 2)
    plain = L.Sequential(L.Conv2D(1, 2, 3, dtype=F64), L.ReLU(), L.MaxPool2D(2))
    doubled = L.Sequential(plain[0], DoubleReLU(), L.MaxPool2D(2))
    np.testing.assert_allclose(doubled.forward(x), 2 * plain.forward(x), rtol=1e-12)
    res = L.Residual(L.Sequential(Doubled()))
    np.testing.assert_allclose(res.forward(x), 3 * x, rtol=1e-12)
    np.testing.assert_allclose(res.backward(np.ones_like(x)), np.full_like(x, 3.0), rtol=1e-12)


def test_check_backward_passes_a_right_override_and_catches_a_planted_bug_inside_a_sequential():
    gpucnn.seed(2)
    x = _x((2, 1, 5, 5), 3)
    good = L.Sequential(L.Conv2D(1, 2, 3, dtype=F64), DoubleReLU(), L.Flatten(), L.Dense(18, 3, dtype=F64))
    check_backward(good, x)
    bad = L.Sequential(L.Conv2D(1, 2, 3, dtype=F64), WrongBackwardReLU(), L.Flatten(), L.Dense(18, 3, dtype=F64))
    with pytest.raises(AssertionError, match="Sequential: dL/d"):
        check_backward(bad, x)


def test_a_layer_of_ones_own_sees_public_arrays_inside_a_sequential():
    x = _x((4, 3, 2, 2))
    net = L.Sequential(L.Flatten(), Doubled(), L.Dense(12, 2, dtype=F64))
    net.forward(x)
    assert net.backward(np.ones((4, 2))).shape == x.shape
    check_backward(L.Sequential(Doubled(), L.Tanh()), x)


def test_which_layers_run_their_own_passes():
    assert runs_batch_last(L.ReLU()) and runs_batch_last(WideConv(1, 1, 1)) and runs_batch_last(L.Sequential())
    assert not runs_batch_last(DoubleReLU()) and not runs_batch_last(Doubled())


def test_fusion_and_own_passes_show_in_repr_and_stages():
    net = L.Sequential(WideConv(1, 2, 3), L.ReLU(), L.MaxPool2D(2), L.Flatten(), L.Dense(2, 2), DoubleReLU())
    assert [s.name for s in net.stages()] == ["WideConv+ReLU+MaxPool2D", "Flatten", "Dense", "DoubleReLU"]
    text = repr(net)
    assert "(0) WideConv(wide 1, 2" in text and "# fused: WideConv+ReLU+MaxPool2D" in text
    assert "(5) DoubleReLU()  # its own forward/backward: not fused, not split into micro-batches" in text
    unfused = L.Sequential(WideConv(1, 2, 3), L.ReLU(), fuse=False)
    assert [s.name for s in unfused.stages()] == ["WideConv", "ReLU"]
    assert "fused" not in repr(unfused) and repr(unfused).endswith("  fuse=False\n)")


def test_fuse_false_computes_the_same():
    gpucnn.seed(3)
    x = _x((2, 1, 8, 8), 4)
    fused = L.Sequential(L.Conv2D(1, 3, 3, dtype=F64), L.ReLU(), L.MaxPool2D(2), L.Flatten(),
                         L.Dense(27, 4, dtype=F64), L.Sigmoid())
    unfused = L.Sequential(*fused.layers, fuse=False)
    dy = _x((2, 4), 5)
    y1, dx1 = fused.forward(x), fused.backward(dy)
    g1 = [g.copy() for g in fused.gradients()]
    y2, dx2 = unfused.forward(x), unfused.backward(dy)
    np.testing.assert_allclose(y2, y1, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dx2, dx1, rtol=1e-12, atol=1e-15)
    for a, b in zip(unfused.gradients(), g1):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    with pytest.raises(TypeError, match="fuse must be True or False, got fuse=1"):
        L.Sequential(L.ReLU(), fuse=1)


def test_a_layer_without_passes_says_what_to_define():
    class Empty(L.Layer):
        pass

    with pytest.raises(NotImplementedError, match=r"Empty must define forward\(self, x\)"):
        Empty().forward(np.zeros((1, 2)))
    with pytest.raises(NotImplementedError, match=r"Empty must define backward\(self, dy\)"):
        Empty().backward(np.zeros((1, 2)))


def test_one_input_grad_flag():
    conv = L.Conv2D(1, 2, 3, dtype=F64)
    x = _x((1, 1, 5, 5))
    conv.forward(x)
    assert conv.backward(np.ones((1, 2, 3, 3))).shape == x.shape
    assert conv.backward(np.ones((1, 2, 3, 3)), input_grad=False) is None
    conv.input_grad = False
    assert conv.backward(np.ones((1, 2, 3, 3))) is None
    for name in ("needs_input_grad", "need_input_grad"):
        assert not hasattr(conv, name)


class OwnHelpers(L.Layer):
    """A layer of one's own whose helpers happen to be named _forward/_backward."""

    def __init__(self, features):
        super().__init__()
        self._add_param("b", np.arange(features, dtype=F64))

    def _forward(self, x, *args):
        return x + self.params["b"]

    def _backward(self, dy, *args):
        return dy

    def forward(self, x):
        return self._forward(x)

    def backward(self, dy):
        return self._backward(dy)


class Patched(DoubleReLU):
    """Redefines the compute below an override of forward: DoubleReLU's forward still runs."""

    def _forward(self, x, epilogue=None):
        return super()._forward(x, epilogue)


def test_what_runs_is_what_forward_resolves_to():
    x = np.zeros((4, 4))
    np.testing.assert_array_equal(L.Sequential(OwnHelpers(4)).forward(x), OwnHelpers(4).forward(x))
    one = np.ones((2, 3))
    np.testing.assert_array_equal(L.Sequential(Patched()).forward(one), Patched().forward(one))
    relu = L.ReLU()
    relu.forward = lambda v: 5 * v                   # an instance's own forward
    np.testing.assert_array_equal(L.Sequential(relu).forward(one), 5 * one)
    assert not runs_batch_last(OwnHelpers(4)) and not runs_batch_last(Patched()) and not runs_batch_last(relu)
    assert runs_batch_last(L.RReLU()) and runs_batch_last(L.Dropout())      # their forward(x, draw) is gpucnn's


class NoInputGrad(Doubled):
    def backward(self, dy):
        return None


class WrongShape(Doubled):
    def backward(self, dy):
        return dy[:, :2]


def test_a_wrong_backward_of_ones_own_is_named_not_the_layer_below():
    net = L.Sequential(L.Dense(3, 3, dtype=F64), NoInputGrad())
    net.forward(np.ones((2, 3)))
    with pytest.raises(TypeError, match=r"NoInputGrad.backward returned NoneType instead of dL/dx, an array of "
                                        r"shape \(2, 3\)"):
        net.backward(np.ones((2, 3)))
    net = L.Sequential(L.Dense(3, 3, dtype=F64), WrongShape())
    net.forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"WrongShape.backward returned dL/dx of shape \(2, 2\), expected \(2, 3\)"):
        net.backward(np.ones((2, 3)))


def test_one_nvtx_range_per_pass_of_an_override(monkeypatch):
    from gpucnn import nvtx
    pushed = []
    monkeypatch.setattr(nvtx, "_push", lambda name: pushed.append(name))
    monkeypatch.setattr(nvtx, "_pop", lambda: None)
    monkeypatch.setattr(nvtx, "_enabled", True)
    net = L.Sequential(DoubleReLU())
    net.forward(np.ones((2, 3)))
    assert pushed == ["Sequential.forward", "DoubleReLU.forward"]


class HalfXent(gpucnn.losses.SoftmaxCrossEntropy):
    """A loss overriding its public passes: half the cross-entropy."""

    def forward(self, logits, labels):
        return super().forward(logits, labels) / 2

    def backward(self, scale=1.0):
        return super().backward(scale / 2)


def test_a_loss_overriding_its_passes_is_what_the_train_step_runs():
    from gpucnn.train.trainer import forward_backward
    gpucnn.seed(5)
    x = _x((1, 1, 28, 28, 6))[0].astype(np.float32)          # batch-last (C, H, W, N)
    y = np.array([0, 1, 2, 3, 4, 5])
    grads = []
    for loss, scale in ((gpucnn.losses.SoftmaxCrossEntropy(), 0.5), (HalfXent(), 1.0)):
        gpucnn.seed(5)
        model = gpucnn.models.build("lenet5")
        value, correct = forward_backward(model, loss, x, y, scale)
        grads.append((float(value), int(correct), [g.copy() for g in model.gradients()]))
    (v_full, c_full, g_full), (v_half, c_half, g_half) = grads
    assert v_half == pytest.approx(v_full / 2, rel=1e-6) and c_half == c_full
    for a, b in zip(g_half, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


class OwnLoss:
    """A loss of one's own, from no gpucnn class: forward(pred, labels) and backward(scale)."""

    def forward(self, pred, labels):
        self.pred = pred
        return (pred ** 2).sum() / (2 * pred.shape[0])

    def backward(self, scale=1.0):
        return scale * self.pred / self.pred.shape[0]


def test_a_loss_of_ones_own_trains():
    from gpucnn.train.trainer import forward_backward
    gpucnn.seed(6)
    model = L.Sequential(L.Flatten(), L.Dense(4, 3, dtype=F64))
    x = _x((4, 5))                                        # batch-last (F, N)
    value, correct = forward_backward(model, OwnLoss(), x, np.zeros(5, np.int64))
    out = model.forward(x.T)
    assert float(value) == pytest.approx(float((out ** 2).sum() / 10))
    np.testing.assert_allclose(model[1].grads["b"], out.sum(axis=0) / 5, rtol=1e-12)
