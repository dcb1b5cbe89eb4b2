"""One place for randomness: ``gpucnn.seed(n)`` seeds Python, NumPy, CuPy and gpucnn's streams.

* Initialisers draw from :func:`get_rng`, a ``numpy.random.Generator`` owned
  by gpucnn.
* Training-time randomness inside a network (Dropout's masks, RReLU's
  slopes) draws from :func:`uniform`, a *counter-based* stream: element ``i``
  of the ``k``-th draw is a fixed hash (splitmix64) of the seed and a running
  counter, computed with integer array operations of whichever ``xp`` the
  data lives on.  So the same seed gives the same masks on NumPy and on CuPy,
  a checkpoint saves the stream in two integers, and resuming continues it
  exactly.

:func:`get_state` / :func:`set_state` hold both (the checkpoint's ``rng``).
"""
from __future__ import annotations

import random as _pyrandom

import numpy as np

from . import backend
from ._utils import short_repr

__all__ = ["seed", "get_rng", "uniform", "hash_uniform", "hash_key", "get_state", "set_state", "check_state",
           "check_generator_state", "check_start", "MAX_START"]

_rng = np.random.default_rng(0)
_MASK64 = (1 << 64) - 1
_stream = {"key": 0, "counter": 0}


def _key(value: int) -> int:
    """A well-mixed 64-bit key for a seed (splitmix64 of it)."""
    z = (int(value) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def seed(value: int) -> None:
    """Seed Python's ``random``, NumPy (global and gpucnn's generator), CuPy and the counter stream."""
    global _rng
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"seed must be a non-negative int, got seed={value!r}")
    value = int(value)
    _pyrandom.seed(value)
    np.random.seed(value % 2**32)
    _rng = np.random.default_rng(value)
    _stream.update(key=_key(value), counter=0)
    if backend.cupy is not None:
        try:
            backend.cupy.random.seed(value)
        except Exception:  # no usable device: nothing to seed
            pass


_stream["key"] = _key(0)


def get_rng() -> np.random.Generator:
    """gpucnn's NumPy generator (re-created by :func:`seed`)."""
    return _rng


def uniform(shape, xp=np, dtype=np.float32, low: float = 0.0, high: float = 1.0):
    """Uniform draws in ``[low, high)`` from the counter stream, on ``xp``'s device.

    The values depend only on the seed, how many values were drawn before,
    and the shape: NumPy and CuPy give the same bits.
    """
    n = int(np.prod(shape, dtype=np.int64))
    start = _stream["counter"]
    _stream["counter"] = (start + n) & _MASK64
    return _hashed(_stream["key"], start, n, xp, dtype, low, high).reshape(shape)


#: Sample positions past this are refused (:func:`check_start`): the augmentation's counters,
#: 3 (start + n) + 2, must stay below 2**64 in NumPy's uint64 and in the kernel's (which would
#: wrap) -- far beyond any dataset.
MAX_START = 2 ** 62


def check_start(start) -> None:
    """``start`` (a sample's position in the epoch's order) is an int in [0, :data:`MAX_START`);
    else ValueError naming it."""
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start < MAX_START:
        raise ValueError(f"start must be an int in [0, 2**62), got start={start!r}")


def hash_uniform(key, shape, xp=np, dtype=np.float32, low: float = 0.0, high: float = 1.0, start: int = 0):
    """Stateless uniform draws for a tuple of non-negative ints ``key`` (e.g. (seed, epoch)):
    the same key always gives the same values, on NumPy and CuPy alike.  Element ``i`` (in C
    order) is the stream's value at counter ``start + i``, so draws of one key can be taken
    in pieces: ``hash_uniform(key, (n,), start=s)`` is ``hash_uniform(key, (s + n,))[s:]``."""
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be a non-negative int, got start={start!r}")
    return _hashed(hash_key(key), int(start), int(np.prod(shape, dtype=np.int64)), xp, dtype, low,
                   high).reshape(shape)


def hash_key(key) -> int:
    """The 64-bit key :func:`hash_uniform` draws from for the tuple of ints ``key`` (a chain of
    splitmix64 over its parts); the GPU's augmented gather reads it from device memory."""
    k = 0
    for part in key:
        k = _key((k ^ int(part)) & _MASK64)
    return k


def _hashed(key, start, n, xp, dtype, low, high):
    """splitmix64 of ``key`` and the counters ``start .. start + n - 1``, as uniforms."""
    u64 = np.uint64
    z = xp.arange(n, dtype=u64)
    z += u64(start)
    z *= u64(0x9E3779B97F4A7C15)
    z += u64(key)
    z ^= z >> u64(30)
    z *= u64(0xBF58476D1CE4E5B9)
    z ^= z >> u64(27)
    z *= u64(0x94D049BB133111EB)
    z ^= z >> u64(31)
    t = np.dtype(dtype).type
    u = (z >> u64(40)).astype(dtype)          # 24 random bits: exact in float32
    u *= t(2.0 ** -24)
    if low != 0.0 or high != 1.0:
        u *= t(high - low)
        u += t(low)
    return u


def get_state() -> dict:
    """Serializable state of gpucnn's generator and counter stream (for checkpoints)."""
    return {"numpy": _rng.bit_generator.state, "stream": dict(_stream)}


def set_state(state: dict) -> None:
    """Restore a state returned by :func:`get_state` (or a bare generator state of older checkpoints).

    Raises:
        ValueError: ``state`` is not such a state (see :func:`check_state`);
            nothing is changed then.
    """
    check_state(state)
    if "numpy" not in state:                 # format 1 checkpoints saved the generator state alone
        _rng.bit_generator.state = state
        return
    _rng.bit_generator.state = state["numpy"]
    _stream.update(key=int(state["stream"]["key"]), counter=int(state["stream"]["counter"]))


def check_state(state) -> None:
    """Raise ``ValueError`` naming the first part of ``state`` that :func:`get_state` could not have written.

    A state is ``{"numpy": <generator state>, "stream": {"key": k, "counter": c}}``
    with ``k`` and ``c`` ints in [0, 2**64), or a bare generator state (older
    checkpoints); see :func:`check_generator_state`.
    """
    if not isinstance(state, dict):
        raise ValueError(f"expected an object with 'numpy' and 'stream', got {short_repr(state)}")
    if "numpy" not in state and "bit_generator" in state:
        check_generator_state(state)
        return
    if set(state) != {"numpy", "stream"}:
        raise ValueError(f"expected exactly the keys 'numpy' and 'stream', got {sorted(state)}")
    try:
        check_generator_state(state["numpy"])
    except ValueError as exc:
        raise ValueError(f"'numpy': {exc}") from None
    stream = state["stream"]
    if not isinstance(stream, dict) or set(stream) != {"key", "counter"}:
        raise ValueError(f"'stream': expected {{'key': int, 'counter': int}}, got {short_repr(stream)}")
    for key in ("key", "counter"):
        _check_uint(f"'stream'.{key!r}", stream[key], 64)


def check_generator_state(state) -> None:
    """Raise ``ValueError`` unless ``state`` is a PCG64 state as ``bit_generator.state`` gives it."""
    want = {"bit_generator", "state", "has_uint32", "uinteger"}
    if not isinstance(state, dict) or set(state) != want:
        raise ValueError(f"expected a PCG64 generator state with keys {sorted(want)}, got {short_repr(state)}")
    if state["bit_generator"] != "PCG64":
        raise ValueError(f"'bit_generator' must be 'PCG64', got {short_repr(state['bit_generator'])}")
    inner = state["state"]
    if not isinstance(inner, dict) or set(inner) != {"state", "inc"}:
        raise ValueError(f"'state' must be {{'state': int, 'inc': int}}, got {short_repr(inner)}")
    for key in ("state", "inc"):
        _check_uint(f"'state'.{key!r}", inner[key], 128)
    _check_uint("'has_uint32'", state["has_uint32"], 1)
    _check_uint("'uinteger'", state["uinteger"], 32)


def _check_uint(what: str, value, bits: int) -> None:
    if type(value) is not int or not 0 <= value < (1 << bits):
        raise ValueError(f"{what} must be an integer in [0, 2**{bits}), got {short_repr(value)}")

