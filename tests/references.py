"""Independent float64 references for the convolution and pooling tests (test-only helper).

Written here, not taken from gpucnn: loops over kernel offsets only, and the
backward passes in their *scatter* formulation (every (output, tap) pair adds
to the input it read), so they share no index algebra with the library's
im2col/col2im NumPy path or with the gather kernels.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ref_conv_forward", "ref_conv_backward_input", "ref_conv_backward_weight",
           "ref_maxpool_forward", "ref_maxpool_backward", "ref_avgpool_forward", "ref_avgpool_backward"]


def _out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def _taps(a, u, v, sh, sw, oh, ow):
    """a[:, :, u + i*sh, v + j*sw] for i < oh, j < ow (a is already padded)."""
    return a[:, :, u:u + sh * (oh - 1) + 1:sh, v:v + sw * (ow - 1) + 1:sw]


def ref_conv_forward(x, W, b, stride, padding):
    (sh, sw), (ph, pw) = stride, padding
    N, C, H, Wd = x.shape
    O, _, KH, KW = W.shape
    OH, OW = _out(H, KH, sh, ph), _out(Wd, KW, sw, pw)
    xpad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = np.zeros((N, O, OH, OW))
    for u in range(KH):
        for v in range(KW):
            y += np.einsum("nchw,oc->nohw", _taps(xpad, u, v, sh, sw, OH, OW), W[:, :, u, v].astype(np.float64))
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def ref_conv_backward_input(dy, W, x_shape, stride, padding):
    """Scatter: every (output, tap) pair adds dy * W to the input it read."""
    (sh, sw), (ph, pw) = stride, padding
    N, C, H, Wd = x_shape
    O, _, KH, KW = W.shape
    OH, OW = dy.shape[2:]
    dxpad = np.zeros((N, C, H + 2 * ph, Wd + 2 * pw))
    for u in range(KH):
        for v in range(KW):
            _taps(dxpad, u, v, sh, sw, OH, OW)[...] += np.einsum(
                "nohw,oc->nchw", dy.astype(np.float64), W[:, :, u, v].astype(np.float64))
    return dxpad[:, :, ph:ph + H, pw:pw + Wd]


def ref_conv_backward_weight(x, dy, w_shape, stride, padding):
    (sh, sw), (ph, pw) = stride, padding
    O, C, KH, KW = w_shape
    OH, OW = dy.shape[2:]
    xpad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dW = np.zeros(w_shape)
    for u in range(KH):
        for v in range(KW):
            dW[:, :, u, v] = np.einsum("nohw,nchw->oc", dy.astype(np.float64),
                                       _taps(xpad, u, v, sh, sw, OH, OW))
    return dW, dy.astype(np.float64).sum(axis=(0, 2, 3))


def ref_maxpool_forward(x, kernel, stride):
    """Explicit windows; numpy.argmax gives the first maximum (first NaN)."""
    (kh, kw), (sh, sw) = kernel, stride
    N, C, H, W = x.shape
    OH, OW = (H - kh) // sh + 1, (W - kw) // sw + 1
    y = np.empty((N, C, OH, OW), x.dtype)
    arg = np.empty((N, C, OH, OW), np.int32)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    win = x[n, c, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    k = int(np.argmax(win))  # row-major, first max, NaN wins
                    u, v = divmod(k, kw)
                    y[n, c, i, j] = win[u, v]
                    arg[n, c, i, j] = (i * sh + u) * W + (j * sw + v)
    return y, arg


def ref_maxpool_backward(dy, arg, x_shape):
    N, C, H, W = x_shape
    dx = np.zeros((N * C, H * W))
    planes = np.repeat(np.arange(N * C), dy[0, 0].size)
    np.add.at(dx, (planes, arg.reshape(-1)), dy.reshape(-1).astype(np.float64))
    return dx.reshape(x_shape)


def ref_avgpool_forward(x, kernel, stride):
    (kh, kw), (sh, sw) = kernel, stride
    N, C, H, W = x.shape
    OH, OW = (H - kh) // sh + 1, (W - kw) // sw + 1
    y = np.zeros((N, C, OH, OW))
    for i in range(OH):
        for j in range(OW):
            y[:, :, i, j] = x[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].astype(np.float64).mean(axis=(2, 3))
    return y


def ref_avgpool_backward(dy, x_shape, kernel, stride):
    (kh, kw), (sh, sw) = kernel, stride
    dx = np.zeros(x_shape)
    OH, OW = dy.shape[2:]
    for i in range(OH):
        for j in range(OW):
            dx[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw] += dy[:, :, i:i + 1, j:j + 1] / (kh * kw)
    return dx
