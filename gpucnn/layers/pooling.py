"""Max and average pooling layers over NCHW input (no padding).

``Ho = floor((H - kh) / sh) + 1`` (same for W); ``stride`` defaults to
``kernel_size``; windows may overlap.  The math (first-max ties, NaN
propagation, how overlapping windows sum) is in :mod:`gpucnn.functional.pooling`.
"""
from __future__ import annotations

from .._utils import check_array, conv_output_size, pair
from ..functional import pooling as F
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

    def _check_x(self, x):
        check_array(x, "x", 4, type(self).__name__)
        _pool_output_hw(x.shape, self.kernel_size, self.stride)  # raises when the window does not fit
        self._x_shape, self._dtype = tuple(x.shape), x.dtype

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

    Has no parameters; ``backward`` returns dL/dx.  ``argmax`` (after a
    forward) holds, per output element, the index ``h * W + w`` of the chosen
    input within its (n, c) plane: the first maximum in row-major window order.
    """

    def __init__(self, kernel_size, stride=None):
        super().__init__(kernel_size, stride)
        self._saved = None  # forward keeps functional.pooling.MaxPool2dSaved

    @property
    def argmax(self):
        return None if self._saved is None else self._saved.argmax

    def forward(self, x):
        self._check_x(x)
        y, self._saved = F.max_pool2d_forward(x, self.kernel_size, self.stride)
        return y

    def backward(self, dy):
        self._check_dy(dy)
        return F.max_pool2d_backward(dy, self._saved)


class AvgPool2D(_Pool2D):
    """Mean pooling (seed 000's "mean pool"); keeps only the input shape.

    Args:
        kernel_size: int or (kh, kw) >= 1.  stride: defaults to kernel_size.

    Shape:
        as :class:`MaxPool2D`.  ``backward`` gives each element of a window
        ``dy / (kh * kw)``.
    """

    def forward(self, x):
        self._check_x(x)
        y, _ = F.avg_pool2d_forward(x, self.kernel_size, self.stride)
        return y

    def backward(self, dy):
        self._check_dy(dy)
        return F.avg_pool2d_backward(dy, self._x_shape, self.kernel_size, self.stride)
