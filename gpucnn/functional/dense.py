"""The fully connected layer as a function pair, on batch-last ``(F, N)`` arrays.

PyTorch's layout for ``W`` (out, in); with the batch as the last axis::

    z = W x + b,   y = act(z),   dL/dW = dz x^T,   dL/db = sum_n dz,   dL/dx = W^T dz

(seed 001 eq. 8: dD_j/dw_ck = x_c delta_jk; seed 002: grad_W = a delta^T with
its W stored transposed), ``dz = dy * act'(z)`` for the fused activation.

NumPy: the products are BLAS GEMMs written into the layer's workspace and
into the gradient buffers in place.  CUDA: the tiled GEMM kernels of
``kernels/dense.cu`` (:mod:`gpucnn.cuda.dense`), bias and activation in the
forward's epilogue; the backward in one launch (fp32 and float64: the
activation's derivative computed inside both GEMMs, the bias gradient beside
them), or the derivative and bias gradient, then the tensor-core GEMMs.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import backend
from .. import precision
from .. import threads
from . import _dispatch
from .activation import FUSED_ACTIVATIONS, act_backward, act_forward
from .workspace import get

__all__ = ["DenseSaved", "dense_forward", "dense_backward"]


class DenseSaved(NamedTuple):
    """The input x (needed for dL/dW), the weights (a reference), and the activation's saved state."""

    x: object
    W: object
    has_bias: bool
    act: str | None
    act_saved: object


def dense_forward(x, W, b, *, act=None, ws=None):
    """``y = act(W @ x + b)`` for x (in, N), W (out, in), b (out,) or None; returns ``(y, saved)``."""
    if act is not None and act not in FUSED_ACTIVATIONS:
        raise ValueError(f"act must be None or one of {FUSED_ACTIVATIONS}, got act={act!r}")
    mode = precision.current()
    if _dispatch.use_kernels(x, W, b):
        from ..cuda import dense, gemm_tc

        xp = backend.get_array_module(x)
        shape = (W.shape[0], x.shape[1])
        outs = dict(y_out=get(ws, "k.y", shape, x.dtype, xp),
                    z_out=get(ws, "k.z", shape, x.dtype, xp) if act == "relu" else None)
        if mode == "fp32":
            y, z = dense.dense_forward(x, W, b, act=act, **outs)
        else:
            y, z = gemm_tc.dense_forward(x, W, b, act=act, mode=mode, **outs)
        saved = z if act == "relu" else (y if act is not None else None)
        return y, DenseSaved(x, W, b is not None, act, saved)
    xp = backend.get_array_module(x)
    threads.pin_blas()                    # BLAS on one thread: the same bits for any thread count
    z = get(ws, "z", (W.shape[0], x.shape[1]), x.dtype, xp)
    precision.matmul(W, x, z, mode)
    if b is not None:
        z += b[:, None]
    y, act_saved = act_forward(act, z, get(ws, "act", z.shape, z.dtype, xp) if act else None)
    return y, DenseSaved(x, W, b is not None, act, act_saved)


def dense_backward(dy, saved: DenseSaved, *, input_grad=True, dW_out=None, db_out=None, ws=None):
    """``(dx, dW, db)``; dW/db are written into ``dW_out``/``db_out`` when given (overwritten)."""
    W, x = saved.W, saved.x
    xp = backend.get_array_module(dy)
    mode = precision.current()
    if _dispatch.use_kernels(dy, W):
        return _backward_kernels(dy, saved, input_grad, dW_out, db_out, xp, ws, mode)
    dz = dy if saved.act is None else act_backward(saved.act, dy, saved.act_saved,
                                                   get(ws, "dz", dy.shape, dy.dtype, xp))
    dW = dW_out if dW_out is not None else xp.empty(W.shape, W.dtype)
    precision.matmul(dz, x.T, dW, mode)
    db = None
    if saved.has_bias:
        db = db_out if db_out is not None else xp.empty((W.shape[0],), W.dtype)
        dz.sum(axis=1, out=db)
    dx = None
    if input_grad:
        dx = precision.matmul(W.T, dz, get(ws, "dx", x.shape, dy.dtype, xp), mode)
    return dx, dW, db


def _backward_kernels(dy, saved, input_grad, dW_out, db_out, xp, ws, mode):
    """fp32: ONE launch, dz computed inside the dW / dx GEMMs and db beside them
    (gpucnn/cuda/dense.py ``dense_backward``); other modes: dense_backward_act, then the
    tensor-core GEMMs.  db is the FP32 sum of the unrounded dz in every mode, in the same
    order, as on the NumPy path."""
    from ..cuda import dense, gemm_tc

    W, x = saved.W, saved.x
    db = None
    if saved.has_bias:
        db = db_out if db_out is not None else get(ws, "k.db", (W.shape[0],), W.dtype, xp)
    dW = dW_out if dW_out is not None else get(ws, "k.dW", W.shape, W.dtype, xp)
    dx = get(ws, "k.dx", x.shape, dy.dtype, xp) if input_grad else None
    if mode == "fp32":
        return dense.dense_backward(dy, saved.act_saved, saved.act, x, W, dW_out=dW, dx_out=dx, db_out=db,
                                    has_bias=saved.has_bias, input_grad=input_grad)
    dz, db = dense.dense_backward_act(dy, saved.act_saved, saved.act, db_out=db, has_bias=saved.has_bias,
                                      dz_out=get(ws, "k.dz", dy.shape, dy.dtype, xp))
    gemm_tc.dense_weight_grad(dz, x, mode=mode, out=dW)
    if input_grad:
        gemm_tc.dense_input_grad(W, dz, mode=mode, out=dx)
    return dx, dW, db
