"""Training-time augmentation: random translations (and horizontal flips), on the data's device.

For every image of a batch, a shift ``(dy, dx)`` with each in
``[-max_shift, max_shift]`` (default 2 pixels), the uncovered border filled
with the dataset's background (``normalize(0)``); with ``flip=True`` (for
datasets where a mirror image is still the same class, e.g. Fashion-MNIST --
not digits) half the images are mirrored left-right.  The draws come from
:func:`gpucnn.random.hash_uniform` keyed by ``(seed, epoch, step)``: the same
run always sees the same augmented batches, on NumPy and CuPy alike, and a
resumed run continues them exactly, with no state to save.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..random import hash_uniform

__all__ = ["augment_batch", "FLIP_DATASETS"]

#: Datasets whose images may be mirrored left-right without changing their class.
FLIP_DATASETS = ("fashion-mnist",)


def augment_batch(x, key, *, fill, max_shift: int = 2, flip: bool = False):
    """A randomly shifted (and flipped) copy of the NCHW batch ``x``.

    Args:
        x: (N, C, H, W) float images (normalised), NumPy or CuPy.
        key: ints identifying the batch, e.g. ``(seed, epoch, step)``.
        fill: the value of the background (the normalised value of a 0 pixel).
        max_shift: largest shift in pixels, per axis.
        flip: mirror half the images left-right.
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative int, got max_shift={max_shift!r}")
    xp = backend.get_array_module(x)
    N, C, H, W = x.shape
    m = max_shift
    draws = hash_uniform(tuple(key), (3, N), xp, np.float64)
    shifts = xp.floor(draws[:2] * (2 * m + 1)).astype(np.int64) - m      # (2, N) in [-m, m]
    padded = xp.full((N, C, H + 2 * m, W + 2 * m), fill, dtype=x.dtype)
    padded[:, :, m:m + H, m:m + W] = x
    out = xp.empty_like(x)
    shifts_host = backend.asnumpy(shifts)
    for dy in range(-m, m + 1):               # 25 slices, each a gather of the images shifted so
        for dx in range(-m, m + 1):
            which = np.flatnonzero((shifts_host[0] == dy) & (shifts_host[1] == dx))
            if which.size:
                idx = backend.to_device(which, backend.device_of(x))
                out[idx] = padded[idx, :, m - dy:m - dy + H, m - dx:m - dx + W]
    if flip:
        mirror = backend.to_device(np.flatnonzero(backend.asnumpy(draws[2]) < 0.5), backend.device_of(x))
        out[mirror] = out[mirror][..., ::-1]
    return out
