"""NVTX ranges: stable names, balanced push/pop, a no-op when off or unavailable."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import gpucnn as gc
from gpucnn import nvtx


@pytest.fixture
def recorder(monkeypatch):
    """A fake `nvtx` package that records pushes and pops; ranges enabled."""
    events = []
    fake = types.ModuleType("nvtx")
    fake.push_range = lambda message=None, **kw: events.append(("push", message))
    fake.pop_range = lambda **kw: events.append(("pop", None))
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    monkeypatch.setattr(nvtx, "_push", None)
    monkeypatch.setattr(nvtx, "_pop", None)
    monkeypatch.setattr(nvtx, "_enabled", False)
    assert nvtx.enable(True)
    yield events
    nvtx.enable(False)


def test_off_by_default_emits_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(nvtx, "_enabled", False)
    monkeypatch.setattr(nvtx, "_push", lambda name: calls.append(name))
    monkeypatch.setattr(nvtx, "_pop", lambda: calls.append("pop"))
    gc.layers.ReLU().forward(np.ones((2, 3), np.float32))
    with nvtx.nvtx_range("x"):
        pass
    assert calls == []


def test_layer_loss_and_optimizer_ranges_are_named_and_balanced(recorder):
    gc.seed(0)
    model = gc.models.build("lenet5")
    loss = gc.losses.SoftmaxCrossEntropy()
    opt = gc.optim.SGD(model, lr=0.1)
    x = np.zeros((2, 1, 28, 28), np.float32)
    loss.forward(model.forward(x), np.array([1, 2]))
    model.backward(loss.backward())
    opt.step()
    names = [name for kind, name in recorder if kind == "push"]
    # inside a Sequential the ranges are its stages, named after the layers fused into each
    for expected in ("Sequential.forward", "Conv2D+ReLU+MaxPool2D.forward", "Flatten.forward",
                     "Dense+ReLU.forward", "Dense.forward", "SoftmaxCrossEntropy.forward",
                     "SoftmaxCrossEntropy.backward", "Sequential.backward", "Conv2D+ReLU+MaxPool2D.backward",
                     "Dense+ReLU.backward", "SGD.step"):
        assert expected in names
    assert names.count("Conv2D+ReLU+MaxPool2D.forward") == 2
    depth = 0
    for kind, _ in recorder:
        depth += 1 if kind == "push" else -1
        assert depth >= 0
    assert depth == 0


def test_range_is_popped_when_the_body_raises(recorder):
    with pytest.raises(ValueError):
        gc.layers.Conv2D(1, 2, 3).forward(np.zeros((1, 3, 5, 5), np.float32))
    assert [k for k, _ in recorder] == ["push", "pop"]


def test_no_implementation_means_inactive(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvtx", None)  # import nvtx -> ImportError
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "cupy.cuda", None)
    monkeypatch.setattr(nvtx, "_push", None)
    monkeypatch.setattr(nvtx, "_pop", None)
    try:
        assert nvtx.enable(True) is False
        with nvtx.nvtx_range("anything"):
            pass
    finally:
        nvtx.enable(False)
