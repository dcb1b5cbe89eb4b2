"""Elementwise activation backward on the device (kernels/elementwise.cu), and the
argument-checking helpers that the other batch-last kernel wrappers
(:mod:`gpucnn.cuda.pool`, :mod:`~gpucnn.cuda.dense`, :mod:`~gpucnn.cuda.loss`,
:mod:`~gpucnn.cuda.optim`, :mod:`~gpucnn.cuda.batch`) share.

Conventions of every wrapper in these modules:

* float32 arrays run the plain kernels, float64 the ``*_f64`` twins; any other
  dtype, or mixed dtypes, raise :class:`TypeError` naming the array, its dtype
  and the dtypes the kernels implement (no silent casts);
* inputs must be C-contiguous (:class:`ValueError` otherwise: nothing is copied);
  shapes that do not fit raise :class:`ValueError` naming them;
* outputs are allocated with the arrays' own module (``xp.empty``: CuPy on a
  GPU, NumPy under the test emulator) unless given as ``*_out=`` arguments
  (exact shape and dtype, C-contiguous, same device), so a train step can reuse
  its buffers;
* the only device work is :func:`gpucnn.cuda.loader.launch` calls (no NumPy /
  CuPy compute, no copies), so every GPU operation of a step can be counted;
* nothing is stateful (the loader caches compiled modules and launch shapes).
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from . import loader

__all__ = ["SUPPORTED_DTYPES", "ACTIVATIONS", "act_code", "act_backward"]

#: Dtypes the kernels implement (float32: plain entry points, float64: ``_f64``).
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_SUFFIX = {np.dtype(np.float32): "", np.dtype(np.float64): "_f64"}

#: Activation names and the ``int act`` code the kernels take.
ACTIVATIONS = {None: 0, "relu": 1, "sigmoid": 2, "tanh": 3}

#: Integer dtypes read as int32 words (int64: two little-endian words each).
WORD_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


# ---------------------------------------------------------------------------
# Shared helpers (used by the sibling modules)
# ---------------------------------------------------------------------------

def act_code(func: str, act) -> int:
    """The kernel code of ``act`` (None, "relu", "sigmoid", "tanh")."""
    try:
        return ACTIVATIONS[act]
    except (KeyError, TypeError):
        raise ValueError(f"{func}: act must be one of None, 'relu', 'sigmoid', 'tanh', got {act!r}") from None


def _dtype(func: str, **arrays) -> np.dtype:
    """The one float dtype of ``arrays`` (None values skipped)."""
    dtypes = {getattr(a, "dtype", None) for a in arrays.values() if a is not None}
    if len(dtypes) == 1:                      # the common case: one supported dtype
        dt = dtypes.pop()
        if dt in SUPPORTED_DTYPES:
            return dt
    found = {}
    for name, a in arrays.items():
        if a is None:
            continue
        dt = getattr(a, "dtype", None)
        if dt is None:
            raise TypeError(f"{func}: {name} must be a numpy/cupy array, got {type(a).__name__}")
        if dt not in SUPPORTED_DTYPES:
            supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
            raise TypeError(f"{func}: {name} has dtype {dt}, but the CUDA kernels implement only "
                            f"{supported}; convert explicitly (e.g. {name}.astype('float32'))")
        found[name] = np.dtype(dt)
    if len(set(found.values())) > 1:
        supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        desc = ", ".join(f"{n} is {d}" for n, d in found.items())
        raise TypeError(f"{func}: arrays must share one dtype ({supported}), but {desc}")
    return next(iter(found.values()))


def _kernel(base: str, dtype) -> str:
    return base + _SUFFIX[np.dtype(dtype)]


def _xp(**arrays):
    """The array module of ``arrays`` (all on one device; None values skipped)."""
    return get_array_module(**arrays)


def _contiguous(func: str, **arrays) -> None:
    for name, a in arrays.items():
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"{func}: {name} must be C-contiguous (shape {tuple(a.shape)}, strides "
                             f"{tuple(a.strides)}); the wrappers never copy: pass xp.ascontiguousarray({name})")


def _ndim(func: str, name: str, a, ndim: int, layout: str) -> None:
    if a.ndim != ndim:
        raise ValueError(f"{func}: {name} must be {ndim}-D {layout}, got shape {tuple(a.shape)}")


def _positive(func: str, name: str, shape) -> None:
    if min(shape, default=1) < 1:
        raise ValueError(f"{func}: {name} must have every size >= 1, got shape {tuple(shape)}")


def _same_shape(func: str, name: str, a, shape, why: str = "") -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{func}: {name} has shape {tuple(a.shape)}, expected {tuple(shape)}"
                         + (f" ({why})" if why else ""))


def _out(func: str, name: str, out, xp, shape, dtype):
    """``out`` checked (shape, dtype, contiguity, writable), or a new ``xp.empty``."""
    shape = tuple(int(s) for s in shape)
    if out is None:
        return xp.empty(shape, dtype=dtype)
    if getattr(out, "dtype", None) != np.dtype(dtype):
        raise TypeError(f"{func}: {name} must have dtype {np.dtype(dtype)}, got "
                        f"{getattr(out, 'dtype', type(out).__name__)}")
    _same_shape(func, name, out, shape)
    _contiguous(func, **{name: out})
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError(f"{func}: {name} is read-only")
    return out


def _words(func: str, name: str, a):
    """``(int32 word view, words per value)`` of an int32/int64 array (a view: no copy)."""
    if getattr(a, "dtype", None) not in WORD_DTYPES:
        raise TypeError(f"{func}: {name} has dtype {getattr(a, 'dtype', type(a).__name__)}, but the kernels read "
                        f"only int32 or int64 {name}; convert explicitly ({name}.astype('int64'))")
    _contiguous(func, **{name: a})
    if a.dtype == np.int32:
        return a, 1
    return a.reshape(-1).view(np.int32), 2


# ---------------------------------------------------------------------------
# act_backward
# ---------------------------------------------------------------------------

def act_backward(dy, saved, act, *, out=None):
    """``dz = dy * act'(saved)`` elementwise, any shape (kernels/elementwise.cu).

    Args:
        dy: the gradient of the activation's output; float32 or float64, C-contiguous.
        saved: same shape and dtype: the pre-activation ``z`` for ``act="relu"``
            (relu' = 1 / 0.5 at exactly 0 / 0; NaN stays NaN), the output ``y``
            for ``"sigmoid"`` (y (1-y)) and ``"tanh"`` (1 - y^2); ignored (may be
            None) for ``act=None`` (dz = dy, a copy).
        act: None, "relu", "sigmoid" or "tanh".
        out: optional output, same shape and dtype (may be ``dy`` itself: in place).
    Returns:
        dz, the shape and dtype of dy.
    Launches: 1, ``act_backward[_f64]``, one thread per element:
        grid (ceil(dy.size / 256), 1, 1), block (256, 1, 1).
    """
    func = "act_backward"
    code = act_code(func, act)
    if code and saved is None:
        raise ValueError(f"{func}: act={act!r} needs saved (z for relu, y for sigmoid/tanh)")
    saved_arr = saved if code else None
    xp = _xp(dy=dy, saved=saved_arr, out=out)
    dtype = _dtype(func, dy=dy, saved=saved_arr)
    _contiguous(func, dy=dy, saved=saved_arr)
    if saved_arr is not None:
        _same_shape(func, "saved", saved_arr, dy.shape, "the shape of dy")
    dz = _out(func, "out", out, xp, dy.shape, dtype)
    if saved_arr is not None and dz is saved_arr:
        raise ValueError(f"{func}: out may alias dy but not saved")
    loader.launch(_kernel(func, dtype), (dy, saved_arr if saved_arr is not None else dy, dz, dy.size, code),
                  n_threads=dy.size)
    return dz
