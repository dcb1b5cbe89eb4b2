"""2-D convolution (cross-correlation) as a forward/backward function pair.

Forward, as in PyTorch (zero padding)::

    y[n, o, i, j] = b[o] + sum_{c,u,v} xpad[n, c, i*sh + u, j*sw + v] * W[o, c, u, v]

The seeds (000, 002, 003) write the same layer as a *convolution* with the
180°-rotated kernel, ``x * rot180(k)``; our ``W`` is that ``rot180(k)``, so the
weights exchange with PyTorch without a flip.  Backward follows the seeds:

* ``dL/dW = xpad (valid-correlate) dy`` — seed 003's ``conv(X, dL/dZ)``;
* ``dL/db[o] = sum dy[:, o]``;
* ``dL/dx = full-padded dy (dilated by the stride) convolved with rot180(W)``
  — seed 003's ``conv(padded(dL/dZ), 180° rotated K)``.  Rows and columns of
  the padded input that no window reaches get zero gradient.

Where it runs (decided once, by :func:`~gpucnn.functional._dispatch.use_kernels`):

* NumPy: one GEMM per pass over an :func:`~gpucnn.functional.im2col.im2col`
  matrix in the batch-innermost (C, H, W, N) layout; dL/dx is the scatter
  (:func:`~gpucnn.functional.im2col.col2im`) form of the same linear map.
* CUDA: the kernels of ``kernels/conv2d_*.cu`` through :mod:`gpucnn.cuda.ops`
  (dL/dx as the seeds' rotated-kernel gather).

Both return the same :class:`Conv2dSaved` from forward.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import backend
from . import _dispatch
from .im2col import im2col, col2im, to_chwn

__all__ = ["Conv2dSaved", "conv2d_forward", "conv2d_backward", "WEIGHT_GRAD_METHODS"]

#: How the CUDA path computes dL/dW: the hand-written reduction kernel, or
#: im2col on the device plus one cuBLAS GEMM (uses N*C*KH*KW*OH*OW floats).
WEIGHT_GRAD_METHODS = ("kernel", "gemm")


class Conv2dSaved(NamedTuple):
    """What :func:`conv2d_forward` keeps for :func:`conv2d_backward`.

    ``x`` is the forward input (NCHW) and ``W`` the weights (a reference, not
    a copy); ``cols`` is the NumPy path's im2col matrix of ``x``, kept so
    backward does not rebuild it (``None`` on the kernel path, which reads
    ``x`` directly).
    """

    x: object
    W: object
    cols: object
    stride: tuple
    padding: tuple
    has_bias: bool


def _out_hw(x_shape, w_shape, stride, padding):
    (H, W), (kh, kw) = x_shape[2:], w_shape[2:]
    return ((H + 2 * padding[0] - kh) // stride[0] + 1, (W + 2 * padding[1] - kw) // stride[1] + 1)


def conv2d_forward(x, W, b, stride, padding):
    """``y = conv2d(x, W) + b``; returns ``(y, saved)``.

    Args:
        x: (N, C, H, W) float array; W: (O, C, kh, kw) of the same dtype and
            device; b: (O,) or None.  stride, padding: (h, w) int pairs.
            Shapes are not re-checked here (the layer does that, with
            messages in its own terms).
    Returns:
        y (N, O, Ho, Wo), C-contiguous, and a :class:`Conv2dSaved`.
    """
    if _dispatch.use_kernels(x, W, b):
        from ..cuda import ops

        y = ops.conv2d_forward(x, W, b, stride, padding)
        return y, Conv2dSaved(x, W, None, stride, padding, b is not None)
    xp = backend.get_array_module(x)
    N = x.shape[0]
    O = W.shape[0]
    Ho, Wo = _out_hw(x.shape, W.shape, stride, padding)
    cols = im2col(to_chwn(x, padding), W.shape[2:], stride, (Ho, Wo))
    y = W.reshape(O, -1) @ cols
    if b is not None:
        y += b[:, None]
    y = xp.ascontiguousarray(y.reshape(O, Ho, Wo, N).transpose(3, 0, 1, 2))
    return y, Conv2dSaved(x, W, cols, stride, padding, b is not None)


def conv2d_backward(dy, saved: Conv2dSaved, *, need_input_grad=True, dW_out=None, db_out=None,
                    method="kernel"):
    """Gradients of :func:`conv2d_forward`: ``(dx, dW, db)``.

    Args:
        dy: (N, O, Ho, Wo), the gradient of the output.
        saved: what forward returned.
        need_input_grad: False skips dL/dx (the first layer of a network)
            and returns ``dx = None``.
        dW_out, db_out: arrays to write dW / db into (overwritten, in place);
            new arrays when None.  db is None without a bias.
        method: CUDA path only, how dW is computed (:data:`WEIGHT_GRAD_METHODS`).
    """
    if method not in WEIGHT_GRAD_METHODS:
        raise ValueError(f"method must be one of {WEIGHT_GRAD_METHODS}, got method={method!r}")
    x, W, stride, padding = saved.x, saved.W, saved.stride, saved.padding
    if _dispatch.use_kernels(dy, W):
        return _backward_kernels(dy, saved, need_input_grad, dW_out, db_out, method)
    xp = backend.get_array_module(dy)
    N, O, Ho, Wo = dy.shape
    dy2 = xp.ascontiguousarray(dy.transpose(1, 2, 3, 0)).reshape(O, Ho * Wo * N)
    # dL/dW = dy (valid-correlate) xpad  (seed 003: conv(X, dL/dZ)): one GEMM
    dW = _store(dy2 @ saved.cols.T, W.shape, dW_out)
    db = _store(dy2.sum(axis=1), (O,), db_out) if saved.has_bias else None
    if not need_input_grad:
        return None, dW, db
    # dL/dx: the adjoint of im2col applied to W^T dy.  It is the same linear
    # map as the seeds' full-padded rot180 convolution (the GPU kernel's
    # gather, and im2col.conv2d_backward_input_seed, which the tests compare
    # against); on a CPU the scatter form is the faster one.
    C, H, Wd = x.shape[1:]
    ph, pw = padding
    dcols = W.reshape(O, -1).T @ dy2
    dxp = col2im(dcols, (C, H + 2 * ph, Wd + 2 * pw, N), W.shape[2:], stride, (Ho, Wo))
    return xp.ascontiguousarray(dxp[:, ph:ph + H, pw:pw + Wd, :].transpose(3, 0, 1, 2)), dW, db


def _store(value, shape, out):
    """``value`` reshaped to ``shape``, copied into ``out`` when one is given."""
    value = value.reshape(shape)
    if out is None:
        return value
    out[...] = value
    return out


def _backward_kernels(dy, saved, need_input_grad, dW_out, db_out, method):
    from ..cuda import ops

    x, W, stride, padding = saved.x, saved.W, saved.stride, saved.padding
    if method == "gemm":
        xp = backend.get_array_module(x)
        O, _, kh, kw = W.shape
        Ho, Wo = dy.shape[2:]
        cols = im2col(to_chwn(xp.ascontiguousarray(x), padding), (kh, kw), stride, (Ho, Wo))
        dy2 = xp.ascontiguousarray(dy.transpose(1, 2, 3, 0)).reshape(O, -1)
        dW, db = (dy2 @ cols.T).reshape(W.shape), dy2.sum(axis=1)
    else:
        dW, db = ops.conv2d_backward_weight(x, dy, W.shape, stride, padding)
    dW = _store(dW, W.shape, dW_out)
    db = _store(db, db.shape, db_out) if saved.has_bias else None
    dx = ops.conv2d_backward_input(dy, W, x.shape, stride, padding) if need_input_grad else None
    return dx, dW, db
