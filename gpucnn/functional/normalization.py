"""Batch normalisation, dropout and global average pooling, as function pairs (one ``xp`` path).

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

Dropout (inverted): while training ``y = x * mask / (1 - p)`` with ``mask``
Bernoulli(1 - p) from gpucnn's counter stream (:func:`gpucnn.random.uniform`:
the same masks on NumPy and CuPy, resumed exactly); identity in evaluation.

Global average pooling: ``y[c, n] = mean_{h,w} x[c, h, w, n]``; backward
spreads ``dy / (H W)`` over the plane.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import backend
from .. import random as grandom

__all__ = ["BatchNormSaved", "batch_norm_forward", "batch_norm_backward", "dropout_forward",
           "dropout_backward", "global_avg_pool_forward", "global_avg_pool_backward"]


class BatchNormSaved(NamedTuple):
    """``xhat`` and ``1/s`` per channel (training), or the eval-mode scale; gamma (or None)."""

    xhat: object
    inv_std: object
    gamma: object
    training: bool


def _stat_axes(x):
    return tuple(range(1, x.ndim))


def _per_channel(v, x):
    """Reshape a (C,) vector to broadcast against batch-last ``x``."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def batch_norm_forward(x, gamma, beta, running_mean, running_var, *, training, momentum, eps):
    """Normalise ``x`` per channel; updates the running estimates in place while training.

    Args:
        x: (C, ...) batch-last; gamma, beta: (C,) or None (affine=False).
        running_mean, running_var: (C,) buffers, updated in place when ``training``.
        momentum, eps: as PyTorch's BatchNorm.
    Returns:
        ``(y, saved)``.
    """
    xp = backend.get_array_module(x)
    t = x.dtype.type
    if training:
        axes = _stat_axes(x)
        m = x.size // x.shape[0]
        if m < 2:
            raise ValueError(f"batch normalisation needs more than 1 value per channel while training, "
                             f"got {m} (shape {tuple(x.shape)}); use a larger batch or eval mode")
        mean = x.mean(axis=axes)
        centred = x - _per_channel(mean, x)
        var = (centred * centred).mean(axis=axes)
        inv_std = 1 / xp.sqrt(var + t(eps))
        xhat = centred
        xhat *= _per_channel(inv_std, x)
        running_mean *= t(1 - momentum)
        running_mean += t(momentum) * mean
        running_var *= t(1 - momentum)
        running_var += t(momentum * m / (m - 1)) * var
    else:
        inv_std = 1 / xp.sqrt(running_var + t(eps))
        xhat = (x - _per_channel(running_mean, x)) * _per_channel(inv_std, x)
    y = xhat if gamma is None else xhat * _per_channel(gamma, x) + _per_channel(beta, x)
    return y, BatchNormSaved(xhat, inv_std, gamma, training)


def batch_norm_backward(dy, saved: BatchNormSaved):
    """``(dx, dgamma, dbeta)`` (the last two None without affine parameters)."""
    xhat, inv_std, gamma = saved.xhat, saved.inv_std, saved.gamma
    axes = _stat_axes(dy)
    dgamma = (dy * xhat).sum(axis=axes) if gamma is not None else None
    dbeta = dy.sum(axis=axes) if gamma is not None else None
    scale = inv_std if gamma is None else gamma * inv_std
    if not saved.training:
        return dy * _per_channel(scale, dy), dgamma, dbeta
    m = dy.size // dy.shape[0]
    t = dy.dtype.type
    sum_g = dbeta if dbeta is not None else dy.sum(axis=axes)
    sum_gx = dgamma if dgamma is not None else (dy * xhat).sum(axis=axes)
    dx = dy * t(m)
    dx -= _per_channel(sum_g, dy)
    dx -= xhat * _per_channel(sum_gx, dy)
    dx *= _per_channel(scale / t(m), dy)
    return dx, dgamma, dbeta


def dropout_forward(x, p, training, mask=None):
    """``(y, scale mask or None)``: inverted dropout while training, identity otherwise.

    ``mask`` (same shape as x, 0/1) overrides the random draw (for tests).
    """
    if not training or p == 0:
        return x, None
    xp = backend.get_array_module(x)
    t = x.dtype.type
    if mask is None:
        keep = grandom.uniform(x.shape, xp, x.dtype) >= t(p)
    else:
        keep = mask != 0
    scale = keep.astype(x.dtype)
    scale *= t(1 / (1 - p))
    return x * scale, scale


def dropout_backward(dy, scale):
    return dy if scale is None else dy * scale


def global_avg_pool_forward(x):
    """``(C, H, W, N) -> (C, N)``: the mean of each plane."""
    return x.mean(axis=(1, 2)), tuple(x.shape)


def global_avg_pool_backward(dy, x_shape):
    xp = backend.get_array_module(dy)
    C, H, W, N = x_shape
    out = xp.empty(x_shape, dtype=dy.dtype)
    out[...] = (dy * dy.dtype.type(1.0 / (H * W)))[:, None, None, :]
    return out
