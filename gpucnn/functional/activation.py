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

from .. import backend

__all__ = [
    "sigmoid", "sigmoid_forward", "sigmoid_backward", "tanh_forward", "tanh_backward",
    "scaled_tanh_forward", "scaled_tanh_backward", "relu_forward", "relu_backward",
    "slope_forward", "slope_backward", "prelu_forward", "prelu_backward",
    "softmax_forward", "softmax_backward",
]


def sigmoid(x):
    """Numerically stable logistic function (no overflow for large |x|)."""
    xp = backend.get_array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


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


def relu_forward(x):
    """``max(0, x)``; keeps the derivative factor ``(sign(x) + 1) / 2`` (0, 1/2 or 1)."""
    xp = backend.get_array_module(x)
    factor = (xp.sign(x) + 1) * x.dtype.type(0.5)
    return xp.maximum(x, 0), factor


def relu_backward(dy, factor):
    return dy * factor


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
