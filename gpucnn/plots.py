"""Plots of a run directory (``gpucnn plot DIR``), with matplotlib's Agg backend.

* ``curves.png``: train/test loss and accuracy per epoch, from ``metrics.jsonl``;
* ``filters.png``: the first convolution layer's filters, from ``checkpoint.npz``.

Each PNG is written atomically (a temporary file renamed over it): a full disk
leaves the previous file, or none, never an empty or half-written one.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ._io import atomic_open

__all__ = ["plot_curves", "plot_filters", "plot_run", "missing_plots", "NothingToPlot"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """Write ``fig`` to the PNG ``path`` atomically and close it."""
    plt = _pyplot()
    path = Path(path)
    try:
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def plot_curves(metrics: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Loss (left) and accuracy (right) per epoch, train and test."""
    plt = _pyplot()
    ep = [m["epoch"] for m in metrics]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [m["train_loss"] for m in metrics], "o-", label="train")
    a1.plot(ep, [m["test_loss"] for m in metrics], "s-", label="test")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.set_title("loss")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.plot(ep, [100 * m["train_accuracy"] for m in metrics], "o-", label="train")
    a2.plot(ep, [100 * m["test_accuracy"] for m in metrics], "s-", label="test")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy (%)")
    a2.set_title("accuracy")
    a2.legend()
    a2.grid(alpha=0.3)
    for a in (a1, a2):
        a.set_xticks(ep)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_filters(params: dict, path: str | os.PathLike, title: str = "") -> Path:
    """The first 4-D weight: one grayscale tile per (output, input) channel pair, or, when it takes
    3 input channels (RGB), one colour tile per output filter (red, green, blue = its three input
    slices, mapped from [-max|W|, max|W|] to [0, 1], so mid-gray is zero)."""
    plt = _pyplot()
    name = next((k for k, v in params.items() if np.ndim(v) == 4), None)
    if name is None:
        raise ValueError("no convolution weights (4-D parameter) in the checkpoint")
    W = np.asarray(params[name], dtype=np.float64)
    O, C = W.shape[:2]
    lim = float(np.abs(W).max()) or 1.0
    if C == 3:
        cols = min(O, 16)
        rows = -(-O // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows + 0.6), squeeze=False)
        for i, ax in enumerate(axes.ravel()):
            ax.set_xticks([])
            ax.set_yticks([])
            if i < O:
                ax.imshow((W[i].transpose(1, 2, 0) + lim) / (2 * lim), interpolation="nearest")
                ax.set_title(str(i), fontsize=8)
            else:
                ax.axis("off")
        fig.suptitle(title or f"first conv layer filters in colour ({name}, {O}x{C}x{W.shape[2]}x{W.shape[3]})")
        fig.tight_layout()
        return _save(fig, path)
    fig, axes = plt.subplots(C, O, figsize=(1.3 * O, 1.3 * C + 0.6), squeeze=False)
    for c in range(C):
        for o in range(O):
            ax = axes[c][o]
            ax.imshow(W[o, c], cmap="gray", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(str(o), fontsize=8)
    fig.suptitle(title or f"first conv layer filters ({name}, {O}x{C}x{W.shape[2]}x{W.shape[3]})")
    fig.tight_layout()
    return _save(fig, path)


class NothingToPlot(ValueError):
    """The run directory holds no epochs to plot and no checkpoint."""


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``curves.png`` and ``filters.png`` for a run directory; returns the paths written.

    ``curves.png`` needs at least one row in ``metrics.jsonl``, ``filters.png``
    the checkpoint; what cannot be drawn is left out (see :func:`missing_plots`).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist, or holds neither file.
        NotADirectoryError: ``run_dir`` is a file.
        ValueError: ``out_dir`` is (or is inside) a file.
        NothingToPlot: ``metrics.jsonl`` has no rows and there is no checkpoint.
    """
    from . import checkpoint
    from ._utils import check_directory_path
    from .train import read_metrics

    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise NotADirectoryError(f"{run} is a file, not a run directory (give the directory holding "
                                 f"metrics.jsonl and {checkpoint.CHECKPOINT_NAME})")
    if not run.is_dir():
        raise FileNotFoundError(f"run directory not found: {run}")
    out = check_directory_path(out_dir, "") if out_dir is not None else run
    mpath = run / "metrics.jsonl"
    cpath = run / checkpoint.CHECKPOINT_NAME
    if not mpath.exists() and not cpath.exists():
        raise FileNotFoundError(f"{run} holds neither metrics.jsonl nor {checkpoint.CHECKPOINT_NAME}")
    ck = checkpoint.load_checkpoint(cpath) if cpath.exists() else None
    rows = read_metrics(mpath) if mpath.exists() else []
    if not rows and ck is None:
        raise NothingToPlot(f"nothing to plot: {mpath} holds no epochs and there is no "
                            f"{checkpoint.CHECKPOINT_NAME} in {run}")
    out.mkdir(parents=True, exist_ok=True)
    label = f"{ck.model} on {ck.config.get('dataset', '?')}" if ck is not None else ""
    written = []
    if rows:
        written.append(plot_curves(rows, out / "curves.png", title=label))
    if ck is not None:
        written.append(plot_filters(ck.params, out / "filters.png"))
    return written


def missing_plots(run_dir: str | os.PathLike) -> list[str]:
    """Why a plot of :func:`plot_run` is left out for ``run_dir``: one line per missing PNG."""
    from . import checkpoint
    from .train import read_metrics

    run = Path(run_dir)
    mpath = run / "metrics.jsonl"
    out = []
    if not mpath.exists():
        out.append(f"no curves.png: {run} has no metrics.jsonl")
    else:
        with warnings.catch_warnings():     # plot_run has already warned about damaged lines
            warnings.simplefilter("ignore")
            empty = not read_metrics(mpath)
        if empty:
            out.append(f"no curves.png: {mpath} holds no epochs")
    if not (run / checkpoint.CHECKPOINT_NAME).exists():
        out.append(f"no filters.png: {run} has no {checkpoint.CHECKPOINT_NAME}")
    return out
