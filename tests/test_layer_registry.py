"""The layer registry (tests/layer_cases.py) covers every public layer, and says true things about each.

* every class in ``gpucnn.layers.__all__`` (containers too) has a row, and a
  PyTorch twin unless its rows say it has none, so a new layer cannot skip the
  cross-cutting tests;
* a row's ``batch_independent`` is what the micro-batch split rule
  (:func:`gpucnn.train.workers.may_split`) says of every layer in it, and it holds: the batch cut in two gives the same outputs and
  input gradients, and parameter gradients that sum to the whole batch's.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpucnn.layers
from gpucnn.train import workers
from layer_cases import CASES, TORCH_KEY, params, walk

PUBLIC = [getattr(gpucnn.layers, name) for name in gpucnn.layers.__all__]
LAYER_CLASSES = [cls for cls in PUBLIC if cls is not gpucnn.layers.Layer]   # the base class is no layer of its own


def _row_classes():
    return {type(layer) for case in CASES for layer in walk(case.make())}


def test_every_public_layer_class_has_a_row():
    covered = {type(case.make()) for case in CASES}
    missing = [cls.__name__ for cls in LAYER_CLASSES if cls not in covered]
    assert not missing, (f"no row in tests/layer_cases.py builds {missing}: add one (CONTRIBUTING.md, "
                         f"'Adding a layer')")


def test_every_layer_in_a_row_has_a_pytorch_twin_and_its_parameters_a_torch_name():
    pytest.importorskip("torch")
    from layer_cases import twins

    builders = twins()
    for case in CASES:
        if not case.torch:
            continue
        for layer in walk(case.make()):
            assert type(layer) in builders, f"{case.id}: no PyTorch twin for {type(layer).__name__} in TWINS"
            unnamed = set(layer.params) - set(TORCH_KEY)
            assert not unnamed, f"{case.id}: {type(layer).__name__} parameters {sorted(unnamed)} have no TORCH_KEY"


def test_the_registry_itself():
    assert len({c.id for c in CASES}) == len(CASES)
    for case in CASES:
        assert case.shapes, case.id
        assert all(isinstance(r.error, type) and r.message for r in case.rejects), case.id
    assert gpucnn.layers.Layer not in _row_classes()


@pytest.mark.parametrize("case", params())
def test_batch_independent_matches_the_split_rule(case):
    """The rule the micro-batch split applies (gpucnn.train.workers.may_split) to every layer of the row."""
    layer = case.make()
    why = {type(lay).__name__: workers.may_split(lay) for lay in walk(layer)}
    assert all(w is None for w in why.values()) == case.batch_independent, (
        f"{case.id}: the row says batch_independent={case.batch_independent}, the split rule says {why}")


def _pass(layer, x, dy):
    y = layer.forward(x)
    dx = layer.backward(dy)
    return y, dx, {n: o.grads[k].copy() for n, o, k in layer.named_parameters()}


@pytest.mark.parametrize("case", params(where=lambda c: c.batch_independent))
def test_a_batch_independent_row_gives_the_same_on_any_cut(case):
    shape = max(case.shapes, key=lambda s: s[0])
    if shape[0] < 2:
        shape = (3,) + tuple(shape[1:])
    layer = case.make()
    x = case.x(shape, seed=21)
    dy = np.random.default_rng(22).standard_normal(layer.forward(x).shape)
    y, dx, grads = _pass(layer, x, dy)
    k = shape[0] // 2
    y1, dx1, g1 = _pass(layer, x[:k], dy[:k])
    y2, dx2, g2 = _pass(layer, x[k:], dy[k:])
    np.testing.assert_allclose(np.concatenate([y1, y2]), y, rtol=1e-12, atol=1e-12, err_msg=f"{case.id} y")
    np.testing.assert_allclose(np.concatenate([dx1, dx2]), dx, rtol=1e-12, atol=1e-12, err_msg=f"{case.id} dx")
    for name in grads:
        np.testing.assert_allclose(g1[name] + g2[name], grads[name], rtol=1e-12, atol=1e-12,
                                   err_msg=f"{case.id} d{name}")
