"""2-D convolution (cross-correlation), with the seeds' hand-derived backward.

Forward is a cross-correlation, as in PyTorch::

    y[n, o, i, j] = b[o] + sum_{c,u,v} xpad[n, c, i*sh + u, j*sw + v] * W[o, c, u, v]

The seeds (000, 002, 003) write the same layer as a *convolution* with the
180°-rotated kernel, ``x * rot180(k)``; our ``W`` is that ``rot180(k)``, so the
weights exchange with PyTorch without a flip.  Backward follows the seeds:

* ``dL/dW = xpad (valid-correlate) dy`` — seed 003's ``conv(X, dL/dZ)``, i.e.
  ``dC (valid) conv rot(S)`` in seed 000's notation;
* ``dL/db[o] = sum dy[:, o]``;
* ``dL/dx = full-padded dy (dilated by the stride) convolved with rot180(W)``
  — seed 003's ``conv(padded(dL/dZ), 180° rotated K)``.  Rows and columns of
  the padded input that no window reaches (when ``(H + 2p - k)`` is not a
  multiple of the stride) get zero gradient, then the padding is cropped.

On NumPy every pass is one GEMM over an im2col matrix built in a
batch-innermost (C, H, W, N) layout (``as_strided`` view, one copy), so
window rows are long contiguous runs; dL/dx uses the scatter (col2im) form of
the same linear map, which is faster on a CPU than materialising the padded,
dilated gradient.  On CuPy they dispatch to the hand-written kernels in
``kernels/conv2d_*.cu`` through :mod:`gpucnn.cuda.ops`.
"""
from __future__ import annotations

import numpy as np

from .. import backend, init as _init
from .._utils import check_array, check_param_match, conv_output_size, pair, positive_int
from .base import Layer


def _as_strided(xp, a, shape, strides):
    return xp.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)


def to_chwn(x, padding=(0, 0)):
    """NCHW -> zero-padded, C-contiguous (C, H + 2ph, W + 2pw, N).

    The NumPy convolution works in this layout: the batch is the innermost
    axis, so every window row is one long contiguous run and a whole layer is
    a single GEMM instead of N small ones.
    """
    xp = backend.get_array_module(x)
    N, C, H, W = x.shape
    ph, pw = padding
    out = xp.zeros((C, H + 2 * ph, W + 2 * pw, N), dtype=x.dtype)
    out[:, ph : ph + H, pw : pw + W, :] = x.transpose(1, 2, 3, 0)
    return out


def im2col(x_chwn, kernel, stride, out_hw):
    """Column matrix of a padded (C, Hp, Wp, N) array.

    Returns:
        (C*kh*kw, Ho*Wo*N) C-contiguous array with
        ``cols[(c, u, v), (i, j, n)] = x[c, i*sh + u, j*sw + v, n]``, so
        ``W.reshape(O, -1) @ cols`` is the whole layer's correlation.
    """
    xp = backend.get_array_module(x_chwn)
    C, _, _, N = x_chwn.shape
    (kh, kw), (sh, sw), (Ho, Wo) = kernel, stride, out_hw
    s0, s1, s2, s3 = x_chwn.strides
    win = _as_strided(xp, x_chwn, (C, kh, kw, Ho, Wo, N), (s0, s1, s2, s1 * sh, s2 * sw, s3))
    return win.reshape(C * kh * kw, Ho * Wo * N)


def col2im(cols, padded_chwn_shape, kernel, stride, out_hw):
    """Adjoint of :func:`im2col`: scatter-add columns into a (C, Hp, Wp, N) array.

    Loops over the kh*kw kernel offsets only; each step adds one strided view.
    """
    xp = backend.get_array_module(cols)
    C, Hp, Wp, N = padded_chwn_shape
    (kh, kw), (sh, sw), (Ho, Wo) = kernel, stride, out_hw
    cols = cols.reshape(C, kh, kw, Ho, Wo, N)
    out = xp.zeros(padded_chwn_shape, dtype=cols.dtype)
    for u in range(kh):
        for v in range(kw):
            out[:, u : u + (Ho - 1) * sh + 1 : sh, v : v + (Wo - 1) * sw + 1 : sw, :] += cols[:, u, v]
    return out


def correlate_valid(x, w):
    """Stride-1 valid cross-correlation of NCHW ``x`` with OIHW ``w`` (one GEMM)."""
    xp = backend.get_array_module(x, w)
    N, _, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = H - kh + 1, W - kw + 1
    y = w.reshape(O, -1) @ im2col(to_chwn(x), (kh, kw), (1, 1), (Ho, Wo))
    return xp.ascontiguousarray(y.reshape(O, Ho, Wo, N).transpose(3, 0, 1, 2))


def conv2d_backward_input_seed(dy, w, x_hw, stride, padding):
    """dL/dx exactly as the seeds derive it: full conv of dilated dy with rot180(W).

    Args:
        dy: (N, O, Ho, Wo) output gradient; w: (O, C, kh, kw) weights.
        x_hw: (H, W) of the unpadded input; stride, padding: (h, w) pairs.

    Returns:
        (N, C, H, W) input gradient.
    """
    xp = backend.get_array_module(dy=dy, W=w)
    N, O, Ho, Wo = dy.shape
    _, C, kh, kw = w.shape
    (H, W), (sh, sw), (ph, pw) = x_hw, stride, padding
    # Dilate dy by the stride and pad it by k-1 on every side ("full" padding);
    # the extra rows/cols at the bottom/right are the padded-input positions no
    # window reached.  Only the rows that map to the unpadded input are kept.
    Hfull = (H + 2 * ph) + kh - 1
    Wfull = (W + 2 * pw) + kw - 1
    full = xp.zeros((N, O, Hfull, Wfull), dtype=dy.dtype)
    full[:, :, kh - 1 : kh - 1 + (Ho - 1) * sh + 1 : sh, kw - 1 : kw - 1 + (Wo - 1) * sw + 1 : sw] = dy
    full = full[:, :, ph : ph + H + kh - 1, pw : pw + W + kw - 1]
    w_rot = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)  # (C, O, kh, kw): rot180, in/out swapped
    return xp.ascontiguousarray(correlate_valid(full, xp.ascontiguousarray(w_rot)))


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
    ``grads["b"]``.  Setting ``needs_input_grad = False`` (first layer of a
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
        self.needs_input_grad = True
        kh, kw = self.kernel_size
        shape = (self.out_channels, self.in_channels, kh, kw)
        fan_in, fan_out = self.in_channels * kh * kw, self.out_channels * kh * kw
        self._add_param("W", _init.initialize(weight_init, shape, fan_in, fan_out, dtype))
        if bias:
            self._add_param("b", np.zeros(self.out_channels, dtype=dtype))
        # forward keeps: the column matrix (NumPy) or x (CuPy), and the input shape
        self._cols = None
        self._x = None
        self._x_shape = None

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={'b' in self.params}")

    def output_shape(self, x_shape):
        N, C, H, W = x_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (N, self.out_channels, conv_output_size(H, kh, sh, ph, "H"),
                conv_output_size(W, kw, sw, pw, "W"))

    def forward(self, x):
        check_array(x, "x", 4, "Conv2D")
        W, b = self.params["W"], self.params.get("b")
        check_param_match(x, W, "x", "Conv2D")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"Conv2D: x has {x.shape[1]} channels (shape {tuple(x.shape)}) but the layer "
                f"expects in_channels={self.in_channels}"
            )
        N, O, Ho, Wo = self.output_shape(x.shape)
        self._x_shape = x.shape
        if backend.is_cupy(x):
            from ..cuda import ops

            self._x = x
            return ops.conv2d_forward(x, W, b, self.stride, self.padding)
        self._cols = im2col(to_chwn(x, self.padding), self.kernel_size, self.stride, (Ho, Wo))
        y = W.reshape(O, -1) @ self._cols
        if b is not None:
            y += b[:, None]
        return np.ascontiguousarray(y.reshape(O, Ho, Wo, N).transpose(3, 0, 1, 2))

    def backward(self, dy):
        self._check_forward_called(self._x_shape)
        W = self.params["W"]
        check_array(dy, "dy", 4, "Conv2D.backward")
        check_param_match(dy, W, "dy", "Conv2D")
        expected = self.output_shape(self._x_shape)
        if tuple(dy.shape) != expected:
            raise ValueError(f"Conv2D.backward: dy has shape {tuple(dy.shape)}, expected {expected}")
        H, Wd = self._x_shape[2:]
        if backend.is_cupy(dy):
            from ..cuda import ops

            dW, db = ops.conv2d_backward_weight(self._x, dy, W.shape, self.stride, self.padding)
            self._set_grad("W", dW)
            if "b" in self.params:
                self._set_grad("b", db)
            if not self.needs_input_grad:
                return None
            return ops.conv2d_backward_input(dy, W, self._x_shape, self.stride, self.padding)
        N, O, Ho, Wo = dy.shape
        dy2 = np.ascontiguousarray(dy.transpose(1, 2, 3, 0)).reshape(O, Ho * Wo * N)
        # dL/dW = dy (valid-correlate) xpad  (seed 003: conv(X, dL/dZ)): one GEMM
        self._set_grad("W", (dy2 @ self._cols.T).reshape(W.shape))
        if "b" in self.params:
            self._set_grad("b", dy2.sum(axis=1))
        if not self.needs_input_grad:
            return None
        # dL/dx: the adjoint of im2col applied to W^T dy.  It is the same linear
        # map as the seeds' full-padded rot180 convolution
        # (conv2d_backward_input_seed, which the GPU kernel computes and the
        # tests compare against); on a CPU the scatter form is the faster one.
        ph, pw = self.padding
        dcols = W.reshape(O, -1).T @ dy2
        C = self.in_channels
        dxp = col2im(dcols, (C, H + 2 * ph, Wd + 2 * pw, N), self.kernel_size, self.stride, (Ho, Wo))
        return np.ascontiguousarray(dxp[:, ph : ph + H, pw : pw + Wd, :].transpose(3, 0, 1, 2))
