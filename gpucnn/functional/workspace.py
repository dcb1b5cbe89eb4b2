"""Buffers an op reuses from one call to the next, so a training step allocates nothing new.

A layer owns one :class:`Workspace` and hands it to its functional op, which
asks for its column matrices, padded copies and outputs by *role* and shape.
The same role and shape returns the same array every step; a new shape (the
evaluation batch, the last partial batch of an epoch) gets its own, and only
the ``keep`` most recently used shapes of a role are kept.

What an op returns may be such a buffer, overwritten by the op's next call:
layers hand it on inside a network, and every public boundary
(:func:`~gpucnn.functional.layout.from_internal`) copies.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import numpy as np

__all__ = ["Workspace", "pinning"]

_pins: list | None = None   # while pinning(): every buffer handed out is appended here


@contextlib.contextmanager
def pinning():
    """Collect (and so keep alive) every workspace buffer handed out inside the block.

    A captured CUDA graph keeps pointing at the buffers it was captured with;
    holding them here keeps their memory from being reused when a workspace
    drops them.
    """
    global _pins
    outer, _pins = _pins, []
    try:
        yield _pins
    finally:
        _pins = outer


class Workspace:
    """Role- and shape-keyed buffers, the ``keep`` most recent shapes per role."""

    __slots__ = ("_buffers", "keep")

    def __init__(self, keep: int = 3):
        self._buffers: dict[str, OrderedDict] = {}
        self.keep = int(keep)

    def get(self, role: str, shape, dtype, xp=np, *, fill=None):
        """The buffer for ``role`` of ``shape``/``dtype`` on ``xp``'s device.

        ``fill`` (a number) initialises a *new* buffer with that value; an
        existing buffer keeps whatever it holds (callers rely on that for
        zero borders and a constant ones row).
        """
        key = (tuple(int(s) for s in shape), np.dtype(dtype), xp.__name__)
        per_role = self._buffers.setdefault(role, OrderedDict())
        buf = per_role.get(key)
        if buf is None:
            buf = xp.empty(key[0], dtype=key[1]) if fill is None else xp.full(key[0], fill, dtype=key[1])
            per_role[key] = buf
            while len(per_role) > self.keep:
                per_role.popitem(last=False)
        else:
            per_role.move_to_end(key)
        if _pins is not None:
            _pins.append(buf)
        return buf

    def clear(self) -> None:
        self._buffers.clear()

    def nbytes(self) -> int:
        return int(sum(b.nbytes for per_role in self._buffers.values() for b in per_role.values()))


def get(ws, role, shape, dtype, xp=np, *, fill=None):
    """``ws.get(...)``, or a fresh array when there is no workspace."""
    if ws is None:
        return xp.empty(shape, dtype=dtype) if fill is None else xp.full(shape, fill, dtype=dtype)
    return ws.get(role, shape, dtype, xp, fill=fill)
