"""Images as the models saw them: real drawings and scans turned into MNIST-style 28x28.

The model saw MNIST-style images: a white digit on black, 28x28, its ink
scaled to fit 20x20 and its centre of mass in the middle.  Real drawings (a
web canvas, a paint program, a scan) are brought to that form by
:func:`preprocess`, which ``gpucnn predict`` and :func:`gpucnn.predict` (both in
:mod:`gpucnn.inference`) use, step by step:

1. **Grayscale, transparency composited.**  Any mode Pillow reads: 1-bit,
   8-bit and 16-bit gray (``I;16``, ``I``), float (``F``), RGB, palette,
   CMYK, ...; EXIF orientation is applied.  Transparency (RGBA, LA, palette
   or gray/RGB PNGs with a ``tRNS`` chunk, premultiplied ``RGBa``/``La``) is
   composited onto white: ``gray * alpha + white * (1 - alpha)`` (for
   premultiplied data ``gray + white * (1 - alpha)``), so dark ink on a
   transparent canvas becomes dark ink on white paper.  When everything
   visible is light (white ink on a transparent canvas) it is composited onto
   black instead, so the ink is never lost.
2. **Polarity.**  ``invert="auto"``: inverted when the image's border
   (median of an outer ring) is light, i.e. dark ink on light paper;
   white-on-black is kept.  ``"yes"`` / ``"no"`` force it.
3. **Ink.**  The background level (median of the border) is subtracted and
   its noise (3 robust standard deviations of the border, from its median
   absolute deviation) is cut off.  For MNIST the contrast is then stretched
   so that the strokes' cores are white: light pencil looks like pen, and a
   real MNIST digit is left as it is.  An image with no ink (fewer than 3
   pixels at least 20 gray levels above the background's noise: blank,
   uniform, or a light image forced with ``invert="no"``) gets a
   :class:`BlankImageWarning` naming it (the prediction is still made).
4. **Framing** (``center=True``, the default), as MNIST was made: crop to
   the ink's bounding box (pixels over half the stroke intensity; isolated
   pixels and, in images over 56 pixels, small specks of dust left out;
   grown to include the adjacent anti-aliased edges), scale it keeping its
   aspect ratio so its longer side is 20 pixels (area averaging when
   shrinking, bicubic when enlarging; strokes' cores back to white after
   shrinking), and paste it into 28x28 with its centre of mass at (14, 14)
   (a whole-pixel shift; the mean over the MNIST test set is (13.99,
   14.01)).  Images over 560 pixels are first shrunk to 560 (area
   averaging).  A real 28x28 MNIST digit comes out as it went in (its box is
   already 20 pixels and it is already centred: over the first 2000 test
   digits the mean change is 0.1 gray level, the largest 12).  Fashion-MNIST was framed
   differently (longer side 28, bounding box centred, no contrast stretch)
   and is preprocessed that way.
   ``center=False`` (``--no-center``): no cropping, scaling or contrast
   change, only steps 1-2 and a plain (Lanczos) resize to 28x28 -- right for
   images that are already framed like MNIST.
5. **Normalisation** with the training dataset's mean and std
   (:func:`gpucnn.data.normalize`), in :func:`gpucnn.inference.predict_images`.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import backend

__all__ = ["BlankImageWarning", "INVERT_CHOICES", "SIZE", "preprocess", "load_image"]

#: Side of the images the models take.
SIZE = 28

INVERT_CHOICES = ("auto", "yes", "no")

#: Ink must stand this far (gray levels / 255) above the background's noise ...
_MIN_CONTRAST = 20 / 255
#: ... in at least this many pixels, or the image counts as blank.
_MIN_INK_PIXELS = 3
#: Bounding box: "strong" ink (relative to the strokes' intensity, after the
#: background is removed), grown into the "weak" (anti-aliased) edge pixels.
_STRONG, _WEAK = 0.5, 0.05
#: In images larger than 56 pixels, a blob of ink with under 10% of the largest blob's area and
#: under 20% of its longer side is a speck (dust on a scan), left out of the bounding box.
_SPECK_AREA, _SPECK_SIDE = 0.10, 0.20
#: A 28x28 image whose ink is already 20 pixels and whose centre of mass is this
#: close to (14, 14) is kept where it is.
_KEEP = 0.6
#: In the framing path, larger images are first shrunk (area averaging) to this side.
_WORK_SIDE = 560


class BlankImageWarning(UserWarning):
    """An image has no ink (blank or uniform): its prediction means nothing."""


@dataclass(frozen=True)
class _Framing:
    box: int          # the longer side of the ink's bounding box after scaling
    by_mass: bool     # centre of mass (MNIST) or bounding box (Fashion-MNIST) in the middle
    stretch: bool     # contrast stretch: strokes' cores to white


_FRAMINGS = {
    "mnist": _Framing(box=20, by_mass=True, stretch=True),
    # Fashion-MNIST's README: longest edge resized to 28, shortest edge extended
    # to 28 with the image in the centre of the canvas.
    "fashion-mnist": _Framing(box=28, by_mass=False, stretch=False),
}


def _check_invert(invert) -> None:
    if invert not in INVERT_CHOICES:
        raise ValueError(f"invert must be auto, yes or no, got invert={invert!r}")


# -- reading: anything -> (gray, alpha, premultiplied), floats in [0, 1] ------------------------

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as Pillow's convert("L")


def _split_channels(a: np.ndarray):
    """(H, W), (H, W, 1|2|3|4) floats in [0, 1] -> (gray, alpha or None)."""
    if a.ndim == 2:
        return a, None
    c = a.shape[2]
    if c == 1:
        return a[..., 0], None
    if c == 2:
        return a[..., 0], a[..., 1]
    if c == 3:
        return a @ _LUMA, None
    return a[..., :3] @ _LUMA, a[..., 3]


def _from_array(a, name: str):
    if backend.is_cupy(a):
        a = backend.asnumpy(a)
    a = np.asarray(a)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 2, 3, 4)):
        raise ValueError(f"{name}: an image array must be (H, W) gray or (H, W, C) with C = 1, 2 (gray, "
                         f"alpha), 3 (RGB) or 4 (RGBA), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: empty image array, shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if a.dtype.kind not in "ui":
        raise TypeError(f"{name}: image arrays must hold integer pixel values 0..255 (e.g. uint8), got dtype "
                        f"{a.dtype}; for floats in [0, 1] pass (a * 255).round().astype(np.uint8)")
    if a.dtype != np.uint8 and (a.min() < 0 or a.max() > 255):
        raise ValueError(f"{name}: pixel values must lie in 0..255, got range [{a.min()}, {a.max()}] "
                         f"(16-bit data: pass (a >> 8).astype(np.uint8), or a PIL image)")
    g, alpha = _split_channels(a.astype(np.float64) / 255.0)
    return g, alpha, False


def _from_pil(im):
    """A PIL image -> (gray, alpha or None, premultiplied)."""
    mode = im.mode
    if mode in ("P", "PA") or ("transparency" in im.info and mode in ("1", "L", "RGB")):
        im = im.convert("RGBA")  # palette colours, palette/tRNS transparency -> alpha
        mode = "RGBA"
    if mode == "1":
        im, mode = im.convert("L"), "L"
    if mode in ("L", "LA", "La", "RGB", "RGBA", "RGBa"):
        g, alpha = _split_channels(np.asarray(im, dtype=np.float64) / 255.0)
        return g, alpha, mode in ("La", "RGBa")
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float64) / 65535.0, None, False
    if mode == "I":  # 32-bit integers: 16-bit data when it exceeds 8 bits
        a = np.asarray(im).astype(np.float64)
        return np.clip(a / (65535.0 if a.max() > 255 else 255.0), 0, 1), None, False
    if mode == "F":  # floats: [0, 1] when they fit, else 0..255
        a = np.nan_to_num(np.asarray(im).astype(np.float64))
        return np.clip(a if a.max() <= 1.0 else a / 255.0, 0, 1), None, False
    g, alpha = _split_channels(np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0)  # CMYK, YCbCr, ...
    return g, alpha, False


def _open(path):
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if p.is_dir():
        raise ValueError(f"{path}: is a directory, not an image file")
    try:
        with Image.open(p) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except PermissionError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: not an image Pillow can read ({exc})") from None
    return im


def _read(image, name: str):
    if isinstance(image, (str, os.PathLike)):
        return _from_pil(_open(image))
    if isinstance(image, np.ndarray) or backend.is_cupy(image):
        return _from_array(image, name)
    from PIL import Image

    if isinstance(image, Image.Image):
        return _from_pil(image)
    raise TypeError(f"{name}: expected an image file path, a PIL image or a uint8 array, "
                    f"got {type(image).__name__}")


def _composite(g: np.ndarray, alpha, premultiplied: bool) -> np.ndarray:
    """Flatten transparency: onto white, or onto black when all that is visible is light."""
    if alpha is None:
        return g
    colour = g if premultiplied else g * alpha
    paper = 1.0
    visible = alpha > 0.5
    if alpha.min() < 1 and visible.any():
        straight = g / np.maximum(alpha, 1e-12) if premultiplied else g
        if np.percentile(straight[visible], 1) > 0.5:  # white ink on a transparent canvas
            paper = 0.0
    return np.clip(colour + paper * (1.0 - alpha), 0.0, 1.0)


# -- the pipeline ------------------------------------------------------------------------------


def _ring(g: np.ndarray) -> np.ndarray:
    h, w = g.shape
    b = max(1, min(h, w) // SIZE)
    return np.concatenate([g[:b].ravel(), g[-b:].ravel(), g[:, :b].ravel(), g[:, -b:].ravel()])


def _resize(a: np.ndarray, size, resample) -> np.ndarray:
    """Resize a float image (``size`` = (width, height)) with Pillow's mode ``F``."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(a, dtype=np.float32)).resize(size, resample),
                      dtype=np.float64)


def _isolated(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` none of whose 8 neighbours is set."""
    p = np.pad(mask, 1).astype(np.uint8)
    h, w = mask.shape
    n = sum(p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            if dy or dx)
    return mask & (n == 0)


def _components(mask: np.ndarray):
    """8-connected components of ``mask``: ``[(area, r0, r1, c0, c1)]`` (boxes end-exclusive).

    Run-length union-find: one pass over the rows' runs, no SciPy needed.
    """
    parent: list[int] = []

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    runs, prev = [], []
    row = np.zeros(mask.shape[1] + 2, bool)
    for r in range(mask.shape[0]):
        row[1:-1] = mask[r]
        edges = np.flatnonzero(row[1:] != row[:-1])
        cur, j = [], 0
        for s, e in zip(edges[::2].tolist(), edges[1::2].tolist()):  # columns [s, e)
            i = len(parent)
            parent.append(i)
            while j < len(prev) and prev[j][1] < s:  # ends left of s - 1: touches no later run either
                j += 1
            k = j
            while k < len(prev) and prev[k][0] <= e:  # overlaps [s - 1, e]: 8-connected
                a, b = find(i), find(prev[k][2])
                if a != b:
                    parent[max(a, b)] = min(a, b)
                k += 1
            cur.append((s, e, i))
            runs.append((r, s, e, i))
        prev = cur
    comps: dict[int, list[int]] = {}
    for r, s, e, i in runs:
        c = comps.setdefault(find(i), [0, r, r + 1, s, e])
        c[0] += e - s
        c[2], c[3], c[4] = r + 1, min(c[3], s), max(c[4], e)
    return [tuple(c) for c in comps.values()]


def _ink_box(n: np.ndarray):
    """(r0, r1, c0, c1), end-exclusive: strong ink's box, grown over adjacent anti-aliased pixels.

    Specks are left out: isolated pixels, and in larger images (a scan, a
    photo) small blobs (see ``_SPECK_AREA``).
    """
    strong = n > _STRONG
    clean = strong & ~_isolated(strong)
    if clean.any():
        strong = clean
    if max(strong.shape) > 2 * SIZE:
        comps = _components(strong)
        longest = [max(r1 - r0, c1 - c0) for _, r0, r1, c0, c1 in comps]
        big_area, big_side = max(c[0] for c in comps), max(longest)
        comps = [c for c, side in zip(comps, longest)
                 if c[0] >= _SPECK_AREA * big_area or side >= _SPECK_SIDE * big_side]
        r0, r1 = min(c[1] for c in comps), max(c[2] for c in comps)
        c0, c1 = min(c[3] for c in comps), max(c[4] for c in comps)
    else:
        rows, cols = np.nonzero(strong.any(axis=1))[0], np.nonzero(strong.any(axis=0))[0]
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    weak = n > _WEAK
    h, w = n.shape
    grown = True
    while grown:
        grown = False
        cs, rs = slice(max(c0 - 1, 0), c1 + 1), slice(max(r0 - 1, 0), r1 + 1)
        if r0 > 0 and weak[r0 - 1, cs].any():
            r0, grown = r0 - 1, True
        if r1 < h and weak[r1, cs].any():
            r1, grown = r1 + 1, True
        if c0 > 0 and weak[rs, c0 - 1].any():
            c0, grown = c0 - 1, True
        if c1 < w and weak[rs, c1].any():
            c1, grown = c1 + 1, True
    return int(r0), int(r1), int(c0), int(c1)


def _robust_peak(d: np.ndarray) -> float:
    """The strokes' intensity: 99th percentile of the pixels over half the maximum."""
    return float(np.percentile(d[d >= 0.5 * float(d.max())], 99))


def _frame(n: np.ndarray, framing: _Framing) -> np.ndarray:
    from PIL import Image

    r0, r1, c0, c1 = _ink_box(n)
    crop = n[r0:r1, c0:c1]
    h, w = crop.shape
    scale = framing.box / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        small = crop
    else:
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
        small = np.clip(_resize(crop, (nw, nh), resample), 0.0, 1.0)
        if framing.stretch and small.max() > 0:  # area averaging dims thin strokes: cores back to white
            small = np.clip(small / _robust_peak(small), 0.0, 1.0)
    canvas = np.zeros((SIZE, SIZE), np.float64)
    total = small.sum()
    if framing.by_mass and total > 0:
        cy = float((small.sum(axis=1) * np.arange(nh)).sum() / total)
        cx = float((small.sum(axis=0) * np.arange(nw)).sum() / total)
        top, left = int(round(SIZE / 2 - cy)), int(round(SIZE / 2 - cx))
        if small is crop and n.shape == (SIZE, SIZE):
            # already framed like MNIST: keep its placement unless it is clearly off
            # (half-pixel ties would otherwise move real MNIST digits by one pixel)
            if abs(r0 + cy - SIZE / 2) <= _KEEP:
                top = r0
            if abs(c0 + cx - SIZE / 2) <= _KEEP:
                left = c0
    else:
        top, left = (SIZE - nh) // 2, (SIZE - nw) // 2
    top, left = min(max(top, 0), SIZE - nh), min(max(left, 0), SIZE - nw)
    canvas[top:top + nh, left:left + nw] = small
    return canvas


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


def preprocess(image, *, dataset: str = "mnist", invert: str = "auto", center: bool = True,
               name: str | None = None) -> np.ndarray:
    """One image -> the ``(28, 28)`` uint8 array the model sees (white ink on black).

    Args:
        image: a file path (any format Pillow reads), a PIL image, or an
            integer array ``(H, W)`` (gray) / ``(H, W, C)`` (C = 2 gray+alpha,
            3 RGB, 4 RGBA) with values 0..255.
        dataset: the model's training dataset (``"mnist"``, ``"fashion-mnist"``):
            how to frame the image.
        invert: ``"auto"`` (invert when the border is light), ``"yes"``, ``"no"``.
        center: MNIST-style framing (see the module docstring); ``False``: a
            plain resize to 28x28.
        name: how the image is called in warnings and errors (default: the
            path, or ``"image"``).

    Warns:
        BlankImageWarning: no ink was found (blank or uniform image).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an image Pillow can read, a bad array shape or value
            range, or a bad ``invert``.
        TypeError: an unsupported object or array dtype.
    """
    _check_invert(invert)
    if name is None:
        name = str(image) if isinstance(image, (str, os.PathLike)) else "image"
    g = _composite(*_read(image, name))
    framing = _FRAMINGS.get(dataset, _FRAMINGS["mnist"])
    if center and max(g.shape) > _WORK_SIDE:
        from PIL import Image

        s = _WORK_SIDE / max(g.shape)
        g = _resize(g, (max(1, round(g.shape[1] * s)), max(1, round(g.shape[0] * s))), Image.Resampling.BOX)
    lo, hi = float(g.min()), float(g.max())
    bg = float(np.median(_ring(g)))
    inverted = invert == "yes" or (invert == "auto" and bg > 0.5)
    if inverted:
        g, bg = 1.0 - g, 1.0 - bg
    ring = _ring(g)
    floor = min(3 * 1.4826 * float(np.median(np.abs(ring - bg))), 0.5)
    d = g - bg
    blank = int(np.count_nonzero(d > floor + _MIN_CONTRAST)) < _MIN_INK_PIXELS
    if blank:
        if hi - lo < _MIN_CONTRAST:
            why = f"the image is blank or uniform (gray levels {round(255 * lo)}..{round(255 * hi)} of 255)"
        else:
            why = (f"nothing stands out from its background (gray level {round(255 * (1 - bg if inverted else bg))} "
                   f"of 255) as {'dark' if inverted else 'light'} ink")
            if invert != "auto":
                why += f" (check invert={invert!r})"
        warnings.warn(f"{name}: no ink found: {why}; its prediction is meaningless", BlankImageWarning,
                      stacklevel=2)
    if not center:
        from PIL import Image

        a = _to_uint8(g)
        if a.shape != (SIZE, SIZE):
            a = np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)
        return a
    if blank:
        return np.zeros((SIZE, SIZE), np.uint8)
    if framing.stretch:
        n = (d - floor) / max(_robust_peak(d) - floor, 1e-6)
    else:
        n = (d - floor) / max(1.0 - bg - floor, 1e-6)
    return _to_uint8(_frame(np.clip(n, 0.0, 1.0), framing))


def load_image(path: str | os.PathLike, invert: str = "auto", center: bool = True,
               dataset: str = "mnist") -> np.ndarray:
    """Read an image file as the 28x28 uint8 array the model sees: :func:`preprocess` of a path."""
    return preprocess(path, dataset=dataset, invert=invert, center=center, name=str(path))
