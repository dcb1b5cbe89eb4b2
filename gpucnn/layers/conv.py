"""2-D convolution layer (cross-correlation), the seeds' hand-derived backward.

The math -- forward, the seeds' rotated-kernel backward, the fused
activation and pooling epilogue, and where it runs (im2col GEMMs on NumPy,
the CUDA kernels on CuPy) -- lives in :mod:`gpucnn.functional.conv`; this
layer holds the parameters and gradients, checks shapes and calls it once per
pass.  Inside a :class:`~gpucnn.layers.Sequential` a following ReLU / Sigmoid
/ Tanh and MaxPool2D run in this layer's call (its ``_forward`` with an
:class:`~gpucnn.layers.base.Epilogue`).
"""
from __future__ import annotations

import numpy as np

from .. import init as _init
from ..functional import conv as F
from .._utils import check_array, check_param_match, conv_output_size, pair, positive_int, shown_shape
from .base import Epilogue, Layer


class Conv2D(Layer):
    """2-D convolution over NCHW input with OIHW weights (PyTorch layout).

    Args:
        in_channels, out_channels: channel counts (>= 1).
        kernel_size: int or (kh, kw), >= 1.
        stride: int or (sh, sw), >= 1.  padding: int or (ph, pw), >= 0 (zeros).
        bias: learn a per-output-channel bias (default True).
        weight_init: name in :mod:`gpucnn.init` (default ``"he_uniform"``) or a
            callable ``(shape, fan_in, fan_out, dtype) -> ndarray``.
        dtype: float32 (default) or float64.

    Shape:
        x: (N, C_in, H, W) -> y: (N, C_out, Ho, Wo) with
        ``Ho = floor((H + 2*ph - kh) / sh) + 1`` (same for W).

    ``backward`` returns dL/dx and *overwrites* ``grads["W"]`` and
    ``grads["b"]``.  Setting ``input_grad = False`` (first layer of a
    network) skips dL/dx and returns ``None``.

    >>> import numpy as np, gpucnn as gc
    >>> conv = gc.layers.Conv2D(1, 6, kernel_size=5, padding=2)
    >>> conv.forward(np.zeros((2, 1, 28, 28), np.float32)).shape
    (2, 6, 28, 28)
    """


    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 bias=True, weight_init="he_uniform", dtype=np.float32):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride = pair(stride, "stride", 1)
        self.padding = pair(padding, "padding", 0)
        kh, kw = self.kernel_size
        shape = (self.out_channels, self.in_channels, kh, kw)
        fan_in, fan_out = self.in_channels * kh * kw, self.out_channels * kh * kw
        self._add_param("W", _init.initialize(weight_init, shape, fan_in, fan_out, dtype))
        if bias:
            self._add_param("b", np.zeros(self.out_channels, dtype=dtype))
        self._saved = None  # forward keeps functional.conv.Conv2dSaved

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={'b' in self.params}")

    def output_shape(self, x_shape):
        N, C, H, W = x_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (N, self.out_channels, conv_output_size(H, kh, sh, ph, "H"),
                conv_output_size(W, kw, sw, pw, "W"))

    def _forward(self, x, epilogue: Epilogue | None = None):
        """The pass on batch-last ``x (C, H, W, N)``, with the fused activation and max pool of ``epilogue``."""
        check_array(x, "x", 4, "Conv2D", internal=True)
        W, b = self.params["W"], self.params.get("b")
        check_param_match(x, W, "x", "Conv2D")
        if x.shape[0] != self.in_channels:
            raise ValueError(
                f"Conv2D: x has {x.shape[0]} channels (shape {shown_shape(x, True)}) but the layer "
                f"expects in_channels={self.in_channels}"
            )
        self.output_shape(shown_shape(x, True))  # raises, naming the numbers, when the kernel does not fit
        act, pool = (None, None) if epilogue is None else (epilogue.act, epilogue.pool)
        y, self._saved = F.conv2d_forward(x, W, b, self.stride, self.padding, act=act, pool=pool,
                                          ws=self.workspace)
        return self._expect(y)

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        dx, _, _ = F.conv2d_backward(dy, self._saved, input_grad=input_grad,
                                     dW_out=self.grads["W"], db_out=self.grads.get("b"), ws=self.workspace)
        return dx
