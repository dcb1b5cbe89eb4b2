"""Max pooling on batch-last activations (kernels/pool.cu).

Layout: x is (C, H, W, N), y / tap / factor are (C, OH, OW, N) with
``OH = (H - KH) // SH + 1`` (no padding, floor), ``OW`` alike; any kernel and
stride, overlapping windows included.  ``tap`` (uint8) is the selected element's
index ``u * KW + v`` inside its window, so windows hold at most 256 elements.

Rules (the seeds'): the FIRST maximum in row-major window order wins (a later
equal value never replaces it); a NaN wins over any number (the first NaN).
With ``relu=True`` the forward pass is the fused max-pool + relu (equal to
relu-then-maxpool, 4x less relu work): with ``m`` the window's first maximum,
``m > 0``: y = m, factor 1; ``m <= 0``: y = 0, tap 0, factor relu'(z[tap 0])
(1/2 if that element is exactly 0, else 0); ``m`` NaN: y = NaN, tap = first
NaN, factor NaN.  The backward pass routes ``dy * factor`` to the tap.
See the contract comment of kernels/pool.cu for the exact definitions.
"""
from __future__ import annotations

import numpy as np

from .._utils import pair as _pair
from . import loader
from .elementwise import _contiguous, _dtype, _kernel, _ndim, _out, _positive, _same_shape, _xp

__all__ = ["MAX_WINDOW", "pool_output_shape", "max_pool_forward", "max_pool_backward"]

#: Largest window (KH * KW) a uint8 tap can index.
MAX_WINDOW = 256
#: the largest input height or width of max_pool_backward (its grid's y and z limit)
BACKWARD_MAX_HW = 65535


def _geometry(func, x_shape, kernel, stride):
    """(C, H, W, N, KH, KW, SH, SW, OH, OW) after validation."""
    C, H, W, N = x_shape
    (KH, KW), (SH, SW) = _pair(kernel, "kernel", 1), _pair(stride, "stride", 1)
    if KH > H or KW > W:
        raise ValueError(f"{func}: pooling kernel {(KH, KW)} is larger than the input plane {H}x{W} "
                         f"(x shape {tuple(x_shape)}, layout (C, H, W, N))")
    if KH * KW > MAX_WINDOW:
        raise ValueError(f"{func}: a {KH}x{KW} window has {KH * KW} elements but the uint8 tap indexes "
                         f"at most {MAX_WINDOW}")
    return C, H, W, N, KH, KW, SH, SW, (H - KH) // SH + 1, (W - KW) // SW + 1


def pool_output_shape(x_shape, kernel, stride) -> tuple[int, int, int, int]:
    """``(C, OH, OW, N)`` of max pooling ``x_shape`` = (C, H, W, N)."""
    C, _, _, N, _, _, _, _, OH, OW = _geometry("pool_output_shape", tuple(int(s) for s in x_shape), kernel, stride)
    return C, OH, OW, N


def max_pool_forward(x, kernel, stride, relu=False, *, y_out=None, tap_out=None, factor_out=None):
    """Max pooling (optionally fused with relu) of batch-last ``x``.

    Args:
        x: (C, H, W, N) float32 or float64, C-contiguous.
        kernel, stride: ints or (h, w) pairs; KH <= H, KW <= W, KH*KW <= 256.
        relu: True for the fused pool + relu (a conv -> relu -> maxpool block).
        y_out, tap_out, factor_out: optional outputs (C, OH, OW, N) of x's dtype,
            uint8 and x's dtype; factor_out only with relu=True.
    Returns:
        (y, tap, factor): factor (x's dtype, the backward multiplier) when relu,
        else None.
    Launches: 1, ``pool_max_forward[_f64]``, one thread per output:
        grid (ceil(C*OH*OW*N / 256), 1, 1), block (256, 1, 1).
    """
    func = "max_pool_forward"
    xp = _xp(x=x, y_out=y_out, tap_out=tap_out, factor_out=factor_out)
    dtype = _dtype(func, x=x)
    _ndim(func, "x", x, 4, "(C, H, W, N)")
    _positive(func, "x", x.shape)
    _contiguous(func, x=x)
    if factor_out is not None and not relu:
        raise ValueError(f"{func}: factor_out is only written with relu=True")
    C, H, W, N, KH, KW, SH, SW, OH, OW = _geometry(func, x.shape, kernel, stride)
    shape = (C, OH, OW, N)
    y = _out(func, "y_out", y_out, xp, shape, dtype)
    tap = _out(func, "tap_out", tap_out, xp, shape, np.uint8)
    factor = _out(func, "factor_out", factor_out, xp, shape, dtype) if relu else None
    loader.launch(_kernel("pool_max_forward", dtype),
                  (x, y, tap, factor if relu else y, C, H, W, N, KH, KW, SH, SW, OH, OW, int(bool(relu))),
                  n_threads=y.size)
    return y, tap, factor


def max_pool_backward(dy, tap, factor, x_shape, kernel, stride, *, out=None):
    """Route ``dy`` (times ``factor``) to the taps: the gradient of :func:`max_pool_forward`.

    Args:
        dy: (C, OH, OW, N) float32 or float64, C-contiguous.
        tap: uint8, same shape, from :func:`max_pool_forward`.
        factor: from the fused relu forward (same shape and dtype as dy), or None.
        x_shape: (C, H, W, N) of the forward input.
        kernel, stride: as in the forward pass.
        out: optional output (C, H, W, N) of dy's dtype.
    Returns:
        dx (C, H, W, N): for each input element, the sum of dy * factor over the
        windows whose tap chose it, in increasing window order; 0 elsewhere.
    Launches: 1, ``pool_max_backward[_f64]``, one thread per input element (h, w from the grid,
        so no thread divides to find its element): grid (ceil(N / 32), W, H), block (32, min(C, 8), 1).
    """
    func = "max_pool_backward"
    xp = _xp(dy=dy, tap=tap, factor=factor, out=out)
    dtype = _dtype(func, dy=dy, factor=factor)
    if getattr(tap, "dtype", None) != np.uint8:
        raise TypeError(f"{func}: tap has dtype {getattr(tap, 'dtype', type(tap).__name__)}, expected uint8 "
                        "(as returned by max_pool_forward)")
    try:
        x_shape = tuple(int(s) for s in x_shape)
    except TypeError:
        raise TypeError(f"{func}: x_shape must be a 4-tuple of ints, got {x_shape!r}") from None
    if len(x_shape) != 4:
        raise ValueError(f"{func}: x_shape must be (C, H, W, N), got {x_shape}")
    _positive(func, "x_shape", x_shape)
    _contiguous(func, dy=dy, tap=tap, factor=factor)
    C, H, W, N, KH, KW, SH, SW, OH, OW = _geometry(func, x_shape, kernel, stride)
    shape = (C, OH, OW, N)
    _same_shape(func, "dy", dy, shape, f"x_shape {x_shape}, kernel {(KH, KW)}, stride {(SH, SW)}")
    _same_shape(func, "tap", tap, shape, "the shape of dy")
    if factor is not None:
        _same_shape(func, "factor", factor, shape, "the shape of dy")
    if max(H, W) > BACKWARD_MAX_HW:
        raise ValueError(f"{func}: x_shape {x_shape}: H and W must be at most {BACKWARD_MAX_HW} (the kernel's "
                         "grid has one block row per input row and column)")
    dx = _out(func, "out", out, xp, x_shape, dtype)
    loader.launch(_kernel("pool_max_backward", dtype),
                  (dy, tap, factor if factor is not None else dy, dx,
                   C, H, W, N, KH, KW, SH, SW, OH, OW, int(factor is not None)),
                  grid=(loader.ceil_div(N, 32), W, H), block=(32, min(C, 8), 1))
    return dx
