"""Plots of a run directory (``gpucnn plot DIR``), with matplotlib's Agg backend.

* ``curves.png``: train/test loss and accuracy per epoch, from ``metrics.jsonl``;
* ``filters.png``: the first convolution layer's filters, from ``checkpoint.npz``;
* ``features.png``: every convolution stage's feature maps for the first
  :data:`~gpucnn.views.FEATURE_IMAGES` test images, from the checkpoint;
* ``confusion.png``: the confusion matrix of the checkpoint on the run's test
  set (its ``test_subset``, as the run evaluated it);
* ``gradflow.png``: the gradient flow per layer -- the RMS gradient of every
  parameter at a few logged steps, and the update ratio ``||update|| / ||w||``
  over the run -- from ``layers.jsonl`` (:mod:`gpucnn.train.watch`).

A run written before ``layers.jsonl`` existed (or with ``--log-every 0``)
gets every other plot; :func:`missing_plots` says what is left out and why.

Each PNG is written atomically (a temporary file renamed over it): a full disk
leaves the previous file, or none, never an empty or half-written one.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ._io import atomic_open
from .views import pyplot as _pyplot

__all__ = ["plot_curves", "plot_filters", "plot_features", "plot_confusion", "plot_gradient_flow", "plot_run",
           "missing_plots", "NothingToPlot"]


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


def plot_features(maps: list, path: str | os.PathLike, title: str = "") -> Path:
    """The feature maps of :func:`gpucnn.views.feature_maps`, one panel per convolution stage."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(maps), 1, figsize=(12, 1.2 + 2.2 * len(maps)), squeeze=False)
    for ax, (label, img) in zip(axes[:, 0], maps):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"stage {label}: a row per test image, a tile per channel", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title or "feature maps")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(cm, path: str | os.PathLike, classes=None, title: str = "confusion matrix") -> Path:
    """The confusion matrix ``cm`` (rows true, columns predicted) as :func:`gpucnn.views.confusion_figure` draws it."""
    from .views import confusion_figure

    return _save(confusion_figure(cm, classes, title), path)


def plot_gradient_flow(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Left: the RMS gradient (``grad_norm / sqrt(size)``) of every parameter, in model order, at up to six
    logged steps spread over the run (vanishing or exploding gradients show as a slope across the
    layers).  Right: every parameter's update ratio ``||update|| / ||w||`` per logged step, log scale,
    with the usual 1e-3 marked.  ``rows``: :func:`gpucnn.train.watch.read_layer_stats`."""
    plt = _pyplot()
    names = list(rows[0]["layers"])
    picks = sorted({round(i * (len(rows) - 1) / 5) for i in range(6)}) if len(rows) > 1 else [0]
    cmap = plt.get_cmap("viridis")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for n, i in enumerate(picks):
        layers = rows[i]["layers"]
        rms = [layers[k]["grad_norm"] / np.sqrt(max(layers[k]["size"], 1)) if k in layers else np.nan for k in names]
        a1.plot(range(len(names)), rms, "o-", color=cmap(n / max(len(picks) - 1, 1)),
                label=f"step {rows[i]['step']} (epoch {rows[i]['epoch']})")
    a1.set_xticks(range(len(names)), [f"{k} ({rows[0]['layers'][k]['kind']})" for k in names], rotation=60,
                  ha="right", fontsize=7)
    a1.set_yscale("log")
    a1.set_ylabel("RMS gradient")
    a1.set_title("gradient flow (input side left)")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    steps = [r["step"] for r in rows]
    for k in names:
        a2.plot(steps, [r["layers"].get(k, {}).get("update_ratio", np.nan) for r in rows], label=k, lw=1)
    a2.axhline(1e-3, color="grey", ls="--", lw=1)
    a2.set_yscale("log")
    a2.set_xlabel("step")
    a2.set_ylabel("||update|| / ||w||")
    a2.set_title("update ratio per parameter")
    a2.legend(fontsize=6, ncol=2)
    a2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


class NothingToPlot(ValueError):
    """The run directory holds no epochs to plot and no checkpoint."""


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, data_dir=None,
             notes: list | None = None) -> list[Path]:
    """Write the PNGs of the module docstring for a run directory; returns the paths written.

    ``curves.png`` needs at least one row in ``metrics.jsonl``; ``filters.png``,
    ``features.png`` and ``confusion.png`` the checkpoint (the last two also the
    run's test set, looked for as ``gpucnn train`` does, ``data_dir`` first);
    ``gradflow.png`` a ``layers.jsonl`` with rows.  What cannot be drawn is
    left out (see :func:`missing_plots`); ``notes``, a list, gets one line for
    each view of the checkpoint left out here (its test set not found, a model
    that is not a built-in).

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
        written += _checkpoint_views(cpath, ck, out, label, data_dir, [] if notes is None else notes)
    stats = _layer_rows(run)
    if stats:
        written.append(plot_gradient_flow(stats, out / "gradflow.png", title=label))
    return written


def _layer_rows(run: Path) -> list[dict]:
    from .train.watch import LAYERS_NAME, read_layer_stats

    return read_layer_stats(run / LAYERS_NAME) if (run / LAYERS_NAME).is_file() else []


def _test_images(ck, data_dir, notes):
    """The run's test set ``(x, y, classes)`` on the CPU, cut as the run cut it; None, with a line in
    ``notes`` saying why, when the dataset cannot be found."""
    from .data import DataError, load_dataset, normalize

    name = ck.config.get("dataset", "mnist")
    try:
        ds = load_dataset(name, data_dir)
    except (DataError, OSError, ValueError) as exc:    # ValueError: a folder run, and no data_dir given
        notes.append(f"no features.png, confusion.png: the run's test set ({name}) was not found: {exc} "
                     f"(--data-dir names where it is)")
        return None
    n = ck.config.get("test_subset") or len(ds.test_images)
    return normalize(ds.test_images[:n], ds), ds.test_labels[:n].astype(np.int64), list(ds.classes)


def _checkpoint_views(cpath, ck, out, label, data_dir, notes) -> list[Path]:
    """``features.png`` and ``confusion.png`` of the checkpoint on its test set."""
    from . import checkpoint, models
    from ._utils import inputs_for
    from .train import confusion_matrix, evaluate
    from .views import FEATURE_IMAGES, conv_stages, feature_maps

    if ck.model not in models.MODELS:
        notes.append(f"no features.png, confusion.png: model {ck.model!r} is not one gpucnn can rebuild "
                     f"({', '.join(models.MODELS)})")
        return []
    test = _test_images(ck, data_dir, notes)
    if test is None:
        return []
    x, y, classes = test
    model, _ = checkpoint.restore_model(cpath, device="cpu")
    x = inputs_for(model, x)
    written = []
    if conv_stages(model):
        written.append(plot_features(feature_maps(model, x[:FEATURE_IMAGES]), out / "features.png",
                                     title=f"feature maps, {label}, epoch {ck.epoch}"))
    res = evaluate(model, x, y, None, 1000, len(classes), return_predictions=True)
    written.append(plot_confusion(confusion_matrix(y, res["predictions"], len(classes)), out / "confusion.png",
                                  classes, title=f"{label}, epoch {ck.epoch}, test set"))
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
        out.append(f"no filters.png, features.png, confusion.png: {run} has no {checkpoint.CHECKPOINT_NAME}")
    if not (run / "layers.jsonl").is_file():
        out.append(f"no gradflow.png: {run} has no layers.jsonl (a run from before per-layer statistics, or "
                   f"trained with --log-every 0)")
    elif not _layer_rows(run):
        out.append(f"no gradflow.png: {run / 'layers.jsonl'} holds no rows")
    return out
