"""Inverted dropout as a function pair (one ``xp`` path).

While training ``y = x * mask / (1 - p)`` with ``mask`` Bernoulli(1 - p)
from gpucnn's counter stream (:func:`gpucnn.random.uniform`: the same masks
on NumPy and CuPy, resumed exactly); ``dL/dx = dy * mask / (1 - p)``.  The
identity in evaluation.
"""
from __future__ import annotations

from .. import backend
from .. import random as grandom

__all__ = ["dropout_forward", "dropout_backward"]


def dropout_forward(x, p, training, mask=None):
    """``(y, scale mask or None)``: inverted dropout while training, identity otherwise.

    ``mask`` (same shape as x, 0/1) overrides the random draw (for tests).
    """
    if not training or p == 0:
        return x, None
    xp = backend.get_array_module(x)
    t = x.dtype.type
    if mask is None:
        keep = grandom.uniform(x.shape, xp, x.dtype) >= t(p)
    else:
        keep = mask != 0
    scale = keep.astype(x.dtype)
    scale *= t(1 / (1 - p))
    return x * scale, scale


def dropout_backward(dy, scale):
    return dy if scale is None else dy * scale
