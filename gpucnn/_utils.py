"""Argument checking and shape arithmetic shared by every layer.

Every check raises with the offending value named, e.g.
``ValueError("stride must be >= 1, got stride=(0, 1)")``.
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path

import numpy as np

from .backend import check_same_device, device_of

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters with "..." (a bad value named in an error message)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def pair(value, name: str, minimum: int) -> tuple[int, int]:
    """Normalise an int or an (h, w) pair to a tuple of two ints >= ``minimum``."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        if value[0] >= minimum and value[1] >= minimum:   # the common case, checked cheaply
            return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        out = (int(value), int(value))
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    ):
        out = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got {name}={value!r}")
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value!r}")
    return out


def positive_int(value, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return int(value)


def output_size(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    """Output length of a convolution or pooling window along one axis, the one place it is written:
    ``floor((size + 2 * padding - kernel) / stride) + 1`` (<= 0 when the kernel does not fit)."""
    return (size + 2 * padding - kernel) // stride + 1


def conv_output_size(size: int, kernel: int, stride: int, padding: int, axis: str = "H") -> int:
    """:func:`output_size`, raising when the (padded) input is smaller than the kernel, naming all
    the numbers."""
    if size + 2 * padding - kernel < 0:
        raise ValueError(
            f"output {axis} would be <= 0: input {axis}={size} with padding={padding} "
            f"is smaller than kernel={kernel} (need {axis} + 2*padding >= kernel)"
        )
    return output_size(size, kernel, stride, padding)


def shown_shape(x, internal: bool = False) -> tuple:
    """The shape (of an array, or a shape) as a user knows it: batch-last is shown batch-first."""
    shape = tuple(int(s) for s in (x.shape if hasattr(x, "shape") else x))
    return shape[-1:] + shape[:-1] if internal and shape else shape


def check_array(x, name: str, ndim: int | None = None, layer: str = "", internal: bool = False) -> None:
    """Check that ``x`` is a float32/float64 NumPy or CuPy array of rank ``ndim``.

    ``internal``: ``x`` is batch-last; messages show its shape batch-first.
    """
    where = f"{layer}: " if layer else ""
    device_of(x, f"{where}{name}")  # raises TypeError for non-arrays
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"{where}{name} must have rank {ndim}, got shape {shown_shape(x, internal)} (rank {x.ndim})"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{where}{name} has dtype {x.dtype}; supported dtypes are float32 and float64"
        )


def check_param_match(x, param, xname: str, layer: str) -> None:
    """``x`` and a layer parameter must share device and dtype (nothing is cast silently)."""
    check_same_device(**{xname: x, f"{layer} parameters": param})
    if x.dtype != param.dtype:
        raise TypeError(
            f"{layer}: {xname} has dtype {x.dtype} but the layer's parameters are "
            f"{param.dtype}; convert explicitly with x.astype(...) or layer.astype(...)"
        )


def check_integer_labels(labels, name: str = "labels", where: str = "") -> None:
    """Class labels must have an integer dtype: nothing truncates 7.5 to 7 (or 7.0 to 7) silently.

    Raises ``TypeError`` naming the dtype and, for floating labels, the first
    value that is not a whole number (index and value); whole-number floats are
    refused too, with how to convert them explicitly.  ``where`` prefixes the
    message (``"one_hot: "``).
    """
    dtype = labels.dtype
    if dtype.kind in "iu":
        return
    msg = f"{where}{name} must be integer class indices, got dtype {dtype}"
    if dtype.kind == "f":
        host = np.asarray(labels.get() if hasattr(labels, "get") else labels).reshape(-1)
        bad = np.flatnonzero(~(np.isfinite(host) & (host == np.floor(host))))
        if bad.size:
            i = int(bad[0])
            msg += f": {name}[{i}] = {host[i].item()!r} is not a whole number"
        else:
            msg += f" (whole numbers: convert them explicitly, {name}.astype(np.int64))"
    raise TypeError(msg)


def check_directory_path(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path, when it is a directory or can be created as one.

    Raises ``ValueError`` naming the file in the way: ``path`` itself (``"<what>
    <path> is a file, not a directory"``) or the file among its parents.
    Nothing is created.
    """
    p = Path(path)
    named = f"{what} {p}" if what else str(p)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"{named} is a file, not a directory" if q == p else
                                 f"{named} cannot be a directory: {q} is a file")
            break
    return p


def inputs_for(model, x):
    """``x`` (normalised float images) converted to ``model``'s parameter dtype, explicitly.

    The boundary where prepared inputs meet a model (``gc.predict``, ``gpucnn
    predict``, ``gpucnn evaluate``): images are prepared as float32 and a
    float64 model gets float64 copies of them.  ``x`` is returned as it is when
    the dtypes already match or the model has no floating parameters.  Inside
    a network a dtype mismatch stays a ``TypeError`` (no silent casts).
    """
    dt = getattr(model, "dtype", None)
    if dt is None or np.dtype(dt).kind != "f" or x.dtype == dt:
        return x
    return x.astype(dt)
