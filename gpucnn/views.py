"""What a network holds, as images: filter grids, feature maps, a confusion matrix.

One set of pictures for two places: ``gpucnn train --tensorboard`` logs them
live (:mod:`gpucnn.train.watch`) and ``gpucnn plot`` writes them as PNGs
(:mod:`gpucnn.plots`).  Every function here takes host or device arrays and
returns NumPy ``float32`` images in ``[0, 1]``, shaped ``(H, W)`` (grey) or
``(H, W, 3)`` (colour), with one-pixel white borders between tiles.
"""
from __future__ import annotations

import numpy as np

from . import backend

__all__ = ["tile", "filter_grid", "conv_stages", "feature_maps", "confusion_rgb", "confusion_figure", "pyplot",
           "FEATURE_IMAGES"]

#: how many test images the feature maps show (the first ones of the test set: the same every epoch)
FEATURE_IMAGES = 4


def _unit(a, axes):
    """``a`` scaled to ``[0, 1]`` over ``axes`` (each tile its own range; a constant tile is 0: a dead channel is black)."""
    lo, hi = a.min(axis=axes, keepdims=True), a.max(axis=axes, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (a - lo) / np.where(span > 0, span, 1), 0.0).astype(np.float32)


def tile(tiles, cols: int) -> np.ndarray:
    """Tiles ``(n, h, w[, 3])`` in ``[0, 1]`` laid out row by row, ``cols`` per row, 1-pixel white borders."""
    tiles = np.asarray(tiles, dtype=np.float32)
    n, h, w = tiles.shape[:3]
    rows = -(-n // cols)
    shape = (rows * (h + 1) + 1, cols * (w + 1) + 1) + tiles.shape[3:]
    out = np.ones(shape, np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        out[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = tiles[i]
    return out


def filter_grid(weight) -> np.ndarray:
    """The filters of a conv weight ``(out, in, kh, kw)`` as one image: with 3 input channels one colour
    tile per filter (RGB, scaled together), else one grey tile per (filter, input channel), a row per
    filter.  Each tile is scaled to its own range."""
    w = np.asarray(backend.asnumpy(weight), dtype=np.float32)
    if w.ndim != 4:
        raise ValueError(f"a conv weight is (out, in, kh, kw), got shape {w.shape}")
    o, c = w.shape[:2]
    if c == 3:
        return tile(_unit(w.transpose(0, 2, 3, 1), (1, 2, 3)), cols=min(o, 16))
    return tile(_unit(w.reshape(o * c, *w.shape[2:]), (1, 2)), cols=c if c > 1 else min(o, 16))


def conv_stages(model):
    """The stages of ``model`` (a Sequential) that a convolution leads, as ``[(index, stage)]``; every
    stage of the model, in order, is ``model.stages()``."""
    from .layers.conv import Conv2D

    stages = model.stages() if hasattr(model, "stages") else []
    return [(i, s) for i, s in enumerate(stages) if isinstance(s.lead, Conv2D)]


def feature_maps(model, x) -> list[tuple[str, np.ndarray]]:
    """The output of every convolution stage of ``model`` for the images ``x`` (NCHW, on the model's
    device), in eval mode: ``[(label, image)]``, the image a row per input image and a tile per channel
    (each scaled to its own range); the label is ``"<layer index>:<stage name>"``.  The model's mode is
    restored; nothing else changes (eval mode draws no random numbers and updates no statistics)."""
    from .functional.layout import from_internal, to_internal

    wanted = {id(s) for _, s in conv_stages(model)}
    out, was = [], getattr(model, "training", True)
    model.eval()
    try:
        h = to_internal(x)
        for stage in model.stages():
            h = stage.forward(h)
            if id(stage) in wanted:
                fm = np.asarray(backend.asnumpy(from_internal(h)), dtype=np.float32)   # (N, C, H, W)
                n, c = fm.shape[:2]
                out.append((f"{stage.start}:{stage.name}", tile(_unit(fm.reshape(n * c, *fm.shape[2:]), (1, 2)),
                                                                cols=c)))
    finally:
        model.train(was)
    return out


def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no window): the one way gpucnn draws."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(cm, classes=None, title: str = "confusion matrix"):
    """A matplotlib figure of the confusion matrix ``cm`` (rows: true class, columns: predicted), each
    row shaded by its fraction of the class, the counts written in."""
    plt = pyplot()
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    names = [str(c) for c in (classes if classes is not None else range(k))]
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = 1.6 + 0.5 * k
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), names, rotation=90 if max(map(len, names)) > 2 else 0, fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} ({int(np.trace(cm))}/{int(cm.sum())} right)")
    fig.tight_layout()
    return fig


def confusion_rgb(cm, classes=None, title: str = "confusion matrix") -> np.ndarray:
    """:func:`confusion_figure` rendered to an ``(H, W, 3)`` image in ``[0, 1]``."""
    fig = confusion_figure(cm, classes, title)
    try:
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
    finally:
        pyplot().close(fig)
    return rgba[..., :3].astype(np.float32) / 255.0
