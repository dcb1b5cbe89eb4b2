"""Public float64 gradient checkers that raise — never return a bool to forget.

:func:`check_backward` compares a layer's hand-derived ``backward`` with
central differences of the scalar ``L = sum(forward(x) * dy)``:

* with respect to the input, and to every parameter in ``layer.params``;
* element by element (``(L(x + eps e_i) - L(x - eps e_i)) / (2 eps)``) when the
  array has at most ``max_elements`` entries, otherwise along
  ``n_directions`` random unit directions ``d``, comparing
  ``(L(x + eps d) - L(x - eps d)) / (2 eps)`` with ``<grad, d>`` (Chainer's
  variant — one forward pair per direction, so large inputs stay cheap).

It also holds ``backward`` to the Layer contract: it must return dL/dx
(``None`` only from a layer that declares it has none: ``input_grad =
False``, or one asked with ``backward(dy, input_grad=False)``), and a second
forward + backward must give the same gradients as the first (parameter
gradients are overwritten, never accumulated).

:func:`check_loss` does the same for a loss's ``backward()`` with respect to
its first argument.  Both demand float64 everywhere and raise
``AssertionError`` with the worst entries, numeric vs analytic.
"""
from __future__ import annotations

import inspect

import numpy as np

from . import backend

__all__ = ["check_backward", "check_loss", "assert_allclose_grad"]


def _require_f64(**arrays):
    for name, a in arrays.items():
        if a is not None and a.dtype != np.float64:
            raise TypeError(
                f"gradient checks need float64; {name} has dtype {a.dtype} "
                f"(use layer.astype(np.float64) and x.astype(np.float64))"
            )


def assert_allclose_grad(numeric, analytic, what: str, atol: float, rtol: float,
                         labels: tuple[str, str] = ("numeric", "analytic")) -> None:
    """Raise AssertionError listing the worst mismatches between two gradients.

    ``labels`` names the two sides in the message (``numeric=... analytic=...``).
    """
    numeric, analytic = backend.asnumpy(numeric), backend.asnumpy(analytic)
    if numeric.shape != analytic.shape:
        raise AssertionError(f"{what}: {labels[0]} shape {numeric.shape} != {labels[1]} shape {analytic.shape}")
    err = np.abs(numeric - analytic)
    tol = atol + rtol * np.abs(numeric)
    # A NaN/Inf on either side is a failure: NaN compares False with anything
    # and an infinite numeric value would make the tolerance infinite.
    nonfinite = ~(np.isfinite(numeric) & np.isfinite(analytic))
    bad = nonfinite | (err > tol)
    if bad.any():
        score = np.where(nonfinite, np.inf, np.where(bad, err - np.where(np.isfinite(tol), tol, 0), -np.inf))
        order = np.argsort(-score, axis=None, kind="stable")[:5]
        lines = [
            f"  at {tuple(int(i) for i in np.unravel_index(j, numeric.shape))}: "
            f"{labels[0]}={numeric.flat[j]:.10g} {labels[1]}={analytic.flat[j]:.10g} |diff|={err.flat[j]:.3g}"
            for j in order
        ]
        finite_err = err[~nonfinite]
        worst = f"{finite_err.max():.3g}" if finite_err.size else "n/a"
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} entries differ beyond "
            f"atol={atol:g} + rtol={rtol:g}*|{labels[0]}| ({int(nonfinite.sum())} non-finite; "
            f"max finite |diff| {worst}); worst:\n" + "\n".join(lines)
        )


def _numeric_grad(objective, arr, eps, max_elements, n_directions, rng):
    """Central differences of ``objective()`` w.r.t. ``arr`` (perturbed in place).

    Returns ``(numeric, directions)``: the full gradient when ``directions`` is
    None, else the directional derivatives along each row of ``directions``.
    """
    xp = backend.get_array_module(arr)
    flat = arr.reshape(-1)  # a view: arr must be contiguous
    if arr.size <= max_elements:
        g = np.empty(arr.size)
        for i in range(arr.size):
            old = flat[i].copy()
            flat[i] = old + eps
            up = objective()
            flat[i] = old - eps
            down = objective()
            flat[i] = old
            g[i] = (up - down) / (2 * eps)
        return g.reshape(arr.shape), None
    dirs = rng.standard_normal((n_directions, arr.size))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    out = np.empty(n_directions)
    base = arr.copy()
    for k in range(n_directions):
        d = xp.asarray(dirs[k].reshape(arr.shape))
        arr[...] = base + eps * d
        up = objective()
        arr[...] = base - eps * d
        down = objective()
        out[k] = (up - down) / (2 * eps)
    arr[...] = base
    return out, dirs


def _compare(numeric, dirs, analytic, what, atol, rtol):
    analytic = backend.asnumpy(analytic)
    if dirs is not None:
        analytic = dirs @ analytic.reshape(-1)
    assert_allclose_grad(numeric, analytic, what, atol, rtol)


def check_backward(layer, x, dy=None, *, forward=None, eps=1e-6, atol=1e-7, rtol=1e-5,
                   check_params=True, max_elements=2000, n_directions=24, seed=0, input_grad=True):
    """Check ``layer.backward`` (input and parameter gradients) numerically.

    Args:
        layer: a gpucnn layer (or Sequential) whose parameters are float64.
        x: float64 input (a contiguous NumPy or CuPy array).
        dy: output gradient defining ``L = sum(y * dy)``; random if None.
        forward: callable ``x -> y`` to use instead of ``layer.forward`` (e.g.
            RReLU with fixed slopes); must be deterministic.
        eps, atol, rtol: step and tolerances (float64 defaults).
        check_params: also check every ``layer.params`` entry.
        max_elements / n_directions: above this size, use random directions.
        seed: seeds dy and the directions.
        input_grad: ``False`` calls ``layer.backward(dy, input_grad=False)``
            (a Sequential skipping its first layer's dL/dx) and checks the
            parameter gradients only.

    Raises:
        AssertionError: a gradient disagrees (message shows numeric vs
            analytic); ``backward`` returned no dL/dx although the layer
            declares none missing; or a second forward + backward gave other
            gradients than the first (accumulated instead of overwritten).
        TypeError: anything is not float64, or ``input_grad=False`` for a
            layer whose ``backward`` has no ``input_grad`` argument.
    """
    fwd = forward or layer.forward
    _require_f64(x=x, dy=dy, **{f"param {k}": v for k, v in layer_params(layer).items()})
    xp = backend.get_array_module(x)
    rng = np.random.default_rng(seed)
    x = xp.ascontiguousarray(x).copy()
    y = fwd(x)
    if dy is None:
        dy = xp.asarray(rng.standard_normal(y.shape))
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(f"dy shape {tuple(dy.shape)} != output shape {tuple(y.shape)}")
    name = type(layer).__name__
    run_backward = _backward_caller(layer, input_grad)
    dx = run_backward(dy)
    dx = None if dx is None else dx.copy()
    analytic = {key: g.copy() for key, g in layer_grads(layer).items()}
    if dx is None and input_grad and getattr(layer, "input_grad", True):
        raise AssertionError(
            f"{name}: backward returned None instead of dL/dx (a layer without an input gradient says so "
            f"with input_grad = False; check a layer without one with check_backward(..., input_grad=False))")
    fwd(x)
    _check_repeatable(name, dx, analytic, run_backward(dy), layer_grads(layer), atol, rtol)

    def objective():
        return float((fwd(x) * dy).sum())

    if dx is not None:
        num, dirs = _numeric_grad(objective, x, eps, max_elements, n_directions, rng)
        _compare(num, dirs, dx, f"{name}: dL/dx", atol, rtol)
    if check_params:
        for key, p in layer_params(layer).items():
            num, dirs = _numeric_grad(objective, p, eps, max_elements, n_directions, rng)
            _compare(num, dirs, analytic[key], f"{name}: dL/d{key}", atol, rtol)


def _backward_caller(layer, input_grad: bool):
    """``dy -> layer.backward(dy)``, or ``layer.backward(dy, input_grad=False)`` when the input gradient is not wanted."""
    if input_grad:
        return layer.backward
    if "input_grad" not in inspect.signature(layer.backward).parameters:
        raise TypeError(f"input_grad=False: {type(layer).__name__}.backward has no input_grad argument (gpucnn's "
                        f"layers' have); a layer without an input gradient sets input_grad = False")
    return lambda dy: layer.backward(dy, input_grad=False)


def _check_repeatable(name, dx, grads, dx2, grads2, atol, rtol):
    """A second forward + backward must reproduce the first one's dL/dx and (overwritten) parameter gradients."""
    labels = ("first", "second")
    hint = "a second forward + backward differs from the first"
    if (dx is None) != (dx2 is None):
        raise AssertionError(f"{name}: {hint}: backward returned {'None' if dx is None else 'dL/dx'} the first "
                             f"time and {'None' if dx2 is None else 'dL/dx'} the second")
    if dx is not None:
        assert_allclose_grad(dx, dx2, f"{name}: dL/dx, {hint}", atol, rtol, labels)
    for key, g in grads.items():
        assert_allclose_grad(g, grads2[key], f"{name}: dL/d{key}, {hint} (backward must overwrite the "
                             f"parameter gradients, never accumulate them)", atol, rtol, labels)


def check_loss(loss, pred, target, *, eps=1e-6, atol=1e-7, rtol=1e-5, max_elements=2000,
               n_directions=24, seed=0):
    """Check ``loss.backward()`` against central differences of ``loss.forward(pred, target)``."""
    _require_f64(pred=pred)
    xp = backend.get_array_module(pred)
    pred = xp.ascontiguousarray(pred).copy()
    loss.forward(pred, target)
    analytic = loss.backward()

    def objective():
        return float(loss.forward(pred, target))

    num, dirs = _numeric_grad(objective, pred, eps, max_elements, n_directions, np.random.default_rng(seed))
    _compare(num, dirs, analytic, f"{type(loss).__name__}: dL/dpred", atol, rtol)


def layer_params(layer) -> dict:
    """``{qualified name: array}`` for a layer or a Sequential."""
    return {name: lay.params[k] for name, lay, k in layer.named_parameters()}


def layer_grads(layer) -> dict:
    return {name: lay.grads[k] for name, lay, k in layer.named_parameters()}
