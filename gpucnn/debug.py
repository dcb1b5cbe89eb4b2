"""Opt-in anomaly detection: stop at the first layer that produces NaN or Inf.

Enable with ``GPUCNN_DEBUG=1``, ``gpucnn.debug.enable()`` or, for a block,
``with gpucnn.debug.detect_anomaly(): ...``.  :class:`gpucnn.layers.Sequential`
then checks every layer's output (forward) and input gradient (backward) and
raises :class:`NonFiniteError` naming the layer.  Costs a device sync per
layer, so it is off by default.
"""
from __future__ import annotations

import contextlib
import os

_enabled = os.environ.get("GPUCNN_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


class NonFiniteError(FloatingPointError):
    """A layer produced NaN or Inf while anomaly detection was on."""


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = bool(on)


def is_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def detect_anomaly():
    """Turn anomaly detection on inside the block."""
    global _enabled
    before = _enabled
    _enabled = True
    try:
        yield
    finally:
        _enabled = before


def check_finite(array, where: str) -> None:
    """Raise :class:`NonFiniteError` if ``array`` holds NaN or Inf."""
    from .backend import get_array_module

    xp = get_array_module(array)
    if not bool(xp.isfinite(array).all()):
        n_nan = int(xp.isnan(array).sum())
        n_inf = int(xp.isinf(array).sum())
        raise NonFiniteError(
            f"{where} produced non-finite values ({n_nan} NaN, {n_inf} Inf of "
            f"{array.size}) with shape {tuple(array.shape)}"
        )
