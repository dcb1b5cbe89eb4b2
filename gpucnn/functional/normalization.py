"""Batch normalisation as a function pair (one ``xp`` path).

All on batch-last arrays: the channel axis is 0 -- ``(C, H, W, N)`` images,
``(C, N)`` vectors -- and statistics are taken over every other axis (the
``m = N*H*W`` values of a channel).

Batch normalisation (Ioffe & Szegedy), training mode, per channel::

    mu = (1/m) sum x        var = (1/m) sum (x - mu)^2   (biased, for normalising)
    xhat = (x - mu) / s     s = sqrt(var + eps)
    y = gamma * xhat + beta

Backward, in closed form (no composed primitives): with ``g = dL/dy``,

    dL/dbeta  = sum g
    dL/dgamma = sum g * xhat
    dL/dx     = (gamma / (m s)) * (m g - sum g - xhat * sum(g * xhat))

derived from ``dxhat = gamma g``, ``dvar = sum(dxhat (x - mu)) * (-1/2) s^-3``,
``dmu = -sum(dxhat)/s + dvar * (-2/m) sum(x - mu)`` (the last sum is 0) and
``dx = dxhat / s + dvar * 2 (x - mu) / m + dmu / m``; substituting
``x - mu = s xhat`` collects it into the line above.  The running estimates
move by ``momentum`` towards the batch's mean and its *unbiased* variance
``var * m / (m - 1)`` (as PyTorch).  Evaluation mode normalises with the
running estimates, an affine map: ``dL/dx = gamma g / sqrt(running_var + eps)``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend
from .. import threads
from .workspace import get

__all__ = ["BatchNormSaved", "batch_norm_forward", "batch_norm_backward"]


class BatchNormSaved(NamedTuple):
    """``xhat`` and ``1/s`` per channel (training), or the eval-mode scale; gamma (or None)."""

    xhat: object
    inv_std: object
    gamma: object
    training: bool


def _channel_blocks(xp, C):
    """Rows (channels) per block: the NumPy path spreads them over gpucnn's threads (every
    channel's arithmetic is the same in any block, so the bits do not depend on the thread
    count); CuPy takes them all at once."""
    if xp is not np:
        return [(0, C)]
    return threads.split(C, parts=threads.get_num_threads())


def _row_dot(xp, a, b):
    """``sum(a * b, axis=1)`` of two (rows, m) arrays in one pass, no temporary."""
    return xp.einsum("ij,ij->i", a, b)


def batch_norm_forward(x, gamma, beta, running_mean, running_var, *, training, momentum, eps, ws=None):
    """Normalise ``x`` per channel; updates the running estimates in place while training.

    Args:
        x: (C, ...) batch-last; gamma, beta: (C,) or None (affine=False).
        running_mean, running_var: (C,) buffers, updated in place when ``training``.
        momentum, eps: as PyTorch's BatchNorm.
        ws: a :class:`~gpucnn.functional.workspace.Workspace` for ``xhat`` and ``y``
            (reused across steps; the result is then that buffer).
    Returns:
        ``(y, saved)``.

    Each channel is one contiguous row of ``m`` values; on NumPy blocks of rows run on
    gpucnn's threads.  Per row: the mean, ``xhat = x - mean`` in place, the variance as one
    fused sum of squares of it, then ``xhat *= 1/s`` and ``y = gamma xhat + beta`` -- five
    passes over the data.
    """
    xp = backend.get_array_module(x)
    t = x.dtype.type
    C = x.shape[0]
    x2 = x.reshape(C, -1)                       # a channel's m values are one contiguous row
    m = x2.shape[1]
    if training and m < 2:
        raise ValueError(f"batch normalisation needs more than 1 value per channel while training, "
                         f"got {m} (shape {tuple(x.shape)}); use a larger batch or eval mode")
    xhat = get(ws, "bn.xhat", x2.shape, x.dtype, xp)
    y = xhat if gamma is None else get(ws, "bn.y", x2.shape, x.dtype, xp)

    def rows(c0, c1):
        r = slice(c0, c1)
        mean = x2[r].mean(axis=1) if training else running_mean[r]
        xp.subtract(x2[r], mean[:, None], out=xhat[r])        # centred, normalised in place below
        var = _row_dot(xp, xhat[r], xhat[r]) / t(m) if training else running_var[r]
        inv_std = 1 / xp.sqrt(var + t(eps))
        xhat[r] *= inv_std[:, None]
        if gamma is not None:
            xp.multiply(xhat[r], gamma[r, None], out=y[r])
            y[r] += beta[r, None]
        return mean, var, inv_std

    parts = threads.map_each(rows, _channel_blocks(xp, C))
    mean, var, inv_std = parts[0] if len(parts) == 1 else (xp.concatenate(v) for v in zip(*parts))
    if training:
        running_mean *= t(1 - momentum)
        running_mean += t(momentum) * mean
        running_var *= t(1 - momentum)
        running_var += t(momentum * m / (m - 1)) * var
    return y.reshape(x.shape), BatchNormSaved(xhat, inv_std, gamma, training)


def batch_norm_backward(dy, saved: BatchNormSaved, ws=None):
    """``(dx, dgamma, dbeta)`` (the last two None without affine parameters).

    Per channel row: ``sum g`` and the fused ``sum g xhat`` (one pass each), then
    ``dx = g scale - xhat (scale/m) sum(g xhat) - (scale/m) sum g`` in three passes
    (``scale = gamma / s``; evaluation mode: ``dx = g scale``).
    """
    xhat, inv_std, gamma = saved.xhat, saved.inv_std, saved.gamma
    xp = backend.get_array_module(dy)
    C = dy.shape[0]
    g2 = dy.reshape(C, -1)
    m = g2.shape[1]
    t = dy.dtype.type
    scale = inv_std if gamma is None else gamma * inv_std
    k = scale / t(m)
    dx = get(ws, "bn.dx", g2.shape, dy.dtype, xp)
    tmp = get(ws, "bn.tmp", g2.shape, dy.dtype, xp) if saved.training else None

    def rows(c0, c1):
        r = slice(c0, c1)
        sum_gx = _row_dot(xp, g2[r], xhat[r])
        sum_g = g2[r].sum(axis=1)
        xp.multiply(g2[r], scale[r, None], out=dx[r])
        if saved.training:
            xp.multiply(xhat[r], (k[r] * sum_gx)[:, None], out=tmp[r])
            dx[r] -= tmp[r]
            dx[r] -= (k[r] * sum_g)[:, None]
        return sum_gx, sum_g

    parts = threads.map_each(rows, _channel_blocks(xp, C))
    sum_gx, sum_g = parts[0] if len(parts) == 1 else (xp.concatenate(v) for v in zip(*parts))
    dgamma, dbeta = (sum_gx, sum_g) if gamma is not None else (None, None)
    return dx.reshape(dy.shape), dgamma, dbeta
