"""2-D convolution (cross-correlation) with a fused epilogue, as a forward/backward pair.

Forward, as in PyTorch (zero padding), on batch-last arrays ``x (C, H, W, N)``::

    z[o, i, j, n] = b[o] + sum_{c,u,v} xpad[c, i*sh + u, j*sw + v, n] * W[o, c, u, v]

then, fused, an optional activation (``act`` = ``"relu"``, ``"sigmoid"``,
``"tanh"``) and an optional max pooling (``pool = (kernel, stride)``; after a
ReLU it is the exact pool-then-relu of :mod:`gpucnn.functional.pooling`).

The seeds (000, 002, 003) write the same layer as a *convolution* with the
180°-rotated kernel, ``x * rot180(k)``; our ``W`` is that ``rot180(k)``, so the
weights exchange with PyTorch without a flip.  Backward follows the seeds:

* ``dL/dW = xpad (valid-correlate) dz`` — seed 003's ``conv(X, dL/dZ)``;
* ``dL/db[o] = sum dz[o]``;
* ``dL/dx = full-padded dz (dilated by the stride) convolved with rot180(W)``
  — seed 003's ``conv(padded(dL/dZ), 180° rotated K)``; rows and columns of
  the padded input that no window reaches get zero gradient.

Where it runs (decided once, by :func:`~gpucnn.functional._dispatch.use_kernels`):

* NumPy: one GEMM per pass over the im2col matrix ``cols (C*kh*kw + 1,
  Ho*Wo*N)`` -- its last row is ones, so the bias is inside the forward GEMM
  and ``db`` comes out of the weight-gradient GEMM -- in fixed column chunks
  (cache-sized blocks of output rows, the same for any thread count, spread
  over :mod:`gpucnn.threads`); dL/dx is the scatter (col2im) form
  of the seeds' linear map.  Buffers come from the layer's
  :class:`~gpucnn.functional.workspace.Workspace`.
* CUDA: the tiled kernels of ``kernels/conv_*.cu`` through
  :mod:`gpucnn.cuda.conv` (dL/dx as the seeds' rotated-kernel gather), the
  pooling ones of :mod:`gpucnn.cuda.pool`.

Both return the same :class:`Conv2dSaved` from forward.

A batch of 0 gives, as in PyTorch, an empty output of the right shape
``(O, Ho, Wo, 0)`` (pooled when a pool is fused), and backward zero weight and
bias gradients and an empty dL/dx, on either device, without running a pass.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend
from .. import precision
from .. import threads
from .._utils import output_size
from . import _dispatch
from .activation import FUSED_ACTIVATIONS, act_backward, act_forward
from .pooling import MaxPool2dSaved, max_pool2d_backward, max_pool2d_forward, pool_output_hw
from .workspace import get

__all__ = ["Conv2dSaved", "conv2d_forward", "conv2d_backward", "conv_output_hw"]

#: Target size of one column chunk of the im2col matrix: GEMMs this skinny (6 or 16 output
#: channels) run faster on blocks that stay in the L2 cache than on the whole matrix.
CHUNK_BYTES = 512 * 1024
#: Column chunks are at least this wide (narrower ones cost more Python than they save).
MIN_CHUNK_COLUMNS = 2048
#: The weight gradient's partial sums: this many, added in order (the same for any thread count).
WEIGHT_GRAD_GROUPS = 4


class Conv2dSaved(NamedTuple):
    """What :func:`conv2d_forward` keeps for :func:`conv2d_backward`.

    ``x`` is the batch-last input and ``W`` the weights (references, not
    copies); ``cols`` the NumPy path's im2col matrix of ``x`` (None on the
    kernel path, which reads ``x``); ``act_saved`` what the activation's
    derivative needs (``z`` for relu, the output for sigmoid/tanh, None when
    the activation is fused into the pool); ``pool_saved`` the pooling's taps.
    """

    x: object
    W: object
    cols: object
    stride: tuple
    padding: tuple
    has_bias: bool
    act: str | None
    act_saved: object
    pool_saved: MaxPool2dSaved | None
    z_shape: tuple


def conv_output_hw(x_shape, w_shape, stride, padding):
    """``(Ho, Wo)`` for a batch-last input shape ``(C, H, W, N)``."""
    (H, W), (kh, kw) = x_shape[1:3], w_shape[2:]
    return output_size(H, kh, stride[0], padding[0]), output_size(W, kw, stride[1], padding[1])


def _check_fusion(act, pool):
    if act is not None and act not in FUSED_ACTIVATIONS:
        raise ValueError(f"act must be None or one of {FUSED_ACTIVATIONS}, got act={act!r}")
    if pool is not None and (len(pool) != 2 or any(len(p) != 2 for p in pool)):
        raise ValueError(f"pool must be ((kh, kw), (sh, sw)) of a max pooling, got pool={pool!r}")


def conv2d_forward(x, W, b, stride, padding, *, act=None, pool=None, ws=None):
    """``y = pool(act(conv2d(x, W) + b))``; returns ``(y, saved)``.

    Args:
        x: (C, H, W, N) float array (batch last); W: (O, C, kh, kw) of the
            same dtype and device; b: (O,) or None.  stride, padding: (h, w)
            int pairs.  Shapes are checked by the layer, with messages in its
            own terms, not here.
        act: None or a name in :data:`~gpucnn.functional.activation.FUSED_ACTIVATIONS`.
        pool: None or ``(kernel, stride)`` of a max pooling applied last.
        ws: a :class:`~gpucnn.functional.workspace.Workspace` for the buffers.
    Returns:
        y (O, Ho', Wo', N) and a :class:`Conv2dSaved`.
    """
    _check_fusion(act, pool)
    if x.shape[3] == 0:
        return _empty_batch_forward(x, W, b, stride, padding, act, pool)
    mode = precision.current()
    if _dispatch.use_kernels(x, W, b):
        return _forward_kernels(x, W, b, stride, padding, act, pool, ws, mode)
    cols, z = _conv_numpy(x, W, b, stride, padding, ws, mode)
    fuse_relu = act == "relu" and pool is not None
    if fuse_relu:
        y, pool_saved = max_pool2d_forward(z, *pool, relu=True, ws=ws)
        return y, Conv2dSaved(x, W, cols, stride, padding, b is not None, act, None, pool_saved, z.shape)
    y, act_saved = act_forward(act, z, get(ws, "act", z.shape, z.dtype) if act else None)
    pool_saved = None
    if pool is not None:
        y, pool_saved = max_pool2d_forward(y, *pool, ws=ws)
    return y, Conv2dSaved(x, W, cols, stride, padding, b is not None, act, act_saved, pool_saved, z.shape)


def _empty_batch_forward(x, W, b, stride, padding, act, pool):
    """Forward of a batch of 0 samples: the empty output (as PyTorch gives), nothing computed."""
    xp = backend.get_array_module(x)
    z_shape = (W.shape[0], *conv_output_hw(x.shape, W.shape, stride, padding), 0)
    y_hw = pool_output_hw(z_shape, *pool) if pool is not None else z_shape[1:3]
    y = xp.zeros((W.shape[0], *y_hw, 0), x.dtype)
    return y, Conv2dSaved(x, W, None, stride, padding, b is not None, act, None, None, z_shape)


def _empty_batch_backward(saved, input_grad, dW_out, db_out):
    """Backward of a batch of 0 samples: zero parameter gradients (a sum over no samples), an empty dL/dx."""
    xp = backend.get_array_module(saved.W)
    W = saved.W
    dW = _store(xp.zeros_like(W), W.shape, dW_out)
    db = _store(xp.zeros(W.shape[0], W.dtype), (W.shape[0],), db_out) if saved.has_bias else None
    dx = xp.zeros(saved.x.shape, saved.x.dtype) if input_grad else None
    return dx, dW, db


def _chunks(Ho, Wo, N, K):
    """Fixed column blocks of the im2col matrix, about :data:`CHUNK_BYTES` each, depending on the
    shapes only: ``(i0, i1, j0, j1)`` -- whole output rows ``[i0, i1)``, or part ``[j0, j1)`` of one
    row -- each a contiguous range of columns ``[(i0*Wo + j0)*N, ((i1-1)*Wo + j1)*N)``."""
    cols = max(MIN_CHUNK_COLUMNS, CHUNK_BYTES // (4 * (K + 1)))
    row = Wo * N
    if row <= cols:
        rows = max(1, cols // row)
        return [(i, min(Ho, i + rows), 0, Wo) for i in range(0, Ho, rows)]
    per = max(1, cols // N)
    return [(i, i + 1, j, min(Wo, j + per)) for i in range(Ho) for j in range(0, Wo, per)]


def _span(chunk, Wo, N):
    i0, i1, j0, j1 = chunk
    return (i0 * Wo + j0) * N, ((i1 - 1) * Wo + j1) * N


def _strided(a, offset, shape, strides, writeable=True):
    """The view of the C-contiguous ``a``'s memory from ``offset`` bytes on, with ``shape`` and
    ``strides`` (bytes): built by the ndarray constructor, which checks that it stays inside
    ``a`` -- far cheaper than ``as_strided``, and these views are taken twice per column chunk
    of every convolution pass."""
    view = np.ndarray(shape, a.dtype, buffer=a, offset=offset, strides=strides)
    if not writeable:
        view.flags.writeable = False
    return view


def _windows(xpad, kernel, stride, chunk):
    """The (C, kh, kw, rows, cols, N) strided view of every window of output block ``chunk``."""
    s0, s1, s2, s3 = xpad.strides
    (kh, kw), (sh, sw) = kernel, stride
    i0, i1, j0, j1 = chunk
    C, N = xpad.shape[0], xpad.shape[3]
    shape, strides = (C, kh, kw, i1 - i0, j1 - j0, N), (s0, s1, s2, s1 * sh, s2 * sw, s3)
    if xpad.flags.c_contiguous:
        return _strided(xpad, i0 * sh * s1 + j0 * sw * s2, shape, strides, writeable=False)
    return np.lib.stride_tricks.as_strided(xpad[:, i0 * sh:, j0 * sw:], shape, strides, writeable=False)


def _col_block(cols, K6, a, chunk, Wo, N):
    """The columns of ``chunk`` (starting at column ``a``) of ``cols[:K]`` as (C, kh, kw, rows, cols, N)."""
    P, item = cols.shape[1], cols.itemsize
    C, kh, kw = K6
    i0, i1, j0, j1 = chunk
    return _strided(cols, a * item, (C, kh, kw, i1 - i0, j1 - j0, N),
                    (kh * kw * P * item, kw * P * item, P * item, Wo * N * item, N * item, item))


def _conv_numpy(x, W, b, stride, padding, ws, mode):
    C, H, Wd, N = x.shape
    O, _, kh, kw = W.shape
    K = C * kh * kw
    Ho, Wo = conv_output_hw(x.shape, W.shape, stride, padding)
    (ph, pw), dt = padding, x.dtype
    if ph or pw:
        xpad = get(ws, "xpad", (C, H + 2 * ph, Wd + 2 * pw, N), dt, fill=0)   # borders stay zero
        xpad[:, ph:ph + H, pw:pw + Wd] = x
    else:
        xpad = x
    P = Ho * Wo * N
    cols = get(ws, "cols", (K + 1, P), dt)
    cols[K] = 1                                     # the bias row
    Wb = get(ws, "wb", (O, K + 1), dt)
    Wb[:, :K] = W.reshape(O, K)
    Wb[:, K] = 0 if b is None else b
    z = get(ws, "z", (O, Ho, Wo, N), dt)
    z2 = z.reshape(O, P)

    def chunk(*block):
        a, e = _span(block, Wo, N)
        np.copyto(_col_block(cols, (C, kh, kw), a, block, Wo, N), _windows(xpad, (kh, kw), stride, block))
        if mode == "fp32":
            np.matmul(Wb, cols[:, a:e], out=z2[:, a:e])
            return
        precision.matmul(Wb[:, :K], cols[:K, a:e], z2[:, a:e], mode)   # the bias: an FP32 epilogue
        if b is not None:
            z2[:, a:e] += Wb[:, K:]

    threads.run_each(chunk, _chunks(Ho, Wo, N, K))
    return cols, z


def conv2d_backward(dy, saved: Conv2dSaved, *, input_grad=True, dW_out=None, db_out=None, ws=None):
    """Gradients of :func:`conv2d_forward`: ``(dx, dW, db)``.

    Args:
        dy: the gradient of the forward output (after the fused activation and pooling).
        saved: what forward returned.
        input_grad: False skips dL/dx (the first layer of a network)
            and returns ``dx = None``.
        dW_out, db_out: arrays to write dW / db into (overwritten, in place);
            new arrays when None.  db is None without a bias.
        ws: the workspace forward used.
    """
    if saved.z_shape[3] == 0:
        return _empty_batch_backward(saved, input_grad, dW_out, db_out)
    mode = precision.current()
    if _dispatch.use_kernels(dy, saved.W):
        return _backward_kernels(dy, saved, input_grad, dW_out, db_out, ws, mode)
    dz = _pre_activation_grad(dy, saved, ws)
    W = saved.W
    O, C, kh, kw = W.shape
    K = C * kh * kw
    dz2 = dz.reshape(O, -1)
    Ho, Wo, N = saved.z_shape[1:]
    blocks = _chunks(Ho, Wo, N, K)
    # db is the GEMM's ones row: the sum of dz as the GEMM multiplies it (rounded in tf32/bf16), as the kernels
    dWbT = _weight_grad(saved.cols, dz2, [_span(b, Wo, N) for b in blocks], mode)
    dW = _store(dWbT[:K].T, W.shape, dW_out)
    db = _store(dWbT[K], (O,), db_out) if saved.has_bias else None
    if not input_grad:
        return None, dW, db
    return _input_grad(dz2, saved, blocks, ws, mode), dW, db


def _weight_grad(cols, dz2, spans, mode):
    """``[dW | db]^T = cols @ dz^T`` (K+1, O), summed chunk by chunk (``cols_c @ dz_c^T``: ~2x
    faster in BLAS than the whole product or the other orientation), in
    :data:`WEIGHT_GRAD_GROUPS` groups of consecutive chunks whose partial sums are added in
    order: the groups are the threads' work, and the bits do not depend on the thread count.
    Each product's operands are rounded for the precision ``mode``."""
    groups = threads.split(len(spans), parts=WEIGHT_GRAD_GROUPS)

    def group(g0, g1):
        acc = tmp = None
        for a, e in spans[g0:g1]:
            if acc is None:
                acc = np.empty((cols.shape[0], dz2.shape[0]), dz2.dtype)
                tmp = np.empty_like(acc)
                precision.matmul(cols[:, a:e], dz2[:, a:e].T, acc, mode)
            else:
                precision.matmul(cols[:, a:e], dz2[:, a:e].T, tmp, mode)
                acc += tmp
        return acc

    parts = threads.map_each(group, groups)
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


def _pre_activation_grad(dy, saved, ws):
    """dL/dz from dL/dy through the fused pooling and activation."""
    g = dy
    if saved.pool_saved is not None:
        g = max_pool2d_backward(dy, saved.pool_saved, ws=ws)
    if saved.act is not None and saved.act_saved is not None:
        g = act_backward(saved.act, g, saved.act_saved, get(ws, "dz", saved.z_shape, dy.dtype))
    return g


def _input_grad(dz2, saved, blocks, ws, mode):
    """dL/dx: the adjoint of im2col applied to ``W^T dz`` (the seeds' full-padded rot180
    convolution, the GPU kernel's gather, in its scatter form, which is faster on a CPU)."""
    W, (ph, pw), (sh, sw) = saved.W, saved.padding, saved.stride
    O, C, kh, kw = W.shape
    K = C * kh * kw
    Cx, H, Wd, N = saved.x.shape
    Ho, Wo = saved.z_shape[1:3]
    W2t = W.reshape(O, K).T
    dcols = get(ws, "dcols", (K, Ho * Wo * N), dz2.dtype)

    def gemm(*block):
        a, e = _span(block, Wo, N)
        precision.matmul(W2t, dz2[:, a:e], dcols[:, a:e], mode)

    threads.run_each(gemm, blocks)
    dcols6 = dcols.reshape(C, kh, kw, Ho, Wo, N)
    padded = ph or pw
    dxp = get(ws, "dxpad" if padded else "dx", (C, H + 2 * ph, Wd + 2 * pw, N), dz2.dtype)

    def channels(c0, c1):
        dxp[c0:c1].fill(0)
        for u in range(kh):
            for v in range(kw):
                dxp[c0:c1, u:u + (Ho - 1) * sh + 1:sh, v:v + (Wo - 1) * sw + 1:sw] += dcols6[c0:c1, u, v]

    threads.run_each(channels, threads.split(C, parts=threads.get_num_threads()))   # few, large calls
    if not padded:
        return dxp
    dx = get(ws, "dx", saved.x.shape, dz2.dtype)
    np.copyto(dx, dxp[:, ph:ph + H, pw:pw + Wd])
    return dx


def _store(value, shape, out):
    """``value`` reshaped to ``shape``, copied into ``out`` when one is given."""
    value = value.reshape(shape)
    if out is None:
        return value.copy()
    out[...] = value
    return out


# --------------------------------------------------------------------------- #
# the kernel path
# --------------------------------------------------------------------------- #
def _forward_kernels(x, W, b, stride, padding, act, pool, ws, mode):
    """The kernel path; every output is a buffer of ``ws`` (roles ``k.*``), so a step allocates nothing.
    fp32 runs the SIMT kernels (gpucnn/cuda/conv.py); every other mode the tensor-core GEMMs
    (gpucnn/cuda/gemm_tc.py), which round the operands as they load them."""
    from ..cuda import conv as kconv
    from ..cuda import gemm_tc

    fuse_relu = act == "relu" and pool is not None
    kernel_act = None if fuse_relu else act
    xp = backend.get_array_module(x)
    N = x.shape[3]
    O = W.shape[0]
    z_shape = (O, *conv_output_hw(x.shape, W.shape, stride, padding), N)
    y = get(ws, "k.y", z_shape, x.dtype, xp)
    z = get(ws, "k.z", z_shape, x.dtype, xp) if kernel_act == "relu" else None
    if mode == "fp32":
        y, z = kconv.conv_forward(x, W, b, stride, padding, act=kernel_act, y_out=y, z_out=z)
    else:
        y, z = gemm_tc.conv_forward(x, W, b, stride, padding, act=kernel_act, mode=mode, y_out=y, z_out=z)
    act_saved = None
    if kernel_act == "relu":
        act_saved = z
    elif kernel_act is not None:
        act_saved = y
    pool_saved = None
    if pool is not None:
        y, pool_saved = max_pool2d_forward(y, *pool, relu=fuse_relu, ws=ws)
    return y, Conv2dSaved(x, W, None, stride, padding, b is not None, act, act_saved, pool_saved, z_shape)


def _backward_kernels(dy, saved, input_grad, dW_out, db_out, ws, mode):
    from ..cuda import conv as kconv
    from ..cuda import elementwise
    from ..cuda import gemm_tc

    dz = dy
    if saved.pool_saved is not None:
        dz = max_pool2d_backward(dy, saved.pool_saved, ws=ws)
    xp = backend.get_array_module(dz)
    if saved.act is not None and saved.act_saved is not None:
        dz = elementwise.act_backward(dz, saved.act_saved, saved.act,
                                      out=get(ws, "k.act.dz", dz.shape, dz.dtype, xp))
    W, x = saved.W, saved.x
    dW = dW_out if dW_out is not None else get(ws, "k.dW", W.shape, W.dtype, xp)
    db = None
    if saved.has_bias:
        db = db_out if db_out is not None else get(ws, "k.db", (W.shape[0],), W.dtype, xp)
    geometry = (saved.stride, saved.padding)
    dx_out = get(ws, "k.dx", x.shape, dz.dtype, xp) if input_grad else None
    if mode == "fp32":
        need = kconv.conv_backward_weight_workspace_size(x.shape, W.shape, *geometry)
        kconv.conv_backward_weight(x, dz, W.shape, *geometry, dW_out=dW, db_out=db, has_bias=saved.has_bias,
                                   workspace=get(ws, "k.wgrad", (need,), W.dtype, xp))
        dx = kconv.conv_backward_input(dz, W, x.shape, *geometry, out=dx_out) if input_grad else None
        return dx, dW, db
    need = gemm_tc.conv_backward_weight_workspace_size(x.shape, W.shape, *geometry)
    gemm_tc.conv_backward_weight(x, dz, W.shape, *geometry, mode=mode, dW_out=dW, db_out=db,
                                 has_bias=saved.has_bias, workspace=get(ws, "k.wgrad", (need,), W.dtype, xp))
    dx = gemm_tc.conv_backward_input(dz, W, x.shape, *geometry, mode=mode, out=dx_out) if input_grad else None
    return dx, dW, db
