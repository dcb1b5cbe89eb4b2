"""Max and average pooling over batch-last ``(C, H, W, N)`` input (no padding), as function pairs.

Both use ``Ho = floor((H - kh) / sh) + 1`` (same for W); windows may overlap
(stride < kernel).

Max pooling keeps, per output element, the *tap* of the chosen input: its
offset ``u * kw + v`` inside the window, as ``uint8`` (windows of up to 256
elements), on every backend.  Ties go to the *first* maximum in row-major
window order (scan rows, then columns; a later equal value does not replace
it); a NaN in a window wins (the first NaN; NaN propagates, as in PyTorch).
Backward sends each output gradient to its tap only (seed 003: "gradient only
to the max element"); with overlapping windows an input collects the sum over
every window that chose it.

``relu=True`` fuses a preceding ReLU: ``maxpool(relu(z))`` computed as
``relu`` of the window maximum of ``z`` -- a quarter of the ReLU work for 2x2
windows -- with the seeds' rules kept exactly.  With ``m`` the first maximum
of ``z`` and ``k`` its tap: ``m > 0`` -> ``y = m``, tap ``k``, factor 1;
otherwise every tap is <= 0, relu makes them all 0, the first one wins ->
``y = relu(z[tap 0])``, tap 0, factor ``relu'(z[tap 0])`` (1/2 if it is
exactly 0, seed 001); a NaN ``m`` -> ``y`` NaN, the first NaN's tap, factor
NaN.  Backward gives the chosen input ``dy * factor``: relu-then-maxpool's
gradient, except that a NaN input that no window chose gets 0, not NaN.

Average pooling's backward spreads each output gradient evenly,
``1 / (kh * kw)`` to every element of its window (seed 000's "upsample by
1/4"); it is one ``xp`` code path on every backend.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend
from .._utils import output_size
from . import _dispatch
from .workspace import get

__all__ = ["MaxPool2dSaved", "max_pool2d_forward", "max_pool2d_backward",
           "avg_pool2d_forward", "avg_pool2d_backward", "global_avg_pool_forward",
           "global_avg_pool_backward", "pool_output_hw"]

#: Largest window whose taps fit the uint8 tap index.
MAX_WINDOW = 256


class MaxPool2dSaved(NamedTuple):
    """What max-pool backward needs: the uint8 taps, the relu factors (or None), the input shape."""

    tap: object
    factor: object
    x_shape: tuple
    kernel: tuple
    stride: tuple


def pool_output_hw(x_shape, kernel, stride):
    """``(Ho, Wo)`` of a batch-last ``(C, H, W, N)`` input."""
    (H, W), (kh, kw), (sh, sw) = x_shape[1:3], kernel, stride
    return output_size(H, kh, sh), output_size(W, kw, sw)


def _tap_view(x, u, v, out_hw, stride):
    """``x[:, i*sh + u, j*sw + v, :]`` for every output (i, j): a strided view."""
    (Ho, Wo), (sh, sw) = out_hw, stride
    return x[:, u:u + (Ho - 1) * sh + 1:sh, v:v + (Wo - 1) * sw + 1:sw, :]


def max_pool2d_forward(x, kernel, stride, *, relu=False, ws=None):
    """Max pooling (optionally of ``relu(x)``); returns ``(y, saved)`` with ``y`` (C, Ho, Wo, N)."""
    kh, kw = kernel
    if kh * kw > MAX_WINDOW:
        raise ValueError(f"max pooling windows hold at most {MAX_WINDOW} elements (the tap is a uint8), "
                         f"got kernel={tuple(kernel)}")
    if _dispatch.use_kernels(x):
        from ..cuda import pool

        xp = backend.get_array_module(x)
        shape = (x.shape[0],) + pool_output_hw(x.shape, kernel, stride) + (x.shape[3],)
        y, tap, factor = pool.max_pool_forward(
            x, kernel, stride, relu=relu, y_out=get(ws, "k.pool.y", shape, x.dtype, xp),
            tap_out=get(ws, "k.pool.tap", shape, np.uint8, xp),
            factor_out=get(ws, "k.pool.factor", shape, x.dtype, xp) if relu else None)
        return y, MaxPool2dSaved(tap, factor, tuple(x.shape), tuple(kernel), tuple(stride))
    xp = backend.get_array_module(x)
    out_hw = pool_output_hw(x.shape, kernel, stride)
    shape = (x.shape[0],) + out_hw + (x.shape[3],)
    m = get(ws, "max", shape, x.dtype, xp)
    tap = get(ws, "tap", shape, np.uint8, xp)
    take = get(ws, "take", shape, bool, xp)
    code_buf = get(ws, "code", shape, np.uint8, xp)
    first = _tap_view(x, 0, 0, out_hw, stride)
    np.copyto(m, first)
    tap.fill(0)
    # Arithmetic only (masked assignments are far slower): taps are scanned in increasing
    # code order, so "take this tap" is tap = max(tap, take * code).
    for code in range(1, kh * kw):
        t = _tap_view(x, code // kw, code % kw, out_hw, stride)
        np.greater(t, m, out=take)      # strictly greater: the first maximum stays
        np.multiply(take, np.uint8(code), out=code_buf)
        np.maximum(tap, code_buf, out=tap)
        np.maximum(m, t, out=m)         # NaN propagates into m
    nan = np.isnan(m)
    has_nan = bool(nan.any())
    if has_nan:
        _first_nan_taps(x, tap, nan, kernel, out_hw, stride)
    if not relu:
        return m, MaxPool2dSaved(tap, None, tuple(x.shape), tuple(kernel), tuple(stride))
    saved = MaxPool2dSaved(tap, None, tuple(x.shape), tuple(kernel), tuple(stride))
    return _fuse_relu(m, first, take, nan if has_nan else None, saved, x.dtype, xp, ws)


def _fuse_relu(m, first, pos, nan, saved, dtype, xp, ws):
    """relu of the window maxima (see the module docstring); ``pos`` is a spare bool buffer."""
    tap, shape = saved.tap, m.shape
    np.greater(m, 0, out=pos)                    # NaN: False
    keep = pos if nan is None else pos | nan     # windows whose tap stays; the others are all <= 0
    np.multiply(tap, keep, out=tap)              # all <= 0: relu makes them 0, the first (tap 0) wins
    y = get(ws, "y", shape, dtype, xp)
    np.maximum(m, 0, out=y)                      # = relu(z[tap]) for every window, NaN kept
    factor = get(ws, "factor", shape, dtype, xp)
    np.copyto(factor, pos)                       # 1 where m > 0
    half = np.equal(first, 0)                    # relu'(0) = 1/2 (seed 001) for an all-<= 0 window ...
    half &= ~keep                                # ... whose first tap is exactly 0
    factor += half * dtype.type(0.5)
    if nan is not None:
        factor[nan] = dtype.type("nan")
    return y, saved._replace(factor=factor)


def _first_nan_taps(x, tap, nan, kernel, out_hw, stride):
    """In windows holding a NaN, the tap of the first NaN (rare: the slow path)."""
    kh, kw = kernel
    found = np.zeros_like(nan)
    for code in range(kh * kw):
        t = _tap_view(x, code // kw, code % kw, out_hw, stride)
        hit = np.isnan(t) & nan & ~found
        tap[hit] = code
        found |= hit


def max_pool2d_backward(dy, saved: MaxPool2dSaved, *, ws=None):
    """Route each output gradient (times the relu factor) to its window's tap; returns dL/dx."""
    backend.check_same_device(dy=dy, tap=saved.tap)
    if _dispatch.use_kernels(dy):
        from ..cuda import pool

        return pool.max_pool_backward(dy, saved.tap, saved.factor, saved.x_shape, saved.kernel, saved.stride,
                                      out=get(ws, "k.pool.dx", saved.x_shape, dy.dtype,
                                              backend.get_array_module(dy)))
    xp = backend.get_array_module(dy)
    (kh, kw), (sh, sw) = saved.kernel, saved.stride
    g = dy if saved.factor is None else dy * saved.factor
    out_hw = dy.shape[1:3]
    disjoint = sh >= kh and sw >= kw
    # Disjoint windows: every covered input is written on every call, so the
    # uncovered ones (borders, gaps) keep the zeros the buffer was made with.
    dx = get(ws, "dx_disjoint" if disjoint else "dx", saved.x_shape, dy.dtype, xp, fill=0)
    if not disjoint:
        dx.fill(0)
    chosen = get(ws, "chosen", dy.shape, bool, xp)
    exact = not bool(np.isfinite(g).all())   # inf/NaN * 0 is NaN: then only where() keeps zeros zero
    for code in range(kh * kw):
        view = _tap_view(dx, code // kw, code % kw, out_hw, saved.stride)
        np.equal(saved.tap, code, out=chosen)
        if exact:
            part = np.where(chosen, g, g.dtype.type(0))
            if disjoint:
                view[...] = part
            else:
                view += part
        elif disjoint:
            np.multiply(g, chosen, out=view)
        else:
            view += g * chosen
    return dx


def avg_pool2d_forward(x, kernel, stride):
    """Mean over each window; returns ``(y, x_shape)`` (the shape is all backward needs)."""
    out_hw = pool_output_hw(x.shape, kernel, stride)
    (kh, kw) = kernel
    xp = backend.get_array_module(x)
    y = xp.zeros((x.shape[0],) + out_hw + (x.shape[3],), dtype=x.dtype)
    for u in range(kh):  # loop over window offsets only; each term is a strided view
        for v in range(kw):
            y += _tap_view(x, u, v, out_hw, stride)
    y *= x.dtype.type(1.0 / (kh * kw))
    return y, tuple(x.shape)


def avg_pool2d_backward(dy, x_shape, kernel, stride):
    """Every element of a window gets ``dy / (kh * kw)``; returns dL/dx."""
    (kh, kw) = kernel
    out_hw = dy.shape[1:3]
    xp = backend.get_array_module(dy)
    dx = xp.zeros(x_shape, dtype=dy.dtype)
    g = dy * dy.dtype.type(1.0 / (kh * kw))
    for u in range(kh):
        for v in range(kw):
            _tap_view(dx, u, v, out_hw, stride)[...] += g
    return dx


def global_avg_pool_forward(x):
    """``(C, H, W, N) -> (C, N)``: the mean of each plane."""
    return x.mean(axis=(1, 2)), tuple(x.shape)


def global_avg_pool_backward(dy, x_shape):
    xp = backend.get_array_module(dy)
    C, H, W, N = x_shape
    out = xp.empty(x_shape, dtype=dy.dtype)
    out[...] = (dy * dy.dtype.type(1.0 / (H * W)))[:, None, None, :]
    return out
