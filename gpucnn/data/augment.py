"""Training-time augmentation: random translations (and horizontal flips), on the data's device.

For every image of a batch, a shift ``(dy, dx)`` with each in
``[-max_shift, max_shift]`` (default 2 pixels; a crop with padding), the
uncovered border filled with ``fill`` (``gpucnn train``: the normalised black
of a gray dataset, ``normalize(0)``, and 0 -- the mean colour -- for colour
ones); with ``flip=True`` (for datasets where a mirror image is still the same
class, e.g. Fashion-MNIST, CIFAR-10 -- not digits) half the images are
mirrored left-right.  :func:`augment_uint8_batch` does the same to samples of
a uint8 dataset after normalising them per channel (the device kernel's
NumPy twin).  The draws come from
:func:`gpucnn.random.hash_uniform` keyed by ``(seed, epoch)``, each image's
three (dy, dx, mirror) at the counters ``3 p, 3 p + 1, 3 p + 2`` of its
position ``p`` in the epoch's order: the image at position ``p`` is shifted
the same way whichever batch, rank or number of ranks takes it.  So the same
run always sees the same augmented batches, on NumPy and CuPy alike, any rank
count sees what one process sees, and a resumed run (on any rank count)
continues them exactly, with no state to save.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..random import check_start, hash_uniform

__all__ = ["augment_batch", "augment_uint8_batch", "FLIP_DATASETS", "AUGMENT_SCHEME"]

#: Datasets whose images may be mirrored left-right without changing their class.
FLIP_DATASETS = ("fashion-mnist",)

#: How the shifts are drawn, recorded in each checkpoint beside the shuffle's scheme: a resume
#: under another scheme cannot continue the run bit for bit (and says so).
AUGMENT_SCHEME = "hash_uniform((seed, epoch)), counters 3*position in the epoch's order"


def augment_batch(x, key, *, fill, max_shift: int = 2, flip: bool = False, start: int = 0):
    """A randomly shifted (and flipped) copy of the NCHW batch ``x``.

    Args:
        x: (N, C, H, W) float images (normalised), NumPy or CuPy.
        key: ints identifying the stream, e.g. ``(seed, epoch)``.
        fill: the value of the background (the normalised value of a 0 pixel).
        max_shift: largest shift in pixels, per axis.
        flip: mirror half the images left-right.
        start: the position of ``x[0]`` in the stream (the epoch's order): image
            ``n`` draws from counters ``3 (start + n) + (0, 1, 2)``.
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative int, got max_shift={max_shift!r}")
    check_start(start)
    xp = backend.get_array_module(x)
    N, C, H, W = x.shape
    m = max_shift
    draws = hash_uniform(tuple(key), (N, 3), xp, np.float64, start=3 * int(start)).T   # (3, N): dy, dx, mirror
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


def augment_uint8_batch(images, idx, key, *, mean, std, fill, max_shift: int = 2, flip: bool = False,
                        start: int = 0):
    """Samples ``idx`` of a uint8 dataset, normalised per channel, then shifted (and flipped): the
    NumPy path of the device kernel ``gather_batch_augment_u8`` (:mod:`gpucnn.cuda.batch`), the
    same float32 bits -- :func:`gpucnn.data.normalize` (``float32(p) * scale[c] - shift[c]``, each op
    rounded) then :func:`augment_batch` (which only moves values and writes ``fill``).

    Args:
        images: (Ntotal, C, H, W) uint8 (NumPy or CuPy).
        idx: (N,) integer indices.
        key, fill, max_shift, flip, start: as :func:`augment_batch`.
        mean, std: per channel (or one number), of pixel / 255.
    """
    from .dataset import normalize

    xp = backend.get_array_module(images)
    x = backend.asnumpy(images[idx]) if xp is not np else images[idx]
    x = backend.to_device(normalize(x, mean=mean, std=std), backend.device_of(images))
    return augment_batch(x, key, fill=fill, max_shift=max_shift, flip=flip, start=start)
