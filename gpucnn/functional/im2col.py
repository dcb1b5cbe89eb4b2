"""im2col and its relatives: the NumPy convolution machinery.

The NumPy convolution works in a batch-innermost layout, (C, H, W, N): every
window row is then one long contiguous run, and a whole layer is a single
GEMM over a column matrix instead of N small ones.

* :func:`to_chwn` -- NCHW -> zero-padded, contiguous (C, Hp, Wp, N);
* :func:`im2col` -- the column matrix of a padded (C, Hp, Wp, N) array;
* :func:`col2im` -- its adjoint (scatter-add), the NumPy dL/dx;
* :func:`correlate_valid` and :func:`conv2d_backward_input_seed` -- the
  seeds' rotated-kernel full convolution, written out literally, which the
  tests hold the GPU gather kernel and :func:`col2im` against.

Every function takes the array module from its arguments (``xp``), so they
also run on CuPy arrays (the ``method="gemm"`` weight gradient does).
"""
from __future__ import annotations

from .. import backend

__all__ = ["to_chwn", "im2col", "col2im", "correlate_valid", "conv2d_backward_input_seed"]


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
