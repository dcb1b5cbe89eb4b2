"""Gather a mini-batch from a device-resident dataset into the batch-last layout
(kernels/batch.cu).

``x[..., n] = images[idx[n]]`` and ``y[n] = labels[idx[n]]``: images are the
normalised dataset (Ntotal, C, H, W) (any (Ntotal, ...) works) on the device,
labels (Ntotal,) int32 or int64, idx (N,) int32 or int64 (e.g. a slice of the
epoch's permutation); int64 arrays are read as int32 word pairs (no copy).

An index outside [0, Ntotal) does not read out of bounds: its column of x is
NaN and its label -1 (so the step's loss is NaN; nothing syncs to raise).  An
int64 label outside [0, 2**31) becomes -1 (invalid for the loss kernels).
"""
from __future__ import annotations

import numpy as np

from . import loader
from .elementwise import _contiguous, _dtype, _kernel, _out, _positive, _same_shape, _words, _xp

__all__ = ["GATHER_TILE", "GATHER_BLOCK", "gather_launch", "gather_batch"]

#: (features, samples) of one block's tile, and the block.
GATHER_TILE = 32
GATHER_BLOCK = (32, 8, 1)


def gather_launch(features: int, N: int):
    """``(grid, block)`` of :func:`gather_batch` for F = C*H*W features and N samples."""
    return (loader.ceil_div(features, GATHER_TILE), loader.ceil_div(N, GATHER_TILE), 1), GATHER_BLOCK


def gather_batch(images, labels, idx, *, x_out=None, y_out=None):
    """Gather samples ``idx`` of (images, labels) into batch-last (x, y).

    Args:
        images: (Ntotal, C, H, W) (or (Ntotal, ...)) float32 or float64, C-contiguous.
        labels: (Ntotal,) int32 or int64.
        idx: (N,) int32 or int64, the samples to take (repeats allowed).
        x_out, y_out: optional outputs (C, H, W, N) of the images' dtype and (N,) int32.
    Returns:
        (x, y): x (C, H, W, N), y (N,) int32.
    Launches: 1, ``gather_batch[_f64]`` (a shared-memory 32 x 32 transpose):
        grid (ceil(C*H*W / 32), ceil(N / 32), 1), block (32, 8, 1).
    """
    func = "gather_batch"
    xp = _xp(images=images, labels=labels, idx=idx, x_out=x_out, y_out=y_out)
    dtype = _dtype(func, images=images)
    if images.ndim < 2:
        raise ValueError(f"{func}: images must be (Ntotal, C, H, W) (at least 2-D), got shape {tuple(images.shape)}")
    _positive(func, "images", images.shape)
    _contiguous(func, images=images)
    Ntotal = int(images.shape[0])
    sample = tuple(int(s) for s in images.shape[1:])
    F = images.size // Ntotal
    label_words, lw = _words(func, "labels", labels)
    _same_shape(func, "labels", labels, (Ntotal,), f"one per image of images {tuple(images.shape)}")
    idx_words, iw = _words(func, "idx", idx)
    if idx.ndim != 1 or idx.shape[0] < 1:
        raise ValueError(f"{func}: idx must be 1-D with N >= 1 entries, got shape {tuple(idx.shape)}")
    N = int(idx.shape[0])
    if loader.ceil_div(N, GATHER_TILE) > 65535:
        raise ValueError(f"{func}: N = {N} samples; the grid's y dimension allows at most {65535 * GATHER_TILE}")
    x = _out(func, "x_out", x_out, xp, sample + (N,), dtype)
    y = _out(func, "y_out", y_out, xp, (N,), np.int32)
    grid, block = gather_launch(F, N)
    loader.launch(_kernel(func, dtype), (images, label_words, lw, idx_words, iw, x, y, Ntotal, F, N),
                  grid=grid, block=block)
    return x, y
