"""The array-module abstraction: one code path for NumPy and CuPy.

Layers call ``xp = get_array_module(x, W)`` and then write ``xp.matmul``,
``xp.maximum`` ... once.  ``gpucnn`` imports and runs with no CuPy installed;
then every array is a NumPy array and ``xp`` is always ``numpy``.

Nothing here moves data silently: mixing NumPy and CuPy arrays in one call
raises :class:`DeviceMismatchError` naming which argument lives where, and
moving is explicit through :func:`to_device` / :func:`asnumpy`.
"""
from __future__ import annotations

import numpy as np

try:  # CuPy is optional: a missing or broken install means "CPU only".
    import cupy as _cupy  # type: ignore

    cupy = _cupy
except Exception:  # pragma: no cover - depends on the machine
    cupy = None

__all__ = [
    "DeviceMismatchError",
    "cupy",
    "cuda_available",
    "is_cupy",
    "device_of",
    "get_array_module",
    "to_device",
    "asnumpy",
    "check_same_device",
    "resolve_device",
    "gpu_name",
    "synchronize",
]

DEVICES = ("cpu", "cuda")


class DeviceMismatchError(TypeError):
    """Arrays from different devices (NumPy vs CuPy) were mixed in one call."""


def cuda_available() -> bool:
    """True when CuPy is importable and sees at least one CUDA device."""
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def is_cupy(a) -> bool:
    """True if ``a`` is a CuPy array."""
    return cupy is not None and isinstance(a, cupy.ndarray)


def device_of(a, name: str = "array") -> str:
    """``"cuda"`` for a CuPy array, ``"cpu"`` for a NumPy array.

    Raises:
        TypeError: ``a`` is neither (the message names it as ``name``).
    """
    if isinstance(a, np.ndarray):
        return "cpu"
    if is_cupy(a):
        return "cuda"
    raise TypeError(f"{name} must be a numpy or cupy ndarray, got {type(a).__name__}")


def check_same_device(**arrays) -> str:
    """Check that all named arrays live on one device and return it.

    ``None`` values are ignored.  Raises :class:`DeviceMismatchError` that
    names every argument and its device when they differ.
    """
    return check_devices(**{name: device_of(a, name) for name, a in arrays.items() if a is not None})


def check_devices(**where) -> str:
    """:func:`check_same_device` on device names (``"cpu"`` / ``"cuda"``) already known."""
    devices = set(where.values())
    if len(devices) > 1:
        desc = ", ".join(f"{name} on {dev}" for name, dev in where.items())
        raise DeviceMismatchError(
            f"arrays on different devices: {desc}; move them explicitly with "
            f"gpucnn.backend.to_device(array, 'cpu'|'cuda') or layer.to(device)"
        )
    return devices.pop() if devices else "cpu"


def get_array_module(*arrays, **named_arrays):
    """Return ``numpy`` or ``cupy`` for the given arrays.

    Positional arrays are named ``arg0, arg1, ...`` in errors; pass them by
    keyword to get better names.  All must live on one device.

    >>> import numpy as np
    >>> get_array_module(np.zeros(3)) is np
    True
    """
    kinds = {type(a) for a in arrays if a is not None}
    kinds.update(type(a) for a in named_arrays.values() if a is not None)
    if len(kinds) == 1:                       # the common case, decided by type alone
        kind = kinds.pop()
        if kind is np.ndarray:
            return np
        if cupy is not None and kind is cupy.ndarray:
            return cupy
    named = {f"arg{i}": a for i, a in enumerate(arrays)}
    named.update(named_arrays)
    return cupy if check_same_device(**named) == "cuda" else np


def to_device(a, device: str):
    """Copy ``a`` to ``device`` (``"cpu"`` or ``"cuda"``); no copy if already there."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got device={device!r}")
    if device == "cpu":
        return asnumpy(a)
    if cupy is None:
        raise RuntimeError(
            "device='cuda' needs CuPy: pip install 'gpucnn[cuda12]' (or [cuda13])"
        )
    if is_cupy(a):
        return a
    if not isinstance(a, np.ndarray):
        raise TypeError(f"expected a numpy or cupy ndarray, got {type(a).__name__}")
    return cupy.asarray(a)


def asnumpy(a):
    """Return a NumPy copy (or the array itself when it is already NumPy)."""
    if is_cupy(a):
        return a.get()
    if isinstance(a, np.ndarray):
        return a
    raise TypeError(f"expected a numpy or cupy ndarray, got {type(a).__name__}")


def resolve_device(device: str = "auto") -> tuple[str, str]:
    """``(device, reason)`` for ``"auto"``, ``"cpu"`` or ``"cuda"``.

    ``"auto"`` picks CUDA when CuPy sees a GPU and says why it chose what it chose.

    Raises:
        ValueError: unknown device, or ``"cuda"`` without a usable GPU (the
            message says whether CuPy is missing or sees no device).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got device={device!r}")
    has_cuda = cuda_available()
    if device == "cuda" and not has_cuda:
        raise ValueError(f"device='cuda' but CUDA is not available ({cuda_unavailable_reason()}); "
                         "use --device cpu or auto")
    if device == "auto":
        return ("cuda", "auto: CUDA available") if has_cuda else (
            "cpu", "auto: CUDA not available" + (" (CuPy not installed)" if cupy is None else ""))
    return device, "requested"


def cuda_unavailable_reason() -> str:
    """Why :func:`cuda_available` is false, in words ("" when it is true)."""
    if cupy is None:
        return "CuPy is not installed: pip install 'gpucnn[cuda12]' (or [cuda13])"
    if not cuda_available():
        return "CuPy is installed but sees no CUDA device"
    return ""


def gpu_name() -> str:
    """The current CUDA device's name ("GPU" when it cannot be read)."""
    try:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return "GPU"


def synchronize(device: str = "cuda") -> None:
    """Wait for the current CUDA device (no-op for ``"cpu"``)."""
    if device == "cuda" and cupy is not None:
        cupy.cuda.Device().synchronize()

