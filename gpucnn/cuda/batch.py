"""Gather a mini-batch from a device-resident dataset into the batch-last layout
(kernels/batch.cu).

``x[..., n] = images[idx[n]]`` and ``y[n] = labels[idx[n]]``: images are the
normalised dataset (Ntotal, C, H, W) (any (Ntotal, ...) works) on the device,
labels (Ntotal,) int32 or int64, idx (N,) int32 or int64 (e.g. a slice of the
epoch's permutation); int64 arrays are read as int32 word pairs (no copy).

:func:`gather_batch_augment_u8` takes the raw uint8 dataset instead and
normalises each pixel per channel on the way (the float32 batch the float
dataset would give, bit for bit).

An index outside [0, Ntotal) does not read out of bounds: its column of x is
NaN and its label -1 (so the step's loss is NaN; nothing syncs to raise).  An
int64 label outside [0, 2**31) becomes -1 (invalid for the loss kernels).
"""
from __future__ import annotations

import numpy as np

from ..random import check_start, hash_key
from . import loader
from .elementwise import _contiguous, _dtype, _kernel, _out, _positive, _same_shape, _words, _xp

__all__ = ["GATHER_TILE", "GATHER_BLOCK", "gather_launch", "gather_batch", "gather_batch_augment",
           "gather_batch_augment_u8", "augment_key_words"]

#: (features, samples) of one block's tile, and the block.
GATHER_TILE = 32
GATHER_BLOCK = (32, 8, 1)


def gather_launch(features: int, N: int):
    """``(grid, block)`` of :func:`gather_batch` for F = C*H*W features and N samples."""
    return (loader.ceil_div(features, GATHER_TILE), loader.ceil_div(N, GATHER_TILE), 1), GATHER_BLOCK


def _checked(func, images, labels, idx):
    """The checks every gather shares: ``(dtype, Ntotal, sample shape, label words, idx words, N)``."""
    if func.endswith("_u8"):
        if getattr(images, "dtype", None) != np.dtype(np.uint8):
            raise TypeError(f"{func}: images must be uint8, got {getattr(images, 'dtype', type(images).__name__)}")
        dtype = np.dtype(np.float32)
    else:
        dtype = _dtype(func, images=images)
    if images.ndim < 2:
        raise ValueError(f"{func}: images must be (Ntotal, C, H, W) (at least 2-D), got shape {tuple(images.shape)}")
    _positive(func, "images", images.shape)
    _contiguous(func, images=images)
    Ntotal = int(images.shape[0])
    sample = tuple(int(s) for s in images.shape[1:])
    label_words = _words(func, "labels", labels)
    _same_shape(func, "labels", labels, (Ntotal,), f"one per image of images {tuple(images.shape)}")
    idx_words = _words(func, "idx", idx)
    if idx.ndim != 1 or idx.shape[0] < 1:
        raise ValueError(f"{func}: idx must be 1-D with N >= 1 entries, got shape {tuple(idx.shape)}")
    N = int(idx.shape[0])
    if loader.ceil_div(N, GATHER_TILE) > 65535:
        raise ValueError(f"{func}: N = {N} samples; the grid's y dimension allows at most {65535 * GATHER_TILE}")
    return dtype, Ntotal, sample, label_words, idx_words, N


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
    dtype, Ntotal, sample, (label_words, lw), (idx_words, iw), N = _checked(func, images, labels, idx)
    F = images.size // Ntotal
    x = _out(func, "x_out", x_out, xp, sample + (N,), dtype)
    y = _out(func, "y_out", y_out, xp, (N,), np.int32)
    grid, block = gather_launch(F, N)
    loader.launch(_kernel(func, dtype), (images, label_words, lw, idx_words, iw, x, y, Ntotal, F, N),
                  grid=grid, block=block)
    return x, y


def augment_key_words(key, start: int = 0) -> np.ndarray:
    """The (4,) int32 words (low, high) of :func:`gpucnn.random.hash_key` of ``key`` and of
    ``start`` -- what :func:`gather_batch_augment` reads from device memory for a batch whose
    first sample is at position ``start`` of the stream ``key`` (e.g. ``(seed, epoch)``)."""
    check_start(start)
    return np.array([hash_key(key), int(start)], np.uint64).view(np.int32)


def gather_batch_augment(images, labels, idx, key_words, *, fill, max_shift: int = 2, flip: bool = False,
                         x_out=None, y_out=None):
    """:func:`gather_batch` with :func:`gpucnn.data.augment.augment_batch` folded in.

    ``x`` is, bit for bit, ``to_internal(augment_batch(images[idx], key, fill=fill,
    max_shift=max_shift, flip=flip, start=start))`` for ``key_words =
    augment_key_words(key, start)``:
    each sample shifted by its ``(dy, dx)`` in ``[-max_shift, max_shift]`` (the
    uncovered border ``fill``) and, with ``flip``, half of them mirrored
    left-right, drawn from the same hash as the NumPy path.

    Args:
        images: (Ntotal, C, H, W) float32 or float64, C-contiguous.
        labels, idx, x_out, y_out: as :func:`gather_batch`.
        key_words: (4,) int32 on the images' device (:func:`augment_key_words`).
        fill: the background value (a float, converted to the images' dtype).
        max_shift: the largest shift per axis (int >= 0); flip: mirror half the images.
    Returns:
        (x, y): x (C, H, W, N), y (N,) int32.
    Launches: 1, ``gather_batch_augment[_f64]``, the grid and block of :func:`gather_batch`.
    """
    func = "gather_batch_augment"
    xp = _xp(images=images, labels=labels, idx=idx, key_words=key_words, x_out=x_out, y_out=y_out)
    dtype, Ntotal, sample, (label_words, lw), (idx_words, iw), N = _checked(func, images, labels, idx)
    if images.ndim != 4:
        raise ValueError(f"{func}: images must be (Ntotal, C, H, W), got shape {tuple(images.shape)}")
    _augment_args(func, key_words, max_shift, flip, fill)
    C, H, W = sample
    x = _out(func, "x_out", x_out, xp, sample + (N,), dtype)
    y = _out(func, "y_out", y_out, xp, (N,), np.int32)
    grid, block = gather_launch(C * H * W, N)
    loader.launch(_kernel(func, dtype), (images, label_words, lw, idx_words, iw, key_words, x, y, Ntotal,
                                         C, H, W, N, int(max_shift), int(bool(flip)), dtype.type(fill)),
                  grid=grid, block=block)
    return x, y


def _augment_args(func, key_words, max_shift, flip, fill):
    """The checks of the augmenting gathers' own arguments."""
    if getattr(key_words, "dtype", None) != np.dtype(np.int32) or tuple(key_words.shape) != (4,):
        raise ValueError(f"{func}: key_words must be a (4,) int32 array (augment_key_words(key, start)), got "
                         f"{getattr(key_words, 'dtype', type(key_words).__name__)} "
                         f"{tuple(getattr(key_words, 'shape', ()))}")
    _contiguous(func, key_words=key_words)
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) or max_shift < 0:
        raise ValueError(f"{func}: max_shift must be a non-negative int, got max_shift={max_shift!r}")
    if not isinstance(flip, (bool, np.bool_)):
        raise TypeError(f"{func}: flip must be a bool, got flip={flip!r}")
    if isinstance(fill, bool) or not isinstance(fill, (int, float, np.floating, np.integer)):
        raise TypeError(f"{func}: fill must be a number, got fill={fill!r}")


def gather_batch_augment_u8(images, labels, idx, key_words, scale, shift, *, fill, max_shift: int = 2,
                            flip: bool = False, x_out=None, y_out=None):
    """:func:`gather_batch_augment` on a uint8 dataset, normalised per channel on the way.

    ``x`` is, bit for bit, ``to_internal(augment_batch(normalize(images[idx], mean=mean,
    std=std), key, fill=fill, max_shift=max_shift, flip=flip, start=start))`` where
    ``scale, shift = channel_affine(mean, std, C)`` (:func:`gpucnn.data.channel_affine`):
    each in-bounds pixel becomes ``float32(p) * scale[c] - shift[c]``, rounded after each op.

    Args:
        images: (Ntotal, C, H, W) uint8, C-contiguous (the raw training set on the device).
        labels, idx, key_words, fill, max_shift, flip, x_out, y_out: as :func:`gather_batch_augment`
            (``max_shift=0, flip=False``: a plain normalising gather).
        scale, shift: (C,) float32 on the device.
    Returns:
        (x, y): x (C, H, W, N) float32, y (N,) int32.
    Launches: 1, ``gather_batch_augment_u8``, the grid and block of :func:`gather_batch`.
    """
    func = "gather_batch_augment_u8"
    xp = _xp(images=images, labels=labels, idx=idx, key_words=key_words, scale=scale, shift=shift,
             x_out=x_out, y_out=y_out)
    dtype, Ntotal, sample, (label_words, lw), (idx_words, iw), N = _checked(func, images, labels, idx)
    if images.ndim != 4:
        raise ValueError(f"{func}: images must be (Ntotal, C, H, W), got shape {tuple(images.shape)}")
    _augment_args(func, key_words, max_shift, flip, fill)
    C, H, W = sample
    for name, a in (("scale", scale), ("shift", shift)):
        if getattr(a, "dtype", None) != np.dtype(np.float32) or tuple(a.shape) != (C,):
            raise ValueError(f"{func}: {name} must be a ({C},) float32 array (one per channel, "
                             f"gpucnn.data.channel_affine), got {getattr(a, 'dtype', type(a).__name__)} "
                             f"{tuple(getattr(a, 'shape', ()))}")
    _contiguous(func, scale=scale, shift=shift)
    x = _out(func, "x_out", x_out, xp, sample + (N,), dtype)
    y = _out(func, "y_out", y_out, xp, (N,), np.int32)
    grid, block = gather_launch(C * H * W, N)
    loader.launch(func, (images, label_words, lw, idx_words, iw, key_words, scale, shift, x, y, Ntotal,
                         C, H, W, N, int(max_shift), int(bool(flip)), np.float32(fill)),
                  grid=grid, block=block)
    return x, y
