"""Max, average and global average pooling layers (no padding), NCHW in public, batch-last inside.

``Ho = floor((H - kh) / sh) + 1`` (same for W); ``stride`` defaults to
``kernel_size``; windows may overlap.  The math (first-max ties, NaN
propagation, how overlapping windows sum, the fused pool-then-relu) is in
:mod:`gpucnn.functional.pooling`.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from .._utils import check_array, conv_output_size, pair
from ..functional import pooling as F
from .base import Layer


def _pool_output_hw(hw, kernel, stride):
    H, W = hw
    return (conv_output_size(H, kernel[0], stride[0], 0, "H"),
            conv_output_size(W, kernel[1], stride[1], 0, "W"))


class _Pool2D(Layer):
    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else pair(stride, "stride", 1)
        self._x_shape = None       # batch-last

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"

    def output_shape(self, x_shape):
        """Public (N, C, H, W) -> (N, C, Ho, Wo)."""
        return tuple(x_shape[:2]) + _pool_output_hw(x_shape[2:], self.kernel_size, self.stride)

    def _check_x(self, x):
        check_array(x, "x", 4, type(self).__name__, internal=True)
        _pool_output_hw(x.shape[1:3], self.kernel_size, self.stride)  # raises when the window does not fit
        self._x_shape = tuple(x.shape)


class MaxPool2D(_Pool2D):
    """Max pooling; keeps the uint8 tap of each window's maximum and the input shape.

    Args:
        kernel_size: int or (kh, kw) >= 1 (at most 256 elements).
        stride: int or (sh, sw) >= 1; defaults to kernel_size.

    Shape:
        (N, C, H, W) -> (N, C, floor((H - kh)/sh) + 1, floor((W - kw)/sw) + 1).

    Has no parameters; ``backward`` returns dL/dx.  After a forward,
    ``argmax`` is, per output element, the index ``h * W + w`` of the chosen
    input within its (n, c) plane (PyTorch's ``return_indices``): the first
    maximum in row-major window order.
    """


    def __init__(self, kernel_size, stride=None):
        super().__init__(kernel_size, stride)
        if self.kernel_size[0] * self.kernel_size[1] > F.MAX_WINDOW:
            raise ValueError(f"MaxPool2D: kernel_size={self.kernel_size} has more than {F.MAX_WINDOW} elements")
        self._saved = None  # forward keeps functional.pooling.MaxPool2dSaved

    @property
    def argmax(self):
        """int32 (N, C, Ho, Wo) plane indices of the last forward's maxima (None before one)."""
        if self._saved is None:
            return None
        tap = backend.asnumpy(self._saved.tap).astype(np.int32)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        _, Ho, Wo, _ = tap.shape
        W = self._x_shape[2]
        rows = (np.arange(Ho, dtype=np.int32) * sh)[None, :, None, None] + tap // kw
        cols = (np.arange(Wo, dtype=np.int32) * sw)[None, None, :, None] + tap % kw
        return np.ascontiguousarray(np.moveaxis(rows * W + cols, -1, 0))

    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        self._check_x(x)
        y, self._saved = F.max_pool2d_forward(x, self.kernel_size, self.stride, ws=self.workspace)
        return self._expect(y)

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        return F.max_pool2d_backward(dy, self._saved, ws=self.workspace)


class AvgPool2D(_Pool2D):
    """Mean pooling (seed 000's "mean pool"); keeps only the input shape.

    Args:
        kernel_size: int or (kh, kw) >= 1.  stride: defaults to kernel_size.

    Shape:
        as :class:`MaxPool2D`.  ``backward`` gives each element of a window
        ``dy / (kh * kw)``.
    """


    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        self._check_x(x)
        y, _ = F.avg_pool2d_forward(x, self.kernel_size, self.stride)
        return self._expect(y)

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        return F.avg_pool2d_backward(dy, self._x_shape, self.kernel_size, self.stride)


class GlobalAvgPool2D(Layer):
    """(N, C, H, W) -> (N, C): the mean of each channel's plane.  Keeps only the input shape."""


    def __init__(self):
        super().__init__()
        self._x_shape = None

    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        check_array(x, "x", 4, "GlobalAvgPool2D", internal=True)
        y, self._x_shape = F.global_avg_pool_forward(x)
        return self._expect(y)

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        return F.global_avg_pool_backward(dy, self._x_shape)
