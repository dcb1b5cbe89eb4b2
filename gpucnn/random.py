"""One place for randomness: ``gpucnn.seed(n)`` seeds Python, NumPy and CuPy.

Initialisers and RReLU draw from :func:`get_rng`, a ``numpy.random.Generator``
owned by gpucnn, so the same seed gives the same numbers on the same device.
"""
from __future__ import annotations

import random as _pyrandom

import numpy as np

from . import backend

_rng = np.random.default_rng(0)


def seed(value: int) -> None:
    """Seed Python's ``random``, NumPy (global and gpucnn's generator) and CuPy."""
    global _rng
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"seed must be a non-negative int, got seed={value!r}")
    value = int(value)
    _pyrandom.seed(value)
    np.random.seed(value % 2**32)
    _rng = np.random.default_rng(value)
    if backend.cupy is not None:
        try:
            backend.cupy.random.seed(value)
        except Exception:  # no usable device: nothing to seed
            pass


def get_rng() -> np.random.Generator:
    """gpucnn's NumPy generator (re-created by :func:`seed`)."""
    return _rng


def get_state() -> dict:
    """Serializable state of gpucnn's generator (for checkpoints)."""
    return _rng.bit_generator.state


def set_state(state: dict) -> None:
    """Restore a state returned by :func:`get_state`."""
    _rng.bit_generator.state = state
