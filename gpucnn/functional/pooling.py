"""Max and average pooling over NCHW input (no padding), as function pairs.

Both use ``Ho = floor((H - kh) / sh) + 1`` (same for W); windows may overlap
(stride < kernel).

Max pooling keeps an int32 ``argmax`` holding, per output element, the index
``h * W + w`` of the chosen input element within its (n, c) plane.  Ties go to
the *first* maximum in row-major window order (scan rows, then columns; a later
equal value does not replace it), on every backend; a NaN in a window wins
(NaN propagates, as in PyTorch).  Backward sends each output gradient to its
argmax only (seed 003: "gradient only to the max element"); with overlapping
windows an input element collects the sum over every window that chose it.

Average pooling's backward spreads each output gradient evenly,
``1 / (kh * kw)`` to every element of its window (seed 000's "upsample by
1/4"); it is one ``xp`` code path on every backend.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend
from . import _dispatch

__all__ = ["MaxPool2dSaved", "max_pool2d_forward", "max_pool2d_backward",
           "avg_pool2d_forward", "avg_pool2d_backward"]


class MaxPool2dSaved(NamedTuple):
    """The int32 plane-index argmax (same shape as the output) and the input shape."""

    argmax: object
    x_shape: tuple
    kernel: tuple
    stride: tuple


def _out_hw(x_shape, kernel, stride):
    (H, W), (kh, kw), (sh, sw) = x_shape[2:], kernel, stride
    return (H - kh) // sh + 1, (W - kw) // sw + 1


def _taps(x, u, v, kernel_out, stride):
    (Ho, Wo), (sh, sw) = kernel_out, stride
    return x[:, :, u:u + (Ho - 1) * sh + 1:sh, v:v + (Wo - 1) * sw + 1:sw]


def max_pool2d_forward(x, kernel, stride):
    """Max pooling; returns ``(y, saved)`` (see the module docstring for ties and NaN)."""
    if _dispatch.use_kernels(x):
        from ..cuda import ops

        y, argmax = ops.maxpool2d_forward(x, kernel, stride)
        return y, MaxPool2dSaved(argmax, tuple(x.shape), kernel, stride)
    Ho, Wo = _out_hw(x.shape, kernel, stride)
    (kh, kw), (sh, sw) = kernel, stride
    W = x.shape[3]
    # Scan the window offsets in row-major order; an offset takes over the
    # argmax only if strictly greater (or NaN over a number), so the first
    # maximum wins and NaN propagates.  Each offset is copied to a
    # contiguous array first and the update is branch-free arithmetic:
    # masked copies (np.where/copyto with where=) are ~50x slower here.
    y = k = None
    for u in range(kh):
        for v in range(kw):
            view = _taps(x, u, v, (Ho, Wo), stride)
            if y is None:  # a copy: y is updated in place and must never alias x
                y, k = np.array(view, order="C"), np.zeros(view.shape, dtype=np.int32)
                continue
            r = np.ascontiguousarray(view)
            take = r > y
            take |= (r != r) & (y == y)
            step = np.int32(u * W + v) - k
            step *= take
            k += step
            np.maximum(y, r, out=y)
    rows = np.arange(Ho, dtype=np.int32)[:, None] * np.int32(sh * W)
    cols = np.arange(Wo, dtype=np.int32)[None, :] * np.int32(sw)
    return y, MaxPool2dSaved(k + (rows + cols), tuple(x.shape), kernel, stride)


def max_pool2d_backward(dy, saved: MaxPool2dSaved):
    """Route each output gradient to its window's argmax; returns dL/dx."""
    backend.check_same_device(dy=dy, argmax=saved.argmax)
    if _dispatch.use_kernels(dy):
        from ..cuda import ops

        return ops.maxpool2d_backward(dy, saved.argmax, saved.x_shape, saved.kernel, saved.stride)
    N, C, H, W = saved.x_shape
    plane = np.arange(N * C, dtype=np.int64).reshape(N, C, 1, 1) * (H * W)
    flat = (saved.argmax + plane).ravel()
    (kh, kw), (sh, sw) = saved.kernel, saved.stride
    if sh >= kh and sw >= kw:  # windows disjoint: every input gets at most one gradient
        dx = np.zeros(N * C * H * W, dtype=dy.dtype)
        dx[flat] = dy.ravel()
    else:  # overlapping windows: sum every window's contribution (fixed order)
        dx = np.bincount(flat, weights=dy.ravel(), minlength=N * C * H * W).astype(dy.dtype)
    return dx.reshape(saved.x_shape)


def avg_pool2d_forward(x, kernel, stride):
    """Mean over each window; returns ``(y, x_shape)`` (the shape is all backward needs)."""
    Ho, Wo = _out_hw(x.shape, kernel, stride)
    (kh, kw) = kernel
    xp = backend.get_array_module(x)
    y = xp.zeros(x.shape[:2] + (Ho, Wo), dtype=x.dtype)
    for u in range(kh):  # loop over window offsets only; each term is a strided view
        for v in range(kw):
            y += _taps(x, u, v, (Ho, Wo), stride)
    y *= x.dtype.type(1.0 / (kh * kw))
    return y, tuple(x.shape)


def avg_pool2d_backward(dy, x_shape, kernel, stride):
    """Every element of a window gets ``dy / (kh * kw)``; returns dL/dx."""
    (kh, kw) = kernel
    Ho, Wo = dy.shape[2:]
    xp = backend.get_array_module(dy)
    dx = xp.zeros(x_shape, dtype=dy.dtype)
    g = dy * dy.dtype.type(1.0 / (kh * kw))
    for u in range(kh):
        for v in range(kw):
            _taps(dx, u, v, (Ho, Wo), stride)[...] += g
    return dx
