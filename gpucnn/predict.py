"""Classify image files with a trained checkpoint (``gpucnn predict``).

MNIST digits are white strokes on a black background.  Images are read with
Pillow, converted to 8-bit grayscale (``L``), and, with ``invert="auto"``
(the default), inverted when their border is light, i.e. when they look like
dark ink on white paper.  They are then resized to 28x28 -- either plainly
(``center=False``, right for images that are already framed like MNIST) or,
with ``center=True``, as MNIST itself was made: the ink's bounding box scaled
to fit 20x20 and pasted into a 28x28 canvas with its centre of mass in the
middle -- and normalised with the training dataset's mean and std.
"""
from __future__ import annotations

import os

import numpy as np

from . import backend, data as data_mod

__all__ = ["load_image", "predict_images", "probabilities"]

_SIZE = 28


def _needs_invert(a: np.ndarray) -> bool:
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return float(np.median(border)) > 127


def _center_like_mnist(a: np.ndarray) -> np.ndarray:
    """Fit the ink's bounding box into 20x20 and centre its mass in 28x28 (a is white-on-black uint8)."""
    from PIL import Image

    ys, xs = np.nonzero(a > 30)
    if len(ys) == 0:
        return np.array(Image.fromarray(a).resize((_SIZE, _SIZE), Image.Resampling.LANCZOS))
    crop = a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    scale = 20.0 / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.array(Image.fromarray(crop).resize((nw, nh), Image.Resampling.LANCZOS), dtype=np.float64)
    canvas = np.zeros((_SIZE, _SIZE), np.float64)
    total = small.sum()
    cy = (small.sum(axis=1) * np.arange(nh)).sum() / total if total else nh / 2
    cx = (small.sum(axis=0) * np.arange(nw)).sum() / total if total else nw / 2
    top = int(round(_SIZE / 2 - cy))
    left = int(round(_SIZE / 2 - cx))
    top, left = min(max(top, 0), _SIZE - nh), min(max(left, 0), _SIZE - nw)
    canvas[top:top + nh, left:left + nw] = small
    return np.clip(canvas, 0, 255).astype(np.uint8)


def load_image(path: str | os.PathLike, invert: str = "auto", center: bool = False) -> np.ndarray:
    """Read an image file as a 28x28 uint8 array, white digit on black.

    Args:
        path: any format Pillow reads (PNG, JPEG, ...), any size, colour or gray.
        invert: ``"auto"`` (invert when the border is light), ``"yes"`` or ``"no"``.
        center: MNIST-style framing (bounding box to 20x20, centre of mass centred).
    """
    from PIL import Image, UnidentifiedImageError

    if invert not in ("auto", "yes", "no"):
        raise ValueError(f"invert must be auto, yes or no, got invert={invert!r}")
    try:
        with Image.open(path) as im:
            im = im.convert("L")
            a = np.array(im, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not an image Pillow can read ({exc})") from None
    if invert == "yes" or (invert == "auto" and _needs_invert(a)):
        a = 255 - a
    if center:
        return _center_like_mnist(a)
    if a.shape != (_SIZE, _SIZE):
        a = np.array(Image.fromarray(a).resize((_SIZE, _SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)
    return a


def probabilities(outputs, loss_name: str) -> np.ndarray:
    """Class probabilities from model outputs: softmax of logits, or (MSE models,
    whose sigmoid outputs are per-class scores) the scores scaled to sum to 1."""
    out = np.asarray(backend.asnumpy(outputs), dtype=np.float64)
    if loss_name == "mse":
        s = np.clip(out, 0, None)
        return s / np.maximum(s.sum(axis=1, keepdims=True), 1e-12)
    z = out - out.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_images(model, images: np.ndarray, dataset: str = "mnist", loss_name: str = "softmax_cross_entropy",
                   device: str = "cpu") -> np.ndarray:
    """``(N, 28, 28)`` uint8 images -> ``(N, K)`` class probabilities (NumPy)."""
    x = backend.to_device(data_mod.normalize(np.asarray(images, dtype=np.uint8), dataset), device)
    was = getattr(model, "training", True)
    model.eval()
    try:
        out = model.forward(x)
    finally:
        model.train(was)
    return probabilities(out, loss_name)
