"""The run directory: ``config.json``, ``metrics.jsonl`` and ``checkpoint.npz``, in one place.

``metrics.jsonl`` holds one JSON object per epoch (``epoch``, ``train_loss``,
``train_accuracy``, ``test_loss``, ``test_accuracy`` as fractions, ``lr`` at
the epoch's first step, ``lr_end``, ``images_per_sec``, ``train_seconds``,
``seconds``, ``device``); ``config.json`` the resolved
:class:`~gpucnn.train.TrainConfig`; ``checkpoint.npz`` the state after the
last complete epoch (see :mod:`gpucnn.checkpoint`), written atomically.
The per-layer statistics ``layers.jsonl`` and the TensorBoard directory
``tb/`` are :mod:`gpucnn.train.watch`'s.

One run owns its directory while it lasts: it holds an exclusive ``flock`` on
``.gpucnn-run.lock`` there (the file records the owner's pid and host), which
the kernel releases when the process ends, however it ends.  A second run on
an owned directory stops at once with :class:`RunDirInUse`; a new default
directory is claimed with an exclusive ``mkdir``.  Temporary files a killed
run left behind (``.checkpoint.npz.*.tmp``, ...) are removed when the next run
claims the directory.  Free space for a checkpoint is checked before training
and before every write; a write that fails raises :class:`RunDirWriteError`
naming the file and what was kept.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import warnings
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from .. import checkpoint as ckpt_mod
from .._io import atomic_open

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: runs are not locked
    fcntl = None

__all__ = ["RunDir", "RunDirInUse", "RunDirWriteError", "MetricsWarning", "METRICS_NAME", "CONFIG_NAME",
           "LOCK_NAME", "SET_ASIDE_NAME", "default_out_dir", "read_metrics"]

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
LOCK_NAME = ".gpucnn-run.lock"
#: where resuming keeps the ``metrics.jsonl`` lines it does not carry over (appended, as they were)
SET_ASIDE_NAME = "metrics.jsonl.set-aside"
#: the files a run writes atomically: their temporary files are the run's own
_OWN_FILES = (ckpt_mod.CHECKPOINT_NAME, METRICS_NAME, CONFIG_NAME)


class RunDirInUse(ValueError):
    """Another live process owns the run directory."""


class RunDirWriteError(OSError):
    """A file of the run directory could not be written (a full disk, ...); the message says what was kept."""


class MetricsWarning(UserWarning):
    """Lines of ``metrics.jsonl`` that were unreadable or did not fit the checkpoint were left out."""


def default_out_dir(model: str, root: str | os.PathLike = "runs") -> Path:
    """Create and return ``runs/<model>-<YYYYmmdd-HHMMSS>`` (with a ``-N`` suffix if taken).

    The directory is claimed by an exclusive ``mkdir``: two runs started in the
    same second get different directories.
    """
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{model}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    p, i = base, 1
    while True:
        try:
            p.mkdir()
            return p
        except FileExistsError:
            i += 1
            p = Path(f"{base}-{i}")


def _parse_metrics(path: Path) -> tuple[list[tuple[int, str, dict]], list[tuple[int, str, str]]]:
    """``(rows, bad)`` of a ``metrics.jsonl``: ``(line number, text, row)`` for every line that is a
    JSON object with an integer ``epoch``, ``(line number, text, why)`` for every other non-blank line."""
    rows, bad = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not text.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as exc:   # JSONDecodeError, UnicodeDecodeError
                where = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else exc
                why = f"not a JSON object ({where})"
                bad.append((number, text, why if raw.endswith(b"\n") else why + ", the line is cut short"))
                continue
            epoch = row.get("epoch") if isinstance(row, dict) else None
            if isinstance(epoch, bool) or not isinstance(epoch, int):
                bad.append((number, text, "not a metrics row (no integer 'epoch')"))
            else:
                rows.append((number, text, row))
    return rows, bad


def read_metrics(path) -> list[dict]:
    """Read ``metrics.jsonl`` (a file or a run directory) into a list of dicts.

    A line that is not a metrics row (cut short by a crash, edited) is left
    out with a :class:`MetricsWarning` naming the file and the line.
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_NAME
    rows, bad = _parse_metrics(p)
    for number, _, why in bad:
        warnings.warn(f"{p}, line {number}: {why}; left out", MetricsWarning, stacklevel=2)
    return [row for _, _, row in rows]


def _write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


class _Owner:
    """This process's claim on a directory: an exclusive ``flock`` on its :data:`LOCK_NAME`, held until
    :meth:`release` or the end of the process.  The file says who holds it (pid, host, since when).

    Raises:
        RunDirInUse: another process holds the lock.
    """

    #: lock descriptors this process holds: closed in forked children (their copy would keep the
    #: lock alive after this process ends; closing it leaves this process's lock in place)
    held: set = set()

    def __init__(self, directory: Path):
        self.path = directory / LOCK_NAME
        self.fd = None
        if fcntl is None:  # pragma: no cover - not POSIX
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "its pid not recorded yet"
            os.close(fd)
            raise RunDirInUse(f"{directory} is in use by another training run ({owner}); wait for it to "
                              f"end, or choose another --out") from None
        except OSError as exc:  # a file system without locks
            os.close(fd)
            warnings.warn(f"cannot lock {self.path} ({exc.strerror or exc}): nothing stops another run "
                          f"from writing into {directory} at the same time", RuntimeWarning, stacklevel=3)
            return
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode(), 0)
        self.fd = fd
        self.held.add(fd)

    def release(self) -> None:
        if self.fd is not None:
            self.held.discard(self.fd)
            os.close(self.fd)   # the lock goes with the last descriptor of it
            self.fd = None

    @classmethod
    def _close_in_child(cls) -> None:
        for fd in cls.held:
            with contextlib.suppress(OSError):
                os.close(fd)
        cls.held = set()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Owner._close_in_child)


class RunDir:
    """A run directory, claimed (created, or continued) for one training run; :meth:`close` ends the claim.

    Args:
        path: the directory; None: the resumed checkpoint's directory, else
            :func:`default_out_dir` for ``model``.
        model: the model name (for the default directory).
        resumed: the :class:`~gpucnn.checkpoint.Checkpoint` being continued, or None.
        overwrite: allow a directory that already holds another checkpoint.
        writer: False on the ranks of a distributed run other than rank 0:
            nothing is claimed, checked, created or written (only the paths are kept).
        log: called with each note (temporary files of a killed run removed).

    Raises:
        RunDirInUse: another live process owns the directory (the message
            names it and the owner's pid).
        ValueError: ``path`` holds a checkpoint that is not the one being
            resumed, and ``overwrite`` is false.
    """

    def __init__(self, path=None, *, model: str = "model", resumed=None, overwrite: bool = False,
                 writer: bool = True, log=None):
        self.writer = bool(writer)
        self.log = log or (lambda s: None)
        if path is None and resumed is not None:
            path = Path(resumed.path).parent
        elif path is None:
            if not self.writer:
                raise ValueError("a RunDir that writes nothing needs its path")
            path = default_out_dir(model)
        self.path = Path(path)
        self.checkpoint = self.path / ckpt_mod.CHECKPOINT_NAME
        self.metrics_path = self.path / METRICS_NAME
        self.resumed = resumed
        #: the newest complete checkpoint of this run (None before the first epoch ends) and its epoch
        self.last_good = Path(resumed.path) if resumed is not None else None
        self.saved_epoch = resumed.epoch if resumed is not None else 0
        self._set_aside: list[tuple[int, str, str]] = []   # metrics lines not carried over
        self._checkpoint_bytes = None                       # the size of the last checkpoint written
        self._owner = None
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._owner = _Owner(self.path)
        try:
            here = resumed is not None and self.checkpoint.resolve() == Path(resumed.path).resolve()
            if self.checkpoint.exists() and not here and not overwrite:
                raise ValueError(f"{self.path} already holds a checkpoint; continue it with --resume {self.path}, "
                                 f"or choose another --out (or --overwrite)")
            self._remove_stale_temporaries()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """End this run's claim on the directory (another run may take it)."""
        if self._owner is not None:
            self._owner.release()
            self._owner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _remove_stale_temporaries(self) -> None:
        """Remove the temporary files of this directory's own files: with the directory claimed, they can
        only be left by a run that was killed while writing."""
        stale = sorted(p for name in _OWN_FILES for p in self.path.glob(f".{name}.*.tmp") if p.is_file())
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            self.log(f"note: removed {len(stale)} temporary file(s) a killed run left in {self.path}: "
                     + ", ".join(p.name for p in stale))

    def previous_metrics(self) -> list[dict]:
        """The metrics rows of the epochs the resumed checkpoint holds (empty for a new run).

        The checkpoint is the truth: rows are kept in rising epoch order up to
        its epoch; a line that is unreadable, repeats or goes back to an epoch,
        or comes after the checkpoint's epoch is set aside with a
        :class:`MetricsWarning` naming the file and line (:meth:`start` keeps
        those lines in :data:`SET_ASIDE_NAME`).  The checkpoint's own row, lost
        between the checkpoint write and the metrics append, is recovered from
        the checkpoint.
        """
        ck = self.resumed
        if ck is None or not self.writer:
            return []
        source = Path(ck.path).parent / METRICS_NAME
        rows, bad = _parse_metrics(source) if source.exists() else ([], [])
        kept, set_aside = [], list(bad)
        for number, text, row in rows:
            epoch, last = row["epoch"], kept[-1]["epoch"] if kept else 0
            if epoch > ck.epoch:
                set_aside.append((number, text, f"epoch {epoch} is after the checkpoint's epoch {ck.epoch}"))
            elif epoch <= last:
                set_aside.append((number, text, f"epoch {epoch} again after epoch {last}"))
            else:
                kept.append(row)
        if ck.metrics and not any(m["epoch"] == ck.epoch for m in kept):
            kept.append(ck.metrics)
        set_aside.sort()
        own = source.resolve() == self.metrics_path.resolve()
        fate = f"set aside in {self.path / SET_ASIDE_NAME}" if own else "not carried over"
        for number, _, why in set_aside:
            warnings.warn(f"{source}, line {number}: {why}; {fate}; the run continues from {ck.path} "
                          f"(epoch {ck.epoch})", MetricsWarning, stacklevel=2)
        missing = sorted(set(range(1, ck.epoch + 1)) - {m["epoch"] for m in kept})
        if missing:
            warnings.warn(f"{source}: no metrics row for epoch(s) {', '.join(map(str, missing))}", MetricsWarning,
                          stacklevel=2)
        self._set_aside = set_aside if own else []
        return kept

    @contextlib.contextmanager
    def _writing(self, path: Path, kept: str):
        """Turn an OSError while writing ``path`` into a :class:`RunDirWriteError` saying ``kept``."""
        try:
            yield
        except RunDirWriteError:
            raise
        except OSError as exc:
            raise RunDirWriteError(f"cannot write {path} ({exc.strerror or exc}); {kept}") from exc

    def check_space(self, model, optimizer) -> None:
        """Raise :class:`RunDirWriteError` when the directory's file system lacks room for one more
        checkpoint (the size of the last one written, else an estimate for ``model`` and ``optimizer``)."""
        if not self.writer:
            return
        need = self._checkpoint_bytes or ckpt_mod.estimated_size(model, optimizer)
        free = shutil.disk_usage(self.path).free
        if free < need:
            raise RunDirWriteError(
                f"no room for a checkpoint in {self.path}: {_mib(free)} free, a checkpoint takes about "
                f"{_mib(need)}; {self.kept(self.saved_epoch or None)}{self._resume_hint()}")

    def _resume_hint(self) -> str:
        return f"; free some space, then continue with gpucnn train --resume {self.last_good.parent}" \
            if self.last_good is not None else ""

    def start(self, config, metrics: list[dict]) -> None:
        """Write ``config.json``, (re)write ``metrics.jsonl`` with the rows kept so far, and append the lines
        :meth:`previous_metrics` set aside to :data:`SET_ASIDE_NAME`."""
        if not self.writer:
            return
        kept = self.kept(self.saved_epoch or None)
        if self._set_aside:
            target = self.path / SET_ASIDE_NAME
            with self._writing(target, kept), open(target, "a", encoding="utf-8") as f:
                f.write("".join(text + "\n" for _, text, _ in self._set_aside))
            self._set_aside = []
        with self._writing(self.metrics_path, kept):
            _write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in metrics))
        with self._writing(self.path / CONFIG_NAME, kept):
            _write_text(self.path / CONFIG_NAME, json.dumps(asdict(config), indent=2) + "\n")

    def save_epoch(self, model, optimizer, *, config, epoch: int, rng: dict, row: dict, loss_scaler=None) -> Path:
        """Write the checkpoint after ``epoch`` (atomically), once :meth:`check_space` finds room for it;
        ``loss_scaler``: an fp16 run's :class:`~gpucnn.train.LossScaler`, saved with it."""
        if not self.writer:
            self.last_good, self.saved_epoch = self.checkpoint, epoch
            return self.checkpoint
        self.check_space(model, optimizer)
        with self._writing(self.checkpoint, self.kept(self.saved_epoch or None) + self._resume_hint()):
            ckpt_mod.save_checkpoint(self.checkpoint, model, optimizer, model_name=config.model, epoch=epoch,
                                     config=asdict(config), rng=rng, metrics=row, loss_scaler=loss_scaler)
        self.last_good, self.saved_epoch = self.checkpoint, epoch
        self._checkpoint_bytes = self.checkpoint.stat().st_size
        return self.checkpoint

    def append_metrics(self, row: dict) -> None:
        """Append ``row`` to ``metrics.jsonl`` (one write; a resume restores it from the checkpoint if lost)."""
        if not self.writer:
            return
        kept = (f"the checkpoint {self.last_good} (epoch {self.saved_epoch}) holds this epoch's row, and "
                f"--resume restores it")
        with self._writing(self.metrics_path, kept), open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def kept(self, epoch: int | None = None) -> str:
        """What is left after a failure, for error messages."""
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {self.last_good}" + (f" (epoch {epoch})" if epoch is not None else "") \
            + " is kept"


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"
