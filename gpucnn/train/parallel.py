"""The data-parallel parts of :func:`gpucnn.train.train` (``distributed=...``, ``--distributed``).

* :func:`communicator` -- the :class:`~gpucnn.distributed.Communicator` asked for;
* :func:`share` -- rank 0 prepares the run (configuration, checkpoint, run
  directory) and every rank receives the result, or rank 0's error, raised
  everywhere as a *collective* error (``exc.collective = True``);
* :func:`broadcast_state` -- rank 0's parameters and optimizer slots to all;
* :func:`check_in_sync` -- every rank's parameters still equal rank 0's;
* :func:`guarded` -- any other exception on a rank aborts the whole job
  (:func:`gpucnn.distributed.fail`), so no rank waits forever in a collective.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .. import backend, checkpoint as ckpt_mod
from .. import distributed as dist
from ..data import DataError
from .config import NonFiniteLossError, ResumeConflictError
from .rundir import RunDirInUse

__all__ = ["communicator", "share", "resume_point", "resume_meta", "broadcast_state", "check_in_sync",
           "guarded", "is_collective"]

#: Errors rank 0 may raise while preparing, re-raised with the same type on the other ranks.
_KNOWN = {cls.__name__: cls for cls in (ValueError, TypeError, ResumeConflictError, ckpt_mod.CheckpointError,
                                        FileNotFoundError, DataError, NonFiniteLossError, ImportError, RunDirInUse)}


def communicator(distributed, device: str):
    """``None`` (not distributed), or the communicator for ``distributed``.

    ``distributed``: None/False; True (``"auto"``); a backend name of
    :data:`gpucnn.distributed.BACKENDS`; or a Communicator, used as it is.
    """
    if distributed is None or distributed is False:
        return None
    if isinstance(distributed, dist.Communicator):
        return distributed
    if distributed is True:
        distributed = "auto"
    if not isinstance(distributed, str):
        raise TypeError(f"distributed must be None, a bool, a backend name or a Communicator, "
                        f"got {type(distributed).__name__}")
    return dist.init(distributed, device)


def is_collective(exc: BaseException) -> bool:
    """True for errors every rank raised at the same point (nothing to abort)."""
    return isinstance(exc, SystemExit) or bool(getattr(exc, "collective", False))


def share(comm, prepare):
    """Run ``prepare()`` on rank 0 and return its JSON-able result on every rank.

    If rank 0 raises, every rank raises an error of the same type (one of
    :data:`_KNOWN`, else RuntimeError) with the same message, marked collective.
    """
    message = error = None
    if comm.is_root:
        try:
            message = {"ok": prepare()}
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            message, error = {"error": [type(exc).__name__, str(exc)]}, exc
    message = comm.broadcast_json(message)
    if "ok" in message:
        return message["ok"]
    if error is None:
        name, text = message["error"]
        error = _KNOWN.get(name, RuntimeError)(text)
    error.collective = True
    raise error


def resume_meta(ckpt) -> dict | None:
    """What the other ranks need to know of the checkpoint rank 0 resumes from."""
    if ckpt is None:
        return None
    slots = (ckpt.optimizer or {}).get("slots", {})
    return {"path": str(ckpt.path), "model": ckpt.model, "epoch": ckpt.epoch, "config": ckpt.config,
            "rng": ckpt.rng, "slots": sorted({k.rsplit("/", 1)[1] for k in slots}),
            "step_count": int((ckpt.optimizer or {}).get("step_count", 0)), "loss_scaler": ckpt.loss_scaler}


def resume_point(meta: dict | None):
    """A :class:`~gpucnn.checkpoint.Checkpoint` without tensors, for the ranks other than 0."""
    if meta is None:
        return None
    return ckpt_mod.Checkpoint(path=Path(meta["path"]), model=meta["model"], epoch=int(meta["epoch"]),
                               params={}, optimizer=None, config=meta["config"], rng=meta["rng"],
                               loss_scaler=meta.get("loss_scaler"))


def broadcast_state(comm, optimizer, slot_keys=(), step_count: int = 0) -> None:
    """Rank 0's parameters (and optimizer slots ``slot_keys``, step count) on every rank.

    Each flat buffer is broadcast as it is, one per dtype and device.
    """
    for gi, group in enumerate(optimizer.groups):
        comm.broadcast(group.params)
        for key in slot_keys:
            comm.broadcast(optimizer._slot(gi, key))
    optimizer.step_count = int(step_count)


def check_in_sync(comm, optimizer, epoch: int) -> None:
    """Raise (on every rank) if some rank's parameters differ from rank 0's, bit for bit."""
    h = hashlib.sha256()
    for group in optimizer.groups:
        h.update(np.ascontiguousarray(backend.asnumpy(group.params)).tobytes())
    mine = np.frombuffer(h.digest(), dtype=np.uint8).copy()
    root = mine.copy()
    comm.broadcast(root)
    flags = np.zeros(comm.size)
    flags[comm.rank] = 0.0 if np.array_equal(mine, root) else 1.0
    bad = [r for r, f in enumerate(comm.allreduce_scalars(flags)) if f]
    if bad:
        err = RuntimeError(f"after epoch {epoch}, the parameters of rank{'s' if len(bad) > 1 else ''} "
                           f"{', '.join(map(str, bad))} differ from rank 0's: the allreduce did not give "
                           f"every rank the same sum")
        err.collective = True
        raise err


def guarded(comm, fn):
    """``fn()``; an exception that is not collective aborts every rank (when there are several)."""
    try:
        return fn()
    except BaseException as exc:
        if comm.size > 1 and not is_collective(exc):
            dist.fail(comm, exc)
        raise
