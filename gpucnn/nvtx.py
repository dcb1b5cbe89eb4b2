"""NVTX ranges for Nsight Systems / Nsight Compute, off unless enabled.

``nvtx_range(name)`` works as a context manager and as a decorator.  Ranges
are emitted only when enabled — ``GPUCNN_NVTX=1`` in the environment,
``gpucnn train --nvtx`` or :func:`enable` — and only when the ``nvtx``
package or CuPy's ``cupy.cuda.nvtx`` is importable; otherwise every range is
a no-op costing one flag check.

Names are stable: ``Conv2D.forward``, ``Conv2D.backward``,
``SoftmaxCrossEntropy.forward``, ``SGD.step``, ``train_step``.
"""
from __future__ import annotations

import contextlib
import functools
import os

_enabled = os.environ.get("GPUCNN_NVTX", "").strip().lower() in ("1", "true", "yes", "on")
_push = _pop = None


def _bind():
    """Find an NVTX implementation; returns True when one is available."""
    global _push, _pop
    if _push is not None:
        return True
    try:
        import nvtx as _nvtx  # the `nvtx` PyPI package

        # Default domain on purpose: Nsight Compute's ``--nvtx-include
        # "Conv2D.forward/"`` then matches whichever implementation emitted it.
        _push = lambda name: _nvtx.push_range(name)  # noqa: E731
        _pop = _nvtx.pop_range
        return True
    except Exception:
        pass
    try:
        from cupy.cuda import nvtx as _cnvtx

        _push, _pop = _cnvtx.RangePush, _cnvtx.RangePop
        return True
    except Exception:
        return False


def enable(on: bool = True) -> bool:
    """Turn NVTX ranges on or off; returns whether ranges will really be emitted."""
    global _enabled
    _enabled = bool(on)
    return is_active()


def is_enabled() -> bool:
    """True when ranges are switched on (whether or not an implementation is importable)."""
    return _enabled


@contextlib.contextmanager
def enabled(on: bool = True):
    """Turn ranges on (or off) inside the block; yields whether they are really emitted."""
    global _enabled
    before = _enabled
    _enabled = bool(on)
    try:
        yield is_active()
    finally:
        _enabled = before


def is_active() -> bool:
    """True when ranges are enabled *and* an NVTX implementation is importable."""
    return _enabled and _bind()


class nvtx_range(contextlib.ContextDecorator):
    """Context manager / decorator emitting one NVTX range named ``name``."""

    __slots__ = ("name", "_pushed")

    def __init__(self, name: str):
        self.name = name
        self._pushed = False

    def __enter__(self):
        if _enabled and _bind():
            _push(self.name)
            self._pushed = True
        return self

    def __exit__(self, *exc):
        if self._pushed:
            _pop()
            self._pushed = False
        return False


def ranged(name: str):
    """Decorator: wrap a function in ``nvtx_range(name)`` with no cost when off."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not _enabled:
                return fn(*args, **kwargs)
            with nvtx_range(name):
                return fn(*args, **kwargs)

        return wrapper

    return deco
