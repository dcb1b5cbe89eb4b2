"""Element-wise activations of seed 002 (and seed 001's ReLU and softmax).

One ``xp`` code path each (NumPy and CuPy alike).  Every ``*_forward``
returns ``(y, saved)`` where ``saved`` is only what the derivative needs:
Sigmoid/Tanh/ScaledTanh/Softmax keep their output, ReLU keeps its derivative
factor, the leaky family keeps the slope applied to each element, PReLU keeps
its input.

==================  ===========================  ==================================
op                  f(z)                         f'(z)
==================  ===========================  ==================================
sigmoid             1 / (1 + e^-z)               f (1 - f)
tanh                tanh z                       1 - f^2
scaled_tanh         A tanh(B z) (1.7159, 0.6666) A B (1 - tanh^2(B z))
relu                max(0, z)                    1 (z > 0), 1/2 (z = 0, seed 001), 0
leaky_relu          z (z >= 0), s z (z < 0)      1 or s
prelu               z (z > 0), a z               1 or a;  dL/da = sum dy z [z <= 0]
rrelu               z (z >= 0), r z, r~U(l, u)   1 or r; eval: r = (l + u) / 2
softmax (axis 1)    e^z_i / sum_k e^z_k          J = diag(f) - f f^T
==================  ===========================  ==================================

Seed 002 writes the leaky ReLUs as ``z / a`` for z < 0 with a in (1, inf); our
``negative_slope`` (``s``) is ``1 / a``.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from .. import threads

__all__ = [
    "FUSED_ACTIVATIONS", "act_forward", "act_backward",
    "sigmoid", "sigmoid_forward", "sigmoid_backward", "tanh_forward", "tanh_backward",
    "scaled_tanh_forward", "scaled_tanh_backward", "relu_forward", "relu_backward",
    "slope_forward", "slope_backward", "prelu_forward", "prelu_backward",
    "softmax_forward", "softmax_backward",
]


def sigmoid(x, out=None):
    """Numerically stable logistic function (no overflow for large |x|), into ``out`` when given.

    With ``e = exp(-|x|)``: ``1 / (1 + e)`` for ``x >= 0`` and ``e / (1 + e)``
    for ``x < 0``.  The numerator is picked branch-free as ``max(e, x >= 0)``
    (``e <= 1``; NaN propagates), not with a masked select: the same bits as
    ``where(x >= 0, 1 / (1 + e), e / (1 + e))`` in seven passes and one
    temporary, faster than the select on a CPU.
    """
    xp = backend.get_array_module(x)
    nonneg = x >= 0                      # first, so that ``out`` may be ``x`` itself
    y = xp.empty_like(x) if out is None else out
    xp.abs(x, out=y)
    xp.negative(y, out=y)
    xp.exp(y, out=y)                     # e
    d = y + 1                            # 1 + e
    xp.maximum(y, nonneg, out=y)         # numerator: 1 where x >= 0, else e
    xp.divide(y, d, out=y)
    return y


def sigmoid_forward(x):
    y = sigmoid(x)
    return y, y


def sigmoid_backward(dy, y):
    return dy * y * (1 - y)


def tanh_forward(x):
    xp = backend.get_array_module(x)
    y = xp.tanh(x)
    return y, y


def tanh_backward(dy, y):
    return dy * (1 - y * y)


def scaled_tanh_forward(x, A, B):
    """``A * tanh(B * x)``; keeps ``t = tanh(B x)``."""
    xp = backend.get_array_module(x)
    t = xp.tanh(x * x.dtype.type(B))
    return t * x.dtype.type(A), t


def scaled_tanh_backward(dy, t, A, B):
    return dy * dy.dtype.type(A * B) * (1 - t * t)


#: NumPy arrays of at least this many elements run ReLU in row blocks over gpucnn's threads.
THREADED_SIZE = 1 << 16


def _row_blocks(x):
    """Row blocks (first axis) of a NumPy array big enough to share, else None."""
    if type(x) is not np.ndarray or x.size < THREADED_SIZE or x.ndim == 0 or threads.get_num_threads() == 1:
        return None
    return threads.split(x.shape[0], parts=threads.get_num_threads())


def relu_forward(x, out=None):
    """``max(0, x)`` (NaN propagates); keeps ``x`` for the derivative."""
    xp = backend.get_array_module(x)
    blocks = _row_blocks(x)
    if blocks is None or len(blocks) == 1:
        return xp.maximum(x, 0, out=out), x
    out = np.empty_like(x) if out is None else out
    threads.run_each(lambda a, b: np.maximum(x[a:b], 0, out=out[a:b]), blocks)
    return out, x


def _relu_backward(dy, x, out):
    # relu'(x) = heaviside(x, 1/2): exactly 0, 1/2 or 1, NaN for NaN, 1/2 for -0.0
    xp = backend.get_array_module(x)
    if xp is np:
        # as (sign(x) + 1) / 2, in passes four times faster than NumPy's heaviside
        out = np.sign(x, out=out)
        out += 1
        out *= x.dtype.type(0.5)
    else:
        # CuPy's heaviside is one pass, and CuPy 13's sign gives 0, not NaN, for NaN
        out = xp.heaviside(x, x.dtype.type(0.5), out=out)
    out *= dy
    return out


def relu_backward(dy, x, out=None):
    """``dy * relu'(x)`` with ``relu' = 1 (x > 0), 1/2 (x == 0, seed 001), 0 (x < 0)``, NaN for NaN.

    Element-wise, so a large NumPy array's row blocks run on gpucnn's threads with the same bits."""
    blocks = _row_blocks(x)
    if blocks is None or len(blocks) == 1 or type(dy) is not np.ndarray:
        return _relu_backward(dy, x, out)
    out = np.empty_like(x) if out is None else out
    threads.run_each(lambda a, b: _relu_backward(dy[a:b], x[a:b], out[a:b]), blocks)
    return out


def slope_forward(x, negative):
    """``x`` where ``x >= 0``, ``negative * x`` below; ``negative`` is a scalar or an array
    broadcasting against x (LeakyReLU's slope, RReLU's draws).  Keeps the slope per element."""
    xp = backend.get_array_module(x)
    one = x.dtype.type(1)
    if not hasattr(negative, "shape"):
        negative = x.dtype.type(negative)
    slope = xp.where(x >= 0, one, negative)
    return x * slope, slope


def slope_backward(dy, slope):
    return dy * slope


def prelu_forward(x, a):
    """``x`` where ``x > 0``, ``a * x`` otherwise; ``a`` already shaped to broadcast.  Keeps x."""
    xp = backend.get_array_module(x)
    return xp.where(x > 0, x, x * a), x


def prelu_backward(dy, x, a, channel_axes):
    """``(dx, da)``: ``da`` sums ``dy * x * [x <= 0]`` over ``channel_axes`` (all axes but the
    channel one; every axis for a shared slope)."""
    xp = backend.get_array_module(dy)
    neg = x <= 0
    g = xp.where(neg, dy * x, 0)
    da = g.sum(axis=channel_axes)
    return xp.where(neg, dy * a, dy), da


def softmax_forward(x, axis):
    xp = backend.get_array_module(x)
    z = x - x.max(axis=axis, keepdims=True)
    e = xp.exp(z)
    y = e / e.sum(axis=axis, keepdims=True)
    return y, y


def softmax_backward(dy, y, axis):
    return y * (dy - (dy * y).sum(axis=axis, keepdims=True))


#: Activations a convolution or dense layer runs in its epilogue.
FUSED_ACTIVATIONS = ("relu", "sigmoid", "tanh")


def act_forward(name, z, out=None):
    """``(y, saved)`` of a fused activation (``name`` None: ``(z, None)``), into ``out`` when given."""
    if name is None:
        return z, None
    if name == "relu":
        return relu_forward(z, out)
    xp = backend.get_array_module(z)
    if name == "sigmoid":
        y = sigmoid(z, out=out)
        return y, y
    if name == "tanh":
        y = xp.tanh(z, out=out)
        return y, y
    raise ValueError(f"act must be None or one of {FUSED_ACTIVATIONS}, got act={name!r}")


def act_backward(name, g, saved, out=None):
    """dL/dz of a fused activation from dL/dy (``saved`` is what :func:`act_forward` returned).

    The same arithmetic as the activation layers' own backward, so a fused
    network and an unfused one give the same bits.
    """
    if name == "relu":
        return relu_backward(g, saved, out)
    if name == "sigmoid":
        r = sigmoid_backward(g, saved)
    elif name == "tanh":
        r = tanh_backward(g, saved)
    else:
        raise ValueError(f"act must be one of {FUSED_ACTIVATIONS}, got act={name!r}")
    if out is None:
        return r
    out[...] = r
    return out
