"""Anonymous shared memory for NumPy arrays that forked workers read and write (Linux only).

:func:`gpucnn.layers.flat.flatten` keeps a CPU optimizer's flat parameter
buffer here from the start, so the micro-batch workers of
:mod:`gpucnn.train.forked` see every update the parent makes and no array
handed out before the first step is ever replaced.
"""
from __future__ import annotations

import mmap
import multiprocessing
import os
import sys

import numpy as np

__all__ = ["available", "empty", "is_shared"]


def available() -> bool:
    """Whether worker processes can be forked here: Linux (macOS frameworks are not fork-safe)."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork")
            and "fork" in multiprocessing.get_all_start_methods())


def empty(shape, dtype) -> np.ndarray:
    """A zeroed array in anonymous shared memory (inherited, shared, by forked children)."""
    size = int(np.prod(shape, dtype=np.int64))
    buf = mmap.mmap(-1, max(1, size * np.dtype(dtype).itemsize))
    return np.frombuffer(buf, dtype=dtype, count=size).reshape(shape)


def is_shared(a) -> bool:
    """Whether ``a`` is (a view of) an :func:`empty` array."""
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)
