"""safetensors files, read and written by gpucnn itself (no pickle, no ``safetensors`` package).

The format: an 8-byte little-endian unsigned header length ``n``; ``n`` bytes
of UTF-8 JSON, ``{name: {"dtype": "F32", "shape": [...], "data_offsets":
[begin, end]}, "__metadata__": {str: str}}`` (padded with spaces to a multiple
of 8); then the tensors' raw little-endian, C-order bytes, ``data_offsets``
counting from the first byte after the header.  The reader checks everything
before it trusts it: the header length against the file size, the JSON, every
entry's keys, dtype, shape and byte count, and that the tensors tile the data
exactly (contiguous, in range, no gaps or overlaps).

Weights use PyTorch ``nn.Sequential`` names, ``"{i}.weight"`` and
``"{i}.bias"`` with ``i`` the layer's index (PReLU's slope is ``"{i}.weight"``),
so the same architecture built as ``torch.nn.Sequential`` loads a gpucnn
export with ``load_state_dict(..., strict=True)`` and the other way round.
The per-layer-class naming lives in a registry (:func:`register`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .. import backend
from .. import layers as L
from .._io import atomic_open, json_depth
from . import ExportError

__all__ = [
    "SafetensorsError", "DTYPES", "MAX_HEADER_BYTES", "MAX_HEADER_DEPTH", "register", "torch_state_dict",
    "to_safetensors", "load_safetensors", "read_safetensors", "write_safetensors",
]

#: safetensors dtype code -> NumPy little-endian dtype (BF16 and the F8 types have no NumPy dtype).
DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "|i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "|u1", "BOOL": "|b1",
}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
#: How deeply the header's JSON may nest (a valid header nests 3 levels), checked before it is parsed.
MAX_HEADER_DEPTH = 64
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
PICKLE_HINT = ('convert it in PyTorch with safetensors.torch.save_file(model.state_dict(), '
               '"weights.safetensors") and load that file')


class SafetensorsError(ExportError):
    """A file is not a valid safetensors file (the message names the problem)."""


# -- the per-layer-class naming registry ---------------------------------------------

_NAMERS: dict = {}


def register(*layer_classes):
    """Decorator: ``fn(layer) -> {torch_suffix: (array_dict, key)}`` names a layer's tensors.

    Args:
        layer_classes: the exact gpucnn layer classes the function handles.

    Returns:
        The decorator (it returns the function unchanged).

    ``array_dict[key]`` is the array (e.g. ``layer.params["W"]``), written in
    place on import; the full name is ``f"{index}.{torch_suffix}"``.
    """
    def decorate(fn):
        for cls in layer_classes:
            _NAMERS[cls] = fn
        return fn
    return decorate


@register(L.Conv2D, L.Dense)
def _weight_bias(layer) -> dict:
    slots = {"weight": (layer.params, "W")}
    if "b" in layer.params:
        slots["bias"] = (layer.params, "b")
    return slots


@register(L.PReLU)
def _prelu(layer) -> dict:
    return {"weight": (layer.params, "a")}


@register(L.ReLU, L.Sigmoid, L.Tanh, L.ScaledTanh, L.LeakyReLU, L.RReLU, L.Softmax, L.Flatten,
          L.MaxPool2D, L.AvgPool2D, L.Dropout, L.GlobalAvgPool2D)
def _stateless(layer) -> dict:
    return {}


@register(L.BatchNorm2d, L.BatchNorm1d)
def _batch_norm(layer) -> dict:
    slots = {name: (layer.buffers, name) for name in ("running_mean", "running_var", "num_batches_tracked")}
    if layer.affine:
        slots.update(weight=(layer.params, "gamma"), bias=(layer.params, "beta"))
    return slots


@register(L.Sequential)
def _nested(layer) -> dict:
    return _slots(layer)


@register(L.Residual)
def _residual(layer) -> dict:
    """PyTorch twin: a module with submodules ``block`` and (when there is one) ``shortcut``."""
    out = {f"block.{k}": v for k, v in _slots(layer.block).items()}
    if layer.shortcut is not None:
        out.update({f"shortcut.{k}": v for k, v in _slots(layer.shortcut).items()})
    return out


def _slots(model) -> dict:
    """``{torch name: (array_dict, key)}`` for every tensor of ``model``, in layer order."""
    if not isinstance(model, L.Sequential):
        raise TypeError(f"model must be a gpucnn.layers.Sequential, got {type(model).__name__}")
    out = {}
    for i, layer in enumerate(model.layers):
        fn = _NAMERS.get(type(layer))
        if fn is None:
            raise ExportError(
                f"layer {i} ({type(layer).__name__}) has no safetensors naming; supported layers: "
                f"{', '.join(sorted(c.__name__ for c in _NAMERS))}")
        slots = fn(layer)
        covered = {k for d, k in slots.values() if d is layer.params}
        left = sorted(set(layer.params) - covered)
        if left and type(layer) not in (L.Sequential, L.Residual):
            raise ExportError(f"layer {i} ({type(layer).__name__}): parameters {left} have no safetensors name")
        out.update({f"{i}.{suffix}": slot for suffix, slot in slots.items()})
    return out


def torch_state_dict(model) -> dict:
    """The model's tensors under PyTorch ``nn.Sequential`` names, as NumPy copies.

    Args:
        model: a :class:`~gpucnn.layers.Sequential` (any device).

    Returns:
        ``{"0.weight": array, "0.bias": array, ...}`` in layer order, in the model's dtype.
    """
    return {name: np.array(backend.asnumpy(d[k]), copy=True) for name, (d, k) in _slots(model).items()}


# -- writing -------------------------------------------------------------------------


def _check_tensors(tensors, metadata) -> tuple:
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensor names must be non-empty strings other than '__metadata__', got {name!r}")
        a = np.ascontiguousarray(backend.asnumpy(value))
        if a.dtype.newbyteorder("<") not in _CODES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be stored; supported: "
                             f"{', '.join(str(np.dtype(d)) for d in DTYPES.values())}")
        arrays[name] = a
    meta = dict(metadata or {})
    bad = {k: v for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"metadata must map str to str, got {bad!r}")
    return arrays, meta


def write_safetensors(path, tensors, metadata=None) -> Path:
    """Write ``tensors`` to a safetensors file, atomically.

    Args:
        path: destination file (parent directories are created, as
            :func:`gpucnn._io.atomic_open` does; nothing is written on error).
        tensors: ``{name: array}`` (NumPy or CuPy), written in that order.
        metadata: optional ``{str: str}`` stored as ``__metadata__``.

    Returns:
        The path written.
    """
    arrays, meta = _check_tensors(tensors, metadata)
    header, offset = {}, 0
    if meta:
        header["__metadata__"] = meta
    blobs = []
    for name, a in arrays.items():
        le = a.astype(a.dtype.newbyteorder("<"), copy=False)
        blobs.append(le.tobytes(order="C"))
        header[name] = {"dtype": _CODES[le.dtype], "shape": [int(d) for d in a.shape],
                        "data_offsets": [offset, offset + len(blobs[-1])]}
        offset += len(blobs[-1])
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
    path = Path(path)
    with atomic_open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for b in blobs:
            f.write(b)
    return path


def to_safetensors(model, path) -> Path:
    """Write ``model``'s weights to ``path`` under PyTorch ``nn.Sequential`` names.

    Args:
        model: a :class:`~gpucnn.layers.Sequential` (any device).  Tensors keep
            the model's dtype (F32 for float32 models, F64 for float64): no conversion.
        path: destination file (written atomically).

    Returns:
        The path written.  ``__metadata__`` holds ``format`` ("pt"),
        ``gpucnn_model`` (the model's name, when it has one) and ``gpucnn_version``.
    """
    from .. import __version__

    tensors = torch_state_dict(model)
    meta = {"format": "pt", "gpucnn_version": __version__}
    if getattr(model, "name", None):
        meta["gpucnn_model"] = str(model.name)
    return write_safetensors(path, tensors, meta)


# -- reading -------------------------------------------------------------------------


def _fail(path, problem: str) -> SafetensorsError:
    return SafetensorsError(f"{path}: not a valid safetensors file: {problem}")


def _looks_like_pickle(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04" or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _refuse_pickle(path: Path, head: bytes, plausible: bool) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES or (not plausible and _looks_like_pickle(head)):
        raise SafetensorsError(f"{path}: looks like a PyTorch pickle/zip file ({path.suffix or 'no suffix'}), "
                               f"which gpucnn never unpickles; {PICKLE_HINT}")


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate keys {dup}")
    return dict(pairs)


def _parse_header(path, raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(path, f"header is not UTF-8 ({exc})") from None
    depth = json_depth(text)
    if depth > MAX_HEADER_DEPTH:
        raise _fail(path, f"header JSON nests {depth} levels deep, more than the {MAX_HEADER_DEPTH} allowed "
                          f"(a valid header nests 3)")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        raise _fail(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"header must be a JSON object, got {type(header).__name__}")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _fail(path, f"__metadata__ must map strings to strings, got {meta!r}")
    return header


def _entry(path, name: str, info) -> tuple:
    """``(dtype, shape, begin, end)`` of one header entry, checked."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets; got {info!r}")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if code not in DTYPES:
        raise _fail(path, f"tensor {name!r}: dtype {code!r} is not supported (supported: {', '.join(DTYPES)}); "
                          f"convert it in PyTorch, e.g. tensor.float()")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r}: shape must be a list of non-negative ints, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _fail(path, f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                          f"got {offsets!r}")
    dtype = np.dtype(DTYPES[code])
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise _fail(path, f"tensor {name!r}: {code} shape {shape} needs {expected} bytes, but data_offsets "
                          f"{offsets} span {offsets[1] - offsets[0]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _check_layout(path, entries: dict, data_len: int) -> None:
    """The tensors must tile the data buffer exactly: contiguous, no gaps, in range."""
    pos = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise _fail(path, f"tensor {name!r}: data_offsets [{begin}, {end}] {what} (expected begin {pos})")
        pos = end
    if pos != data_len:
        problem = "run past" if pos > data_len else "do not cover"
        raise _fail(path, f"tensor data ({pos} bytes by data_offsets) {problem} the {data_len} bytes after the header")


def read_safetensors(path) -> tuple:
    """Read and validate a safetensors file.

    Args:
        path: the file.  Pickle/zip files (``.pt``, ``.pth``, ``.bin``, ...) are
            refused with a hint on converting them; nothing is ever unpickled.

    Returns:
        ``(tensors, metadata)``: ``{name: NumPy array}`` in the file's header
        order (native byte order, writable copies) and the ``__metadata__`` dict.

    Raises:
        FileNotFoundError: no such file.
        SafetensorsError: the file is not a valid safetensors file (says why).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    plausible = 0 <= n <= MAX_HEADER_BYTES and 8 + n <= len(data) and data[8:9] == b"{"
    _refuse_pickle(path, data[:8], plausible)
    if len(data) < 8:
        raise _fail(path, f"file is {len(data)} bytes, shorter than the 8-byte header length")
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise _fail(path, f"header length {n} does not fit the file of {len(data)} bytes "
                          f"(limit {MAX_HEADER_BYTES} bytes)")
    if not plausible:
        raise _fail(path, f"header must be a JSON object starting with '{{', got {data[8:16]!r}")
    header = _parse_header(path, data[8:8 + n])
    meta = header.pop("__metadata__", {})
    entries = {name: _entry(path, name, info) for name, info in header.items()}
    buf = memoryview(data)[8 + n:]
    _check_layout(path, entries, len(buf))
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        a = np.frombuffer(buf[begin:end], dtype=dtype).reshape(shape)
        tensors[name] = a.astype(dtype.newbyteorder("="), copy=True)
    return tensors, dict(meta)


# -- loading into a model ---------------------------------------------------------------


def _code(dtype) -> str:
    return _CODES.get(np.dtype(dtype).newbyteorder("<"), _CODES.get(np.dtype(dtype), "?"))


def _mismatches(slots: dict, tensors: dict) -> list:
    problems = []
    missing = [k for k in slots if k not in tensors]
    unexpected = [k for k in tensors if k not in slots]
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    for name, (d, k) in slots.items():
        if name not in tensors:
            continue
        have, want = tensors[name], d[k]
        if tuple(have.shape) != tuple(want.shape):
            problems.append(f"{name!r}: shape {tuple(have.shape)} in the file, {tuple(want.shape)} in the model")
        elif have.dtype != want.dtype:
            problems.append(f"{name!r}: dtype {have.dtype} ({_code(have.dtype)}) in the file, {want.dtype} "
                            f"({_code(want.dtype)}) in the model")
    return problems


def load_safetensors(model, path) -> dict:
    """Load PyTorch-named weights from a safetensors file into ``model``, strictly.

    Args:
        model: a :class:`~gpucnn.layers.Sequential`; its arrays are overwritten
            in place, on their current device.
        path: a safetensors file (e.g. written by :func:`to_safetensors` or by
            ``safetensors.torch.save_file(torch_model.state_dict(), path)``).

    Returns:
        The file's ``__metadata__`` dict.

    Raises:
        SafetensorsError: the file is invalid, or a pickle file (with a hint).
        ExportError: missing, unexpected, mis-shaped or mis-typed tensors (all
            named in one message); nothing is loaded then.  dtypes are never
            converted: build the model in the file's dtype.
    """
    slots = _slots(model)
    tensors, meta = read_safetensors(path)
    problems = _mismatches(slots, tensors)
    if problems:
        hint = ""
        if meta.get("gpucnn_model") and meta.get("gpucnn_model") != getattr(model, "name", None):
            hint = f" (the file holds gpucnn model {meta['gpucnn_model']!r})"
        raise ExportError(f"{os.fspath(path)}: tensors do not fit model {getattr(model, 'name', None) or 'custom'!r}"
                          f"{hint}: " + "; ".join(problems) + "; nothing was loaded")
    for name, (d, k) in slots.items():
        target = d[k]
        target[...] = backend.to_device(tensors[name], backend.device_of(target))
    return meta
