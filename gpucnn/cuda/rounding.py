"""Operand rounding on the device (kernels/precision.cu): the tf32/bf16 modes of :mod:`gpucnn.precision`.

Until tensor-core kernels exist, a tf32 or bf16 run on CUDA rounds each GEMM
operand with this one launch into a buffer of the layer's workspace and hands
the rounded copy to the FP32 SIMT kernels: a tensor core's numbers (products
of rounded operands are exact in FP32), no allocation in the step, so the
step can still be captured as a CUDA graph.  Bit for bit the host's
:func:`gpucnn.precision.round_tf32` / :func:`~gpucnn.precision.round_bf16`.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from . import loader

__all__ = ["round_mantissa"]


def round_mantissa(x, bits: int, *, out=None):
    """``x`` (float32, C-contiguous) rounded to ``bits`` explicit mantissa bits (10: TF32, 7: bf16),
    nearest even, into ``out`` (same shape and dtype; may be ``x`` itself) or a new array."""
    func = "round_mantissa"
    if getattr(x, "dtype", None) != np.float32:
        raise TypeError(f"{func}: x has dtype {getattr(x, 'dtype', type(x).__name__)}; the precision modes "
                        "round float32 operands only")
    if not 1 <= bits <= 22:
        raise ValueError(f"{func}: bits must be 1..22 explicit mantissa bits, got {bits!r}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{func}: x must be C-contiguous (shape {x.shape})")
    if out is None:
        out = get_array_module(x).empty_like(x)
    elif out.shape != x.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"{func}: out must be a C-contiguous float32 array of shape {x.shape}, got "
                         f"{out.dtype} {out.shape}")
    loader.launch("round_mantissa", (x, out, x.size, 23 - bits), n_threads=x.size)
    return out
