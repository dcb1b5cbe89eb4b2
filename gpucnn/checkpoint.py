"""Checkpoints: one ``.npz`` file, no pickle anywhere, written atomically.

Layout of ``checkpoint.npz`` (read with ``np.load(path, allow_pickle=False)``):

``__meta__``
    0-d unicode array holding a JSON object: ``format`` (``"gpucnn-checkpoint"``),
    ``version`` (:data:`FORMAT_VERSION`), ``model`` (name for
    :func:`gpucnn.models.build`, or ``null`` for a custom network), ``epoch``,
    ``config`` (the training configuration), ``tensors`` (every array's name,
    shape and dtype, validated on load), ``optimizer`` (type, hyper-parameters,
    step count; its slots are tensors), ``rng`` (gpucnn's generator state and
    the data-shuffling generator's state), ``metrics`` (the epoch's metrics),
    and ``sha256``.
``param/<name>``
    One array per model parameter (``model.state_dict()`` names: ``0.W``, ...).
``optim/<name>/<slot>``
    The optimizer's per-parameter slots (momentum buffer, Adam's m and v).

``sha256`` is the SHA-256 over the metadata (without the digest itself) and
every tensor's name, dtype, shape and bytes.  A file whose digest does not
match is refused with :class:`CheckpointError`: this catches corruption and
edits made without recomputing the digest; it is not a signature.

:func:`save_checkpoint` writes to a temporary file in the destination
directory, flushes and fsyncs it and then ``os.replace``-s it over the old
file, so an interrupted save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._io import atomic_open
from . import backend

FORMAT = "gpucnn-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.npz"
_META_KEY = "__meta__"

__all__ = [
    "CheckpointError", "Checkpoint", "FORMAT_VERSION", "CHECKPOINT_NAME",
    "resolve_path", "save_checkpoint", "estimated_size", "load_checkpoint", "load_into", "restore_model",
]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, tampered with or does not fit."""


@dataclass
class Checkpoint:
    """A loaded checkpoint (all arrays are NumPy).

    Attributes:
        path: the file it was read from.
        model: the model name (``None`` for a custom network).
        epoch: epochs completed when it was written.
        params: ``{name: array}`` for ``Sequential.load_state_dict``.
        optimizer: ``Optimizer.state_dict()``-shaped dict, or ``None``.
        config: the training configuration (a dict).
        rng: saved random states (``{"gpucnn": ..., "shuffle": ...}``).
        metrics: the metrics of the epoch it was written after.
        meta: the whole metadata object.
    """

    path: Path
    model: str | None
    epoch: int
    params: dict
    optimizer: dict | None
    config: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def resolve_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory holding ``checkpoint.npz``."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    return p


def _digest(meta: dict, arrays: dict) -> str:
    h = hashlib.sha256()
    body = {k: v for k, v in meta.items() if k != "sha256"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + b"\0" + a.dtype.str.encode() + b"\0" + repr(tuple(a.shape)).encode() + b"\0")
        h.update(a.tobytes())
    return h.hexdigest()


def _to_jsonable(obj):
    """Convert NumPy scalars/tuples in metadata into JSON types (fails loudly otherwise)."""
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"checkpoint metadata cannot hold {type(obj).__name__} {obj!r}")


def save_checkpoint(path: str | os.PathLike, model, optimizer=None, *, model_name: str | None = None,
                    epoch: int = 0, config: dict | None = None, rng: dict | None = None,
                    metrics: dict | None = None) -> Path:
    """Write ``model`` (and ``optimizer``) to ``path`` atomically; returns the path.

    Args:
        path: the ``.npz`` file (or a directory: ``<dir>/checkpoint.npz``).
        model: a :class:`~gpucnn.layers.Sequential` (on any device).
        optimizer: a :class:`~gpucnn.optim.Optimizer` or ``None``.
        model_name: name for :func:`gpucnn.models.build`; defaults to ``model.name``.
        epoch, config, rng, metrics: JSON-serialisable metadata.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    arrays = {f"param/{k}": v for k, v in model.state_dict().items()}
    opt_meta = None
    if optimizer is not None:
        st = optimizer.state_dict()
        for k, v in st["slots"].items():
            arrays[f"optim/{k}"] = np.array(backend.asnumpy(v), copy=True)
        opt_meta = {"type": st["type"], "hyper": st["hyper"], "step_count": int(st["step_count"])}
    if model_name is None:
        model_name = getattr(model, "name", None)
    meta = _to_jsonable({
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model_name,
        "epoch": int(epoch),
        "config": config or {},
        "tensors": {k: {"shape": list(v.shape), "dtype": v.dtype.str} for k, v in sorted(arrays.items())},
        "optimizer": opt_meta,
        "rng": rng or {},
        "metrics": metrics or {},
    })
    meta["sha256"] = _digest(meta, arrays)
    payload = dict(arrays)
    payload[_META_KEY] = np.array(json.dumps(meta, sort_keys=True))
    with atomic_open(path) as f:
        np.savez(f, **payload)
    return path


def estimated_size(model, optimizer=None) -> int:
    """Bytes that :func:`save_checkpoint` of ``model`` and ``optimizer`` takes, at most about: every
    parameter and buffer, every slot the optimizer's type keeps (whether made yet or not), and room
    for the archive's headers and the metadata."""
    state = model.state_dict()
    size = sum(a.nbytes for a in state.values())
    tensors = len(state)
    if optimizer is not None:
        slots = len(getattr(optimizer, "SLOTS", ()))
        size += slots * sum(g.params.nbytes for g in optimizer.groups)
        tensors += slots * len(state)
    return size + 1024 * tensors + 65536


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint (a file, or a run directory).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a gpucnn checkpoint, unsupported version, tensor
            list/shape/dtype mismatch or SHA-256 mismatch (tampered/corrupt).
    """
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    files = _read_npz(path)
    if _META_KEY not in files:
        raise CheckpointError(f"{path}: not a gpucnn checkpoint (no {_META_KEY} entry)")
    raw = files.pop(_META_KEY)
    try:
        meta = json.loads(str(raw[()]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a gpucnn checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('version')!r} is not supported "
            f"(this gpucnn reads version {FORMAT_VERSION})")
    try:
        return _checked_checkpoint(path, meta, files)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed checkpoint metadata ({type(exc).__name__}: {exc}); "
                              f"the file is corrupt or was not written by gpucnn") from None


def _read_npz(path: Path) -> dict:
    """Every array of the ``.npz`` at ``path`` (never unpickling), or a CheckpointError saying why not."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK":   # every .npz is a zip archive
        raise CheckpointError(f"{path}: not a gpucnn checkpoint (a checkpoint is a .npz zip archive; "
                              f"this file starts with {head!r})")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path}: truncated or damaged checkpoint ({path.stat().st_size} bytes; its zip "
                              f"archive is incomplete): use an earlier copy, or retrain") from None
    except ValueError as exc:
        if "pickle" in str(exc):   # an object array: never loaded, and not ours
            raise CheckpointError(f"{path}: not a gpucnn checkpoint (it holds Python objects, which "
                                  f"gpucnn checkpoints never do)") from None
        raise CheckpointError(f"{path}: damaged checkpoint ({exc})") from None
    except (OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: truncated or damaged checkpoint ({type(exc).__name__}: {exc})") from None


def _checked_checkpoint(path, meta: dict, files: dict) -> "Checkpoint":
    declared = meta.get("tensors") or {}
    if not isinstance(declared, dict):
        raise CheckpointError(f"{path}: malformed checkpoint metadata: 'tensors' is {type(declared).__name__}")
    problems = []
    missing = sorted(set(declared) - set(files))
    extra = sorted(set(files) - set(declared))
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"undeclared tensors {extra}")
    for k in sorted(set(declared) & set(files)):
        shape, dtype = tuple(declared[k]["shape"]), declared[k]["dtype"]
        if tuple(files[k].shape) != shape:
            problems.append(f"{k}: shape {tuple(files[k].shape)} but metadata says {shape}")
        if files[k].dtype.str != dtype:
            problems.append(f"{k}: dtype {files[k].dtype.str} but metadata says {dtype}")
    if problems:
        raise CheckpointError(f"{path}: inconsistent checkpoint: " + "; ".join(problems))
    digest = _digest(meta, files)
    if digest != meta.get("sha256"):
        raise CheckpointError(
            f"{path}: SHA-256 mismatch (stored {meta.get('sha256')}, computed {digest}): the "
            f"checkpoint was modified or is corrupt; refusing to load it")
    params = {k[len("param/"):]: v for k, v in files.items() if k.startswith("param/")}
    optimizer = None
    if meta.get("optimizer"):
        o = meta["optimizer"]
        slots = {k[len("optim/"):]: v for k, v in files.items() if k.startswith("optim/")}
        optimizer = {"type": o["type"], "hyper": o["hyper"], "step_count": o["step_count"], "slots": slots}
    return Checkpoint(path=path, model=meta.get("model"), epoch=int(meta.get("epoch", 0)), params=params,
                      optimizer=optimizer, config=meta.get("config") or {}, rng=meta.get("rng") or {},
                      metrics=meta.get("metrics") or {}, meta=meta)


def load_into(ckpt: Checkpoint, model, optimizer=None) -> None:
    """Load a checkpoint's parameters (and optimizer state) into existing objects.

    Raises:
        CheckpointError: the architecture differs (the message lists every
            missing/unexpected tensor and shape mismatch) or the optimizer
            type differs.
    """
    try:
        model.load_state_dict(ckpt.params, strict=True)
    except (KeyError, ValueError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise CheckpointError(
            f"{ckpt.path}: checkpoint of model {ckpt.model!r} does not fit this network "
            f"({getattr(model, 'name', None) or 'custom'}): {msg}") from None
    if optimizer is not None:
        if ckpt.optimizer is None:
            raise CheckpointError(f"{ckpt.path}: checkpoint holds no optimizer state")
        try:
            optimizer.load_state_dict(ckpt.optimizer)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{ckpt.path}: optimizer state does not fit: {exc}") from None


def restore_model(path, device: str = "cpu"):
    """Build the checkpoint's named model and load its weights; returns ``(model, ckpt)``."""
    from . import models

    ckpt = load_checkpoint(path)
    if ckpt.model not in models.MODELS:
        raise CheckpointError(
            f"{ckpt.path}: checkpoint is of model {ckpt.model!r}, not one of {', '.join(models.MODELS)}; "
            f"build the network yourself and use gpucnn.checkpoint.load_into")
    dtype = np.dtype(next(iter(ckpt.params.values())).dtype) if ckpt.params else np.float32
    model = models.build(ckpt.model, dtype=dtype)
    load_into(ckpt, model)
    if device != "cpu":
        model.to(device)
    return model, ckpt
