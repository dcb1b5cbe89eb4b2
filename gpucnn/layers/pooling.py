"""Max and average pooling over NCHW input (no padding).

Both use ``Ho = floor((H - kh) / sh) + 1`` (same for W); ``stride`` defaults to
``kernel_size``.  Windows may overlap (stride < kernel).

Max pooling keeps an int32 ``argmax`` holding, per output element, the index
``h * W + w`` of the chosen input element within its (n, c) plane.  Ties go to
the *first* maximum in row-major window order (scan rows, then columns; a later
equal value does not replace it), on every backend; a NaN in a window wins
(NaN propagates, as in PyTorch).  Backward sends each output gradient to its
argmax only (seed 003: "gradient only to the max element"); with overlapping
windows an input element collects the sum over every window that chose it.

Average pooling's backward spreads each output gradient evenly,
``1 / (kh * kw)`` to every element of its window (seed 000's "upsample by 1/4").
"""
from __future__ import annotations

import numpy as np

from .. import backend
from .._utils import check_array, conv_output_size, pair
from .base import Layer


def _pool_output_hw(x_shape, kernel, stride):
    H, W = x_shape[2:]
    return (conv_output_size(H, kernel[0], stride[0], 0, "H"),
            conv_output_size(W, kernel[1], stride[1], 0, "W"))


class _Pool2D(Layer):
    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else pair(stride, "stride", 1)
        self._x_shape = None
        self._dtype = None

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"

    def output_shape(self, x_shape):
        return tuple(x_shape[:2]) + _pool_output_hw(x_shape, self.kernel_size, self.stride)

    def _check_dy(self, dy):
        self._check_forward_called(self._x_shape)
        name = type(self).__name__
        check_array(dy, "dy", 4, f"{name}.backward")
        expected = self.output_shape(self._x_shape)
        if tuple(dy.shape) != expected:
            raise ValueError(f"{name}.backward: dy has shape {tuple(dy.shape)}, expected {expected}")
        if dy.dtype != self._dtype:
            raise TypeError(f"{name}.backward: dy has dtype {dy.dtype} but forward ran in {self._dtype}")


class MaxPool2D(_Pool2D):
    """Max pooling; keeps the int32 argmax and the input shape for backward.

    Args:
        kernel_size: int or (kh, kw) >= 1.
        stride: int or (sh, sw) >= 1; defaults to kernel_size.

    Shape:
        (N, C, H, W) -> (N, C, floor((H - kh)/sh) + 1, floor((W - kw)/sw) + 1).

    Has no parameters; ``backward`` returns dL/dx.
    """

    def __init__(self, kernel_size, stride=None):
        super().__init__(kernel_size, stride)
        self.argmax = None  # forward keeps: int32 argmax (plane index) and x's shape

    def forward(self, x):
        check_array(x, "x", 4, "MaxPool2D")
        Ho, Wo = _pool_output_hw(x.shape, self.kernel_size, self.stride)
        self._x_shape, self._dtype = x.shape, x.dtype
        if backend.is_cupy(x):
            from ..cuda import ops

            y, self.argmax = ops.maxpool2d_forward(x, self.kernel_size, self.stride)
            return y
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        W = x.shape[3]
        # Scan the window offsets in row-major order; an offset takes over the
        # argmax only if strictly greater (or NaN over a number), so the first
        # maximum wins and NaN propagates.  Each offset is copied to a
        # contiguous array first and the update is branch-free arithmetic:
        # masked copies (np.where/copyto with where=) are ~50x slower here.
        y = k = None
        for u in range(kh):
            for v in range(kw):
                view = x[:, :, u : u + (Ho - 1) * sh + 1 : sh, v : v + (Wo - 1) * sw + 1 : sw]
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
        self.argmax = k + (rows + cols)
        return y

    def backward(self, dy):
        self._check_dy(dy)
        backend.check_same_device(dy=dy, argmax=self.argmax)
        if backend.is_cupy(dy):
            from ..cuda import ops

            return ops.maxpool2d_backward(dy, self.argmax, self._x_shape, self.kernel_size, self.stride)
        N, C, H, W = self._x_shape
        plane = np.arange(N * C, dtype=np.int64).reshape(N, C, 1, 1) * (H * W)
        flat = (self.argmax + plane).ravel()
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        if sh >= kh and sw >= kw:  # windows disjoint: every input gets at most one gradient
            dx = np.zeros(N * C * H * W, dtype=dy.dtype)
            dx[flat] = dy.ravel()
        else:  # overlapping windows: sum every window's contribution (fixed order)
            dx = np.bincount(flat, weights=dy.ravel(), minlength=N * C * H * W).astype(dy.dtype)
        return dx.reshape(self._x_shape)


class AvgPool2D(_Pool2D):
    """Mean pooling (seed 000's "mean pool"); keeps only the input shape.

    Args:
        kernel_size: int or (kh, kw) >= 1.  stride: defaults to kernel_size.

    Shape:
        as :class:`MaxPool2D`.  ``backward`` gives each element of a window
        ``dy / (kh * kw)``.
    """

    def forward(self, x):
        check_array(x, "x", 4, "AvgPool2D")
        Ho, Wo = _pool_output_hw(x.shape, self.kernel_size, self.stride)
        self._x_shape, self._dtype = x.shape, x.dtype
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        xp = backend.get_array_module(x)
        y = xp.zeros(x.shape[:2] + (Ho, Wo), dtype=x.dtype)
        for u in range(kh):  # loop over window offsets only; each term is a strided view
            for v in range(kw):
                y += x[:, :, u : u + (Ho - 1) * sh + 1 : sh, v : v + (Wo - 1) * sw + 1 : sw]
        y *= x.dtype.type(1.0 / (kh * kw))
        return y

    def backward(self, dy):
        self._check_dy(dy)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        Ho, Wo = dy.shape[2:]
        xp = backend.get_array_module(dy)
        dx = xp.zeros(self._x_shape, dtype=dy.dtype)
        g = dy * dy.dtype.type(1.0 / (kh * kw))
        for u in range(kh):
            for v in range(kw):
                dx[:, :, u : u + (Ho - 1) * sh + 1 : sh, v : v + (Wo - 1) * sw + 1 : sw] += g
        return dx
