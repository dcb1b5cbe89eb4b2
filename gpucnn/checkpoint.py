"""Checkpoints: one ``.npz`` file, no pickle anywhere, written atomically.

Layout of ``checkpoint.npz`` (read with ``np.load(path, allow_pickle=False)``):

``__meta__``
    0-d unicode array holding a JSON object: ``format`` (``"gpucnn-checkpoint"``),
    ``version`` (:data:`FORMAT_VERSION`), ``model`` (name for
    :func:`gpucnn.models.build`, or ``null`` for a custom network), ``epoch``,
    ``config`` (the training configuration), ``tensors`` (every array's name,
    shape and dtype, validated on load), ``optimizer`` (type, hyper-parameters,
    step count; its slots are tensors), ``loss_scaler`` (an fp16 run's loss
    scale, its counters and rule, :meth:`gpucnn.train.LossScaler.state_dict`;
    ``null`` otherwise), ``rng`` (gpucnn's generator state and the
    data-shuffling generator's state), ``metrics`` (the epoch's metrics), and
    ``sha256``.
``param/<name>``
    One array per model parameter (``model.state_dict()`` names: ``0.W``, ...).
``optim/<name>/<slot>``
    The optimizer's per-parameter slots (momentum buffer, Adam's m and v).

``sha256`` is the SHA-256 over the metadata (without the digest itself) and
every tensor's name, dtype, shape and bytes.  A file whose digest does not
match is refused with :class:`CheckpointError`: this catches corruption and
edits made without recomputing the digest; it is not a signature.

A hostile file is refused before it costs memory: each zip member's declared
size, each ``.npy`` header's shape and dtype (against the metadata and
:data:`MAX_CHECKPOINT_BYTES`) and the metadata's JSON nesting are checked
before anything is inflated, allocated or parsed, and members are read no
further than their headers declare.  NaN/Inf tensors are refused by name;
:func:`restore_model` checks names, shapes and dtypes against the model's
architecture before it reads a tensor.

:func:`save_checkpoint` writes to a temporary file in the destination
directory, flushes and fsyncs it and then ``os.replace``-s it over the old
file, so an interrupted save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._io import atomic_open, json_depth, read_into
from . import backend
from ._utils import short_repr

FORMAT = "gpucnn-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.npz"
_META_KEY = "__meta__"

#: The most bytes the tensors of one checkpoint may hold together (gpucnn's
#: largest model, resnet_mini, holds 0.6 MB in float32); a larger declared
#: size is refused before anything is inflated or allocated.
MAX_CHECKPOINT_BYTES = 1 << 30
#: The most bytes of the ``__meta__`` entry (a few kilobytes in practice).
MAX_META_BYTES = 16 << 20
#: How deeply the metadata's JSON may nest (what gpucnn writes nests 5 levels).
MAX_META_DEPTH = 64

__all__ = [
    "CheckpointError", "Checkpoint", "FORMAT_VERSION", "CHECKPOINT_NAME",
    "resolve_path", "save_checkpoint", "estimated_size", "load_checkpoint", "read_metadata", "load_into",
    "restore_model", "MAX_CHECKPOINT_BYTES", "MAX_META_BYTES", "MAX_META_DEPTH",
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
        loss_scaler: ``LossScaler.state_dict()`` of an fp16 run, or ``None``.
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
    loss_scaler: dict | None = None
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
                    metrics: dict | None = None, loss_scaler=None) -> Path:
    """Write ``model`` (and ``optimizer``) to ``path`` atomically; returns the path.

    Args:
        path: the ``.npz`` file (or a directory: ``<dir>/checkpoint.npz``).
        model: a :class:`~gpucnn.layers.Sequential` (on any device).
        optimizer: a :class:`~gpucnn.optim.Optimizer` or ``None``.
        loss_scaler: a :class:`~gpucnn.train.LossScaler` (fp16) or ``None``: its state goes into
            the metadata (JSON numbers: the scale is a power of two, exact).
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
        "loss_scaler": None if loss_scaler is None else loss_scaler.state_dict(),
        "rng": rng or {},
        "metrics": metrics or {},
        "data": data_meta(model),
    })
    meta["sha256"] = _digest(meta, arrays)
    payload = dict(arrays)
    payload[_META_KEY] = np.array(json.dumps(meta, sort_keys=True))
    with atomic_open(path) as f:
        np.savez(f, **payload)
    return path


def data_meta(model) -> dict:
    """What a checkpoint records of the data ``model`` takes: ``in_shape``, ``num_classes`` (set by
    :func:`gpucnn.models.build`) and, once trained, ``classes``, ``mean`` and ``std`` (per channel);
    only the attributes the model has."""
    out = {}
    for key in ("in_shape", "num_classes", "classes", "mean", "std"):
        value = getattr(model, key, None)
        if value is not None:
            out[key] = list(value) if isinstance(value, (tuple, list)) else value
    return out


#: What a checkpoint without a ``data`` record (written before gpucnn knew other shapes) was trained on.
LEGACY_DATA = {"in_shape": [1, 28, 28], "num_classes": 10}


def checkpoint_data(path, meta: dict) -> dict:
    """The checkpoint's data record (``LEGACY_DATA`` for an old one), its shape and class count checked."""
    data = meta.get("data") or dict(LEGACY_DATA)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: malformed checkpoint metadata: 'data' must be a JSON object, got "
                              f"{short_repr(data)}")
    data = {**LEGACY_DATA, **data}
    shape, k = data["in_shape"], data["num_classes"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)) \
            or not (isinstance(k, int) and k >= 2):
        raise CheckpointError(f"{path}: malformed checkpoint metadata: data.in_shape must be [C, H, W] and "
                              f"data.num_classes an integer >= 2, got {short_repr(shape)} and {short_repr(k)}")
    classes = data.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != k
                                or not all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"{path}: malformed checkpoint metadata: data.classes must be {k} class names, "
                              f"got {short_repr(classes)}")
    return data


def estimated_size(model, optimizer=None) -> int:
    """Bytes that :func:`save_checkpoint` of ``model`` and ``optimizer`` takes, at most about: every
    parameter and buffer, every slot the optimizer's type keeps (whether made yet or not), and room
    for the archive's headers and the metadata."""
    entries = getattr(model, "_state_entries", None)   # a container's live arrays: no host copies
    state = [d[k] for d, k in entries().values()] if entries is not None else list(model.state_dict().values())
    size = sum(int(a.nbytes) for a in state)
    tensors = len(state)
    if optimizer is not None:
        slots = len(getattr(optimizer, "SLOTS", ()))
        size += slots * sum(g.params.nbytes for g in optimizer.groups)
        tensors += slots * len(state)
    return size + 1024 * tensors + 65536


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint (a file, or a run directory).

    Every size is checked before anything is inflated or allocated: each zip
    member's declared size, each ``.npy`` header's shape and dtype against the
    metadata and against :data:`MAX_CHECKPOINT_BYTES`; the metadata's size
    and JSON nesting before it is parsed; and each member is read no further
    than its header declares.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a gpucnn checkpoint, unsupported version, too
            large, tensor list/shape/dtype mismatch, SHA-256 mismatch
            (tampered/corrupt) or a non-finite (NaN/Inf) tensor.
    """
    path = resolve_path(path)
    meta, files = _read(path, tensors=True)
    digest = _digest(meta, files)
    if digest != meta.get("sha256"):
        raise CheckpointError(
            f"{path}: SHA-256 mismatch (stored {meta.get('sha256')}, computed {digest}): the "
            f"checkpoint was modified or is corrupt; refusing to load it")
    _check_finite(path, files)
    try:
        return _checkpoint(path, meta, files)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed checkpoint metadata ({type(exc).__name__}: {exc}); "
                              f"the file is corrupt or was not written by gpucnn") from None


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint, its structure checked but no tensor read (so no SHA-256 check).

    What :func:`load_checkpoint` checks before it reads a tensor is checked
    here too: the archive, the metadata (size, nesting, JSON, format,
    version) and that the ``.npy`` headers match the declared tensors.
    """
    return _read(resolve_path(path), tensors=False)[0]


def _read(path: Path, tensors: bool) -> tuple:
    """``(metadata, {name: array})`` of the ``.npz`` at ``path`` (``{}`` unless ``tensors``), sizes first."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK":   # every .npz is a zip archive
        raise CheckpointError(f"{path}: not a gpucnn checkpoint (a checkpoint is a .npz zip archive; "
                              f"this file starts with {head!r})")
    try:
        with zipfile.ZipFile(path) as zf:
            members = _members(path, zf)
            headers = {name: _npy_header(path, zf, info, name) for name, info in members.items()}
            if _META_KEY not in members:
                raise CheckpointError(f"{path}: not a gpucnn checkpoint (no {_META_KEY} entry)")
            meta = _parse_meta(path, _read_array(path, zf, members[_META_KEY], headers[_META_KEY]))
            declared = _declared_tensors(path, meta)
            _check_headers(path, declared, {k: v for k, v in headers.items() if k != _META_KEY})
            files = {k: _read_array(path, zf, members[k], headers[k]) for k in declared} if tensors else {}
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path}: truncated or damaged checkpoint ({path.stat().st_size} bytes; its zip "
                              f"archive is incomplete or corrupt: {exc}): use an earlier copy, or retrain") from None
    except CheckpointError:
        raise
    except ValueError as exc:   # NumPy's .npy header parser
        raise CheckpointError(f"{path}: damaged checkpoint ({exc})") from None
    except (OSError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: truncated or damaged checkpoint ({type(exc).__name__}: {exc})") from None
    return meta, files


def _members(path, zf: zipfile.ZipFile) -> dict:
    """``{array name: ZipInfo}`` of the archive; every member a ``.npy`` file of a declared size within the limits."""
    infos = zf.infolist()
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: damaged checkpoint (the zip archive names a member twice)")
    limit = MAX_CHECKPOINT_BYTES + MAX_META_BYTES
    total = sum(info.file_size for info in infos)
    if total > limit:
        biggest = max(infos, key=lambda info: info.file_size)
        raise CheckpointError(f"{path}: too large: its members would inflate to {total} bytes "
                              f"({biggest.filename!r}: {biggest.file_size}), more than the {limit}-byte limit "
                              f"for a checkpoint; refusing to read it")
    out = {}
    for info in infos:
        if not info.filename.endswith(".npy"):
            raise CheckpointError(f"{path}: not a gpucnn checkpoint (member {info.filename!r} is not a .npy array)")
        out[info.filename[:-len(".npy")]] = info
    return out


def _npy_header(path, zf, info, name: str) -> tuple:
    """``(shape, dtype, fortran_order)`` from the ``.npy`` header of member ``name`` (no data read)."""
    with zf.open(info) as f:
        return _npy_header_of(path, f, name)


def _npy_header_of(path, f, name: str) -> tuple:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise CheckpointError(f"{path}: {name}: .npy format version {version} is not one NumPy's savez writes")
    if dtype.hasobject:   # an object array: never loaded, and not ours
        raise CheckpointError(f"{path}: not a gpucnn checkpoint (it holds Python objects, which "
                              f"gpucnn checkpoints never do)")
    limit = MAX_META_BYTES if name == _META_KEY else MAX_CHECKPOINT_BYTES
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limit:
        raise CheckpointError(f"{path}: too large: {name} declares shape {tuple(shape)} of {dtype} "
                              f"({nbytes} bytes), more than the {limit}-byte limit; refusing to read it")
    return tuple(shape), dtype, fortran


def _read_array(path, zf, info, header: tuple) -> np.ndarray:
    """The array of one member, read no further than its (already checked) ``.npy`` header declares."""
    shape, dtype, fortran = header
    name = info.filename
    with zf.open(info) as f:
        _npy_header_of(path, f, name)   # skip it
        out = np.empty(shape[::-1] if fortran else shape, dtype)
        got = read_into(f, out) if out.nbytes else 0
        if got < out.nbytes:
            raise CheckpointError(f"{path}: truncated checkpoint: {name} declares {out.nbytes} bytes, holds {got}")
        if f.read(1):
            raise CheckpointError(f"{path}: damaged checkpoint: {name} holds more bytes than the "
                                  f"{out.nbytes} its header declares")
    return out.T if fortran else out


def _parse_meta(path, raw: np.ndarray) -> dict:
    """The metadata object from the ``__meta__`` array: nesting bounded before parsing, format and version checked."""
    if raw.shape != () or raw.dtype.kind != "U":
        raise CheckpointError(f"{path}: not a gpucnn checkpoint ({_META_KEY} is a {raw.dtype} array of shape "
                              f"{raw.shape}, not a JSON string)")
    text = str(raw[()])
    depth = json_depth(text)
    if depth > MAX_META_DEPTH:
        raise CheckpointError(f"{path}: malformed checkpoint metadata: its JSON nests {depth} levels deep, more "
                              f"than the {MAX_META_DEPTH} a gpucnn checkpoint may have; refusing to parse it")
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not a gpucnn checkpoint (format {fmt!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('version')!r} is not supported "
            f"(this gpucnn reads version {FORMAT_VERSION})")
    if meta.get("loss_scaler") is not None and not isinstance(meta["loss_scaler"], dict):
        raise CheckpointError(f"{path}: malformed checkpoint metadata: 'loss_scaler' must be a JSON object or "
                              f"null, got {short_repr(meta['loss_scaler'])}")
    for key in ("config", "rng", "metrics"):
        if not isinstance(meta.get(key, {}), dict):
            raise CheckpointError(f"{path}: malformed checkpoint metadata: {key!r} must be a JSON object, "
                                  f"got {type(meta[key]).__name__} {short_repr(meta[key])}")
    return meta


def _declared_tensors(path, meta: dict) -> dict:
    """``{name: (shape, dtype)}`` from the metadata's ``tensors``, each entry checked."""
    declared = meta.get("tensors") or {}
    if not isinstance(declared, dict):
        raise CheckpointError(f"{path}: malformed checkpoint metadata: 'tensors' is {type(declared).__name__}")
    out = {}
    for name, entry in declared.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and isinstance(dtype, str)):
            raise CheckpointError(f"{path}: malformed checkpoint metadata: tensor {name!r} is {short_repr(entry)}, "
                                  f"expected {{\"shape\": [non-negative ints], \"dtype\": \"<f4\"}}")
        out[name] = (tuple(shape), dtype)
    return out


def _check_headers(path, declared: dict, headers: dict) -> None:
    """The ``.npy`` headers must be exactly the declared tensors, within the size limit (no data read yet)."""
    problems = []
    missing = sorted(set(declared) - set(headers))
    extra = sorted(set(headers) - set(declared))
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"undeclared tensors {extra}")
    for k in sorted(set(declared) & set(headers)):
        (shape, dtype), (have_shape, have_dtype, _) = declared[k], headers[k]
        if have_shape != shape:
            problems.append(f"{k}: shape {have_shape} but metadata says {shape}")
        if have_dtype.str != dtype:
            problems.append(f"{k}: dtype {have_dtype.str} but metadata says {dtype}")
    if problems:
        raise CheckpointError(f"{path}: inconsistent checkpoint: " + "; ".join(problems))
    total = sum(math.prod(shape) * dtype.itemsize for shape, dtype, _ in headers.values())
    if total > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path}: too large: its tensors declare {total} bytes, more than the "
                              f"{MAX_CHECKPOINT_BYTES}-byte limit; refusing to read them")


def _check_finite(path, files: dict) -> None:
    """Refuse NaN/Inf in any floating tensor: training stops before it writes one, so the file was edited."""
    for name in sorted(files):
        a = files[name]
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise CheckpointError(f"{path}: tensor {name} holds {bad} non-finite value(s) (NaN or Inf) of "
                                  f"{a.size}; a gpucnn checkpoint never does (training stops at a non-finite "
                                  f"loss), so the file was edited: refusing to load it")



def _checkpoint(path, meta: dict, files: dict) -> "Checkpoint":
    params = {k[len("param/"):]: v for k, v in files.items() if k.startswith("param/")}
    optimizer = None
    if meta.get("optimizer"):
        o = meta["optimizer"]
        slots = {k[len("optim/"):]: v for k, v in files.items() if k.startswith("optim/")}
        optimizer = {"type": o["type"], "hyper": o["hyper"], "step_count": o["step_count"], "slots": slots}
    return Checkpoint(path=path, model=meta.get("model"), epoch=int(meta.get("epoch", 0)), params=params,
                      optimizer=optimizer, config=meta.get("config") or {}, rng=meta.get("rng") or {},
                      metrics=meta.get("metrics") or {}, meta=meta, loss_scaler=meta.get("loss_scaler"))


def load_into(ckpt: Checkpoint, model, optimizer=None, loss_scaler=None) -> None:
    """Load a checkpoint's parameters (and optimizer state, and loss scale) into existing objects.

    ``loss_scaler``: a :class:`~gpucnn.train.LossScaler` to restore from the checkpoint's, when it
    has one (a checkpoint of a run that did not scale has none; the scaler is then left as it is).

    Raises:
        CheckpointError: the architecture differs (the message lists every
            missing/unexpected tensor and shape mismatch), the optimizer
            type differs, or the loss scaler's state is malformed.
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
    if loss_scaler is not None and ckpt.loss_scaler is not None:
        try:
            loss_scaler.load_state_dict(ckpt.loss_scaler)
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{ckpt.path}: loss scaler state does not fit: {exc}") from None


def restore_model(path, device: str = "cpu"):
    """Build the checkpoint's named model and load its weights; returns ``(model, ckpt)``.

    The declared tensors are checked against the model's architecture before
    any of them is read: the names, the shapes, and the dtypes (parameters
    float32 or float64, the same as the model's).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: what :func:`load_checkpoint` refuses, an unknown
            model, or tensors that do not fit the model (all named).
    """
    from . import models

    path = resolve_path(path)
    meta = read_metadata(path)
    name = meta.get("model")
    if name not in models.MODELS:
        raise CheckpointError(
            f"{path}: checkpoint is of model {name!r}, not one of {', '.join(models.MODELS)}; "
            f"build the network yourself and use gpucnn.checkpoint.load_into")
    declared = {k[len("param/"):]: v for k, v in _declared_tensors(path, meta).items() if k.startswith("param/")}
    data = checkpoint_data(path, meta)
    model = models.build(name, dtype=_model_dtype(path, declared), in_shape=data["in_shape"],
                         num_classes=data["num_classes"])
    for key in ("classes", "mean", "std"):
        if data.get(key) is not None:
            setattr(model, key, tuple(data[key]))
    problems = _fit_problems(declared, model.state_dict())
    if problems:
        raise CheckpointError(f"{path}: checkpoint of model {name!r} does not fit that model's architecture: "
                              + "; ".join(problems))
    ckpt = load_checkpoint(path)
    load_into(ckpt, model)
    if device != "cpu":
        model.to(device)
    return model, ckpt


def _model_dtype(path, declared: dict) -> np.dtype:
    """The dtype to build a model in: its floating parameters' (float32 or float64) as declared."""
    floats = [(k, np.dtype(dtype)) for k, (_, dtype) in sorted(declared.items()) if np.dtype(dtype).kind == "f"]
    if not floats:
        shown = ", ".join(f"{k} {np.dtype(d)}" for k, (_, d) in sorted(declared.items())[:3]) or "none"
        raise CheckpointError(f"{path}: the checkpoint holds no floating-point parameters ({shown}); a "
                              f"parameter's dtype must be float32 or float64")
    name, dtype = floats[0]
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise CheckpointError(f"{path}: parameter {name} has dtype {dtype}; a parameter's dtype must be "
                              f"float32 or float64")
    return dtype


def _fit_problems(declared: dict, own: dict) -> list:
    """What keeps declared ``{name: (shape, dtype)}`` from loading into state dict ``own`` (empty: it fits)."""
    problems = []
    missing = sorted(set(own) - set(declared))
    unexpected = sorted(set(declared) - set(own))
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    for k in sorted(set(own) & set(declared)):
        (shape, dtype), want = declared[k], own[k]
        if shape != tuple(want.shape):
            problems.append(f"{k}: shape {shape} in the checkpoint, {tuple(want.shape)} in the model")
        elif np.dtype(dtype) != want.dtype:
            problems.append(f"{k}: dtype {np.dtype(dtype)} in the checkpoint, {want.dtype} in the model")
    return problems
