"""Weight initialisers: LeCun, Glorot (Xavier) and He (Kaiming), uniform or normal.

Each draws from gpucnn's generator (:func:`gpucnn.random.get_rng`), so
``gpucnn.seed(n)`` fixes them.  Variances:

* LeCun:  Var = 1 / fan_in                (suits tanh / scaled tanh, SELU)
* Glorot: Var = 2 / (fan_in + fan_out)    (suits sigmoid / tanh)
* He:     Var = 2 / fan_in                (suits the ReLU family)

A uniform draw on ``[-a, a]`` has variance ``a**2 / 3``, so ``a = sqrt(3 Var)``.
For a conv weight (O, C, kh, kw): fan_in = C*kh*kw, fan_out = O*kh*kw.
"""
from __future__ import annotations

import math

import numpy as np

from .random import get_rng

_VARIANCE = {
    "lecun": lambda fi, fo: 1.0 / fi,
    "glorot": lambda fi, fo: 2.0 / (fi + fo),
    "he": lambda fi, fo: 2.0 / fi,
}


def _draw(family: str, dist: str, shape, fan_in, fan_out, dtype):
    var = _VARIANCE[family](fan_in, fan_out)
    rng = get_rng()
    if dist == "uniform":
        a = math.sqrt(3.0 * var)
        w = rng.uniform(-a, a, size=shape)
    else:
        w = rng.normal(0.0, math.sqrt(var), size=shape)
    return w.astype(dtype)


def lecun_uniform(shape, fan_in, fan_out, dtype=np.float32):
    return _draw("lecun", "uniform", shape, fan_in, fan_out, dtype)


def lecun_normal(shape, fan_in, fan_out, dtype=np.float32):
    return _draw("lecun", "normal", shape, fan_in, fan_out, dtype)


def glorot_uniform(shape, fan_in, fan_out, dtype=np.float32):
    return _draw("glorot", "uniform", shape, fan_in, fan_out, dtype)


def glorot_normal(shape, fan_in, fan_out, dtype=np.float32):
    return _draw("glorot", "normal", shape, fan_in, fan_out, dtype)


def he_uniform(shape, fan_in, fan_out, dtype=np.float32):
    return _draw("he", "uniform", shape, fan_in, fan_out, dtype)


def he_normal(shape, fan_in, fan_out, dtype=np.float32):
    return _draw("he", "normal", shape, fan_in, fan_out, dtype)


INITIALIZERS = {
    f.__name__: f
    for f in (lecun_uniform, lecun_normal, glorot_uniform, glorot_normal, he_uniform, he_normal)
}


def initialize(init, shape, fan_in, fan_out, dtype=np.float32):
    """Draw a weight array by initialiser name or callable; checks the dtype."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"parameter dtype must be float32 or float64, got dtype={dtype}")
    if callable(init):
        w = np.asarray(init(shape, fan_in, fan_out, dtype))
    elif init in INITIALIZERS:
        w = INITIALIZERS[init](shape, fan_in, fan_out, dtype)
    else:
        raise ValueError(f"unknown initializer {init!r}; known: {sorted(INITIALIZERS)}")
    if w.shape != tuple(shape) or w.dtype != dtype:
        raise ValueError(f"initializer returned {w.shape} {w.dtype}, expected {tuple(shape)} {dtype}")
    return w
