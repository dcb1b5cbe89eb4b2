"""The run directory: ``config.json``, ``metrics.jsonl`` and ``checkpoint.npz``, in one place.

``metrics.jsonl`` holds one JSON object per epoch (``epoch``, ``train_loss``,
``train_accuracy``, ``test_loss``, ``test_accuracy`` as fractions, ``lr`` at
the epoch's first step, ``lr_end``, ``images_per_sec``, ``train_seconds``,
``seconds``, ``device``); ``config.json`` the resolved
:class:`~gpucnn.train.TrainConfig`; ``checkpoint.npz`` the state after the
last complete epoch (see :mod:`gpucnn.checkpoint`), written atomically.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from .. import checkpoint as ckpt_mod
from .._io import atomic_open

__all__ = ["RunDir", "METRICS_NAME", "CONFIG_NAME", "default_out_dir", "read_metrics"]

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"


def default_out_dir(model: str, root: str | os.PathLike = "runs") -> Path:
    """``runs/<model>-<YYYYmmdd-HHMMSS>`` (with a ``-N`` suffix if taken)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{model}-{stamp}"
    p, i = base, 1
    while p.exists():
        i += 1
        p = Path(f"{base}-{i}")
    return p


def read_metrics(path) -> list[dict]:
    """Read ``metrics.jsonl`` (a file or a run directory) into a list of dicts."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_NAME
    rows = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


class RunDir:
    """A run directory, created (or continued) for one training run.

    Args:
        path: the directory; None: the resumed checkpoint's directory, else
            :func:`default_out_dir` for ``model``.
        model: the model name (for the default directory).
        resumed: the :class:`~gpucnn.checkpoint.Checkpoint` being continued, or None.
        overwrite: allow a directory that already holds another checkpoint.
        writer: False on the ranks of a distributed run other than rank 0:
            nothing is checked, created or written (only the paths are kept).

    Raises:
        ValueError: ``path`` holds a checkpoint that is not the one being
            resumed, and ``overwrite`` is false.
    """

    def __init__(self, path=None, *, model: str = "model", resumed=None, overwrite: bool = False,
                 writer: bool = True):
        if path is None:
            path = Path(resumed.path).parent if resumed is not None else default_out_dir(model)
        self.path = Path(path)
        self.checkpoint = self.path / ckpt_mod.CHECKPOINT_NAME
        self.metrics_path = self.path / METRICS_NAME
        self.resumed = resumed
        self.writer = bool(writer)
        here = resumed is not None and self.checkpoint.resolve() == Path(resumed.path).resolve()
        if self.writer and self.checkpoint.exists() and not here and not overwrite:
            raise ValueError(f"{self.path} already holds a checkpoint; continue it with --resume {self.path}, "
                             f"or choose another --out (or --overwrite)")
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
        #: the newest complete checkpoint of this run (None before the first epoch ends) and its epoch
        self.last_good = Path(resumed.path) if resumed is not None else None
        self.saved_epoch = resumed.epoch if resumed is not None else 0

    def previous_metrics(self) -> list[dict]:
        """The metrics rows of the epochs the resumed checkpoint holds (empty for a new run).

        Rows after the checkpoint's epoch are dropped; a row lost between the
        checkpoint write and the metrics append is recovered from the checkpoint.
        """
        ck = self.resumed
        if ck is None or not self.writer:
            return []
        source = Path(ck.path).parent / METRICS_NAME
        rows = [m for m in read_metrics(source) if m.get("epoch", 0) <= ck.epoch] if source.exists() else []
        if ck.metrics and not any(m.get("epoch") == ck.epoch for m in rows):
            rows.append(ck.metrics)
        return rows

    def start(self, config, metrics: list[dict]) -> None:
        """Write ``config.json`` and (re)write ``metrics.jsonl`` with the rows kept so far."""
        if not self.writer:
            return
        _write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in metrics))
        _write_text(self.path / CONFIG_NAME, json.dumps(asdict(config), indent=2) + "\n")

    def save_epoch(self, model, optimizer, *, config, epoch: int, rng: dict, row: dict) -> Path:
        """Write the checkpoint after ``epoch`` (atomically)."""
        if not self.writer:
            self.last_good, self.saved_epoch = self.checkpoint, epoch
            return self.checkpoint
        ckpt_mod.save_checkpoint(self.checkpoint, model, optimizer, model_name=config.model, epoch=epoch,
                                 config=asdict(config), rng=rng, metrics=row)
        self.last_good, self.saved_epoch = self.checkpoint, epoch
        return self.checkpoint

    def append_metrics(self, row: dict) -> None:
        if not self.writer:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def kept(self, epoch: int | None = None) -> str:
        """What is left after a failure, for error messages."""
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {self.last_good}" + (f" (epoch {epoch})" if epoch is not None else "") \
            + " is kept"
