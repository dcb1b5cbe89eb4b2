"""The arithmetic of the GEMMs: ``fp32``, ``tf32``, ``3xtf32``, ``bf16`` or ``fp16``, rounded as the hardware does.

A precision mode says how the *operands* of every GEMM -- conv forward,
backward-input and backward-weight, and the dense layer's three products --
are rounded before the multiply-adds; accumulation is always FP32, and
everything outside the GEMMs (bias, activations, pooling, the loss, the
optimizer and its FP32 master weights) is FP32 in every mode:

* ``fp32``: operands as they are (the default; the exact SIMT reference).
* ``tf32``: each operand rounded to TF32 (8 exponent bits, 10 explicit
  mantissa bits), what PyTorch's cuDNN convolutions do by default on an
  Ampere-or-later GPU.
* ``3xtf32``: split precision, ``a = a_hi + a_lo`` with ``a_hi = tf32(a)``,
  ``a_lo = tf32(a - a_hi)`` (``a - a_hi`` is exact in FP32), and
  ``A B ~ A_hi B_hi + A_hi B_lo + A_lo B_hi`` (the ``lo*lo`` term, ~2^-22
  relative, is dropped): FP32 accuracy from TF32 multiplies.
* ``bf16``: each operand rounded to bfloat16 (7 explicit mantissa bits);
  mixed precision without loss scaling (bf16 has FP32's exponent range).
* ``fp16``: each operand rounded to IEEE binary16 (5 exponent bits, 10
  explicit mantissa bits): finite only up to 65504 and with a smallest
  subnormal of 2^-24, so gradients that small flush to zero and the run
  needs *dynamic loss scaling* -- the train step multiplies the loss's
  gradient by a power of two and unscales before the update, skipping the
  steps whose gradients overflowed (:class:`gpucnn.train.LossScaler`, which
  ``gpucnn train --precision fp16`` makes; the other modes never scale).

Rounding is round to nearest, ties to even.  tf32 and bf16 round on the
``uint32`` view of a float32 (the same result as
``torch.tensor(x).to(torch.bfloat16)``): add ``half - 1 + lsb`` and clear
the dropped bits, so a carry out of the mantissa
moves into the exponent (and the largest finites round to Inf, as the hardware
does), subnormals round on the same grid, Inf is unchanged and NaN stays a
(quiet) NaN of the same sign.  A product of two TF32 or two bf16 numbers is
exact in FP32 (11 x 11 or 8 x 8 significant bits), so an FP32 GEMM of rounded
operands gives a tensor core's numbers up to the order of accumulation.  A
tensor-core kernel must therefore convert with round-to-nearest-even (CUTLASS's
``round_to_nearest``), not ``cvt.rna`` (ties away) nor by ignoring the low bits.
On CUDA every mode but fp32 runs the tensor-core GEMMs of gpucnn/cuda/gemm_tc.py,
which round each operand this way as they stage it (kernels/rounding.cuh; fp16
with the same nearest-even rule, overflow to Inf and the subnormal grid).

fp16 is the array module's own float32 -> float16 -> float32 cast, which
in NumPy is round to nearest even, as the hardware's ``cvt.rn.f16.f32``
(tests/test_precision.py checks it bit for bit; CuPy's cast of CuPy arrays
has not been checked on a GPU): past 65504 (from 65520 up, the tie) a value
rounds to Inf, below 2^-14 it rounds on the subnormal grid of 2^-24 (2^-25, a
tie, goes to 0), -0 stays -0, Inf stays Inf and NaN stays NaN.  A product of
two fp16 numbers is exact in FP32 (11 x 11 significant bits, exponents from
2^-48 to 2^32), so here too an FP32 GEMM of rounded operands gives a tensor
core's numbers up to the order of accumulation.

The mode of a run is one setting, held here for the run and put back after
(:func:`using`, entered by :meth:`gpucnn.train.options.RunOptions.applied`):
the functional GEMM helpers read :func:`current` once per call, in the
calling thread, and hand it to their workers.
"""
from __future__ import annotations

import contextlib

import numpy as np

from . import backend

__all__ = ["MODES", "FORMATS", "MANTISSA_BITS", "LOSS_SCALED", "check_mode", "current", "using", "round_tf32",
           "round_bf16", "round_fp16", "round_operand", "split_tf32", "matmul"]

#: the precision modes, the default first
MODES = ("fp32", "tf32", "3xtf32", "bf16", "fp16")
#: (exponent bits, explicit mantissa bits) of the operand format of each rounding mode
FORMATS = {"tf32": (8, 10), "bf16": (8, 7), "fp16": (5, 10)}
#: explicit mantissa bits of the modes whose rounding only shortens the mantissa, keeping FP32's exponent
#: range (``round_mantissa_bits`` of kernels/rounding.cuh); fp16 is not one: its range is narrower
MANTISSA_BITS = {"tf32": 10, "bf16": 7}
#: the modes whose runs need dynamic loss scaling (:class:`gpucnn.train.LossScaler`)
LOSS_SCALED = ("fp16",)

_EXP_MASK = 0x7F800000
_QUIET = 0x00400000
_mode = "fp32"


def check_mode(mode) -> str:
    """``mode`` if it is a precision mode, else a ``ValueError`` naming the allowed ones."""
    if mode in MODES:
        return mode
    raise ValueError(f"precision must be one of {', '.join(map(repr, MODES))}, got precision={mode!r}")


def current() -> str:
    """The precision mode the GEMMs use now (``"fp32"`` unless inside :func:`using`)."""
    return _mode


@contextlib.contextmanager
def using(mode: str):
    """Run the GEMMs in ``mode`` inside the block; the previous mode comes back after it."""
    global _mode
    check_mode(mode)
    previous, _mode = _mode, mode
    try:
        yield mode
    finally:
        _mode = previous


def _round_mantissa(x, bits: int, out=None):
    """``x`` (float32) rounded to ``bits`` explicit mantissa bits, nearest even; a new array unless ``out``."""
    xp = backend.get_array_module(x)
    if x.dtype != np.float32:
        raise TypeError(f"precision rounding takes float32 operands, got dtype {x.dtype} "
                        "(float64 runs in precision 'fp32' only)")
    drop = 23 - bits
    u = xp.ascontiguousarray(x).view(xp.uint32)
    r = (u >> drop) & 1                                  # the kept lsb: ties go to even
    r += (1 << (drop - 1)) - 1
    r += u
    r &= xp.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)
    nan = ((u & _EXP_MASK) == _EXP_MASK) & ((u & 0x007FFFFF) != 0)
    if xp is not np or nan.any():                        # NaN: quiet it, keep the sign, never Inf
        # (on CuPy unconditionally: .any() would wait for the device)
        r = xp.where(nan, (u | _QUIET) & xp.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF), r)
    y = r.view(xp.float32).reshape(x.shape)
    if out is None:
        return y
    out[...] = y
    return out


def round_tf32(x, out=None):
    """``x`` rounded to TF32 (10 mantissa bits), round to nearest even, as float32."""
    return _round_mantissa(x, MANTISSA_BITS["tf32"], out)


def round_bf16(x, out=None):
    """``x`` rounded to bfloat16 (7 mantissa bits), round to nearest even, as float32."""
    return _round_mantissa(x, MANTISSA_BITS["bf16"], out)


def round_fp16(x, out=None):
    """``x`` (float32) rounded to IEEE binary16, round to nearest even, as float32; a new array unless ``out``.

    The float16 cast of ``x``'s array module and back (NumPy's is round to nearest even, as the
    hardware's ``cvt.rn.f16.f32``): from 65520 up a magnitude becomes Inf, below 2^-14 it rounds
    on the subnormal grid of 2^-24, -0, Inf and NaN stay what they are.
    """
    xp = backend.get_array_module(x)
    if x.dtype != np.float32:
        raise TypeError(f"precision rounding takes float32 operands, got dtype {x.dtype} "
                        "(float64 runs in precision 'fp32' only)")
    with np.errstate(over="ignore"):                     # past 65504 is Inf, as on the hardware: no warning
        y = x.astype(np.float16).astype(np.float32)
    if out is None:
        return y
    out[...] = y
    return out


def round_operand(x, mode: str):
    """The operand a GEMM in ``mode`` multiplies: ``x`` itself in fp32, rounded in tf32/bf16/fp16
    (a new array).  3xtf32 takes two parts: use :func:`split_tf32`."""
    if mode == "fp32":
        return x
    if mode in MANTISSA_BITS:
        return _round_mantissa(x, MANTISSA_BITS[mode])
    if mode == "fp16":
        return round_fp16(x)
    raise ValueError(f"round_operand: mode {mode!r} has no single rounded operand (3xtf32: split_tf32)")


def split_tf32(x):
    """``(hi, lo)``: ``hi = tf32(x)``, ``lo = tf32(x - hi)`` (float32; ``x - hi`` is exact)."""
    hi = round_tf32(x)
    return hi, round_tf32(x - hi)


def matmul(a, b, out, mode: str):
    """``out = a @ b`` (float32 accumulation) with the operands rounded for ``mode``.

    fp32 is ``xp.matmul(a, b, out=out)`` itself; tf32, bf16 and fp16 multiply the
    rounded operands; 3xtf32 adds ``a_hi b_hi + a_hi b_lo + a_lo b_hi`` in
    that order into ``out``.  Returns ``out``.
    """
    xp = backend.get_array_module(a)
    if mode == "fp32":
        return xp.matmul(a, b, out=out)
    if mode != "3xtf32":
        return xp.matmul(round_operand(a, mode), round_operand(b, mode), out=out)
    a_hi, a_lo = split_tf32(a)
    b_hi, b_lo = split_tf32(b)
    xp.matmul(a_hi, b_hi, out=out)
    out += a_hi @ b_lo
    out += a_lo @ b_hi
    return out
