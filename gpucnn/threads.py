"""The NumPy path's threads and worker processes: how many, and what forked workers share.

Intra-op parallelism: fixed work blocks spread over a few threads.

The NumPy convolutions cut their work into blocks that depend on the shapes
only (column chunks of the im2col matrix, groups of channels), so the result
is the same bits whatever the number of threads: the weight gradient's
partial sums are added in block order.  NumPy's ufuncs and BLAS release the
GIL, so two threads on two cores really run two blocks at once.  BLAS itself
is pinned to one thread per call (``threadpoolctl``), for the whole process,
from the first NumPy-path convolution or dense layer on, whatever the thread
count: a multi-threaded OpenBLAS GEMM splits its reduction differently with
another thread count (a 64x577 @ 577xN product changes its last bits), so it
would make the numbers depend on the threads; and BLAS's threads and ours
would fight over the same cores.  :func:`release_blas` gives BLAS its threads
back (for other code in the process).

A whole train step can use the threads a level up instead:
:mod:`gpucnn.train.workers` runs a batch's micro-batches (whole passes of
a model replica) on these threads, or in forked worker processes, and an op
called inside one runs its blocks in that thread (a block never waits on the
pool it runs in).  Fork handling lives here, in one place:
:func:`can_fork`, :func:`shared_empty` (anonymous shared memory that forked
workers read and write; a CPU optimizer keeps its flat parameters there) and
:func:`after_fork_in_worker`.

The number of threads: :func:`set_num_threads` (``gpucnn train --threads
N``), else the ``GPUCNN_NUM_THREADS`` environment variable, else the number
of CPU cores this process may use (capped at 8).  ``1`` runs every block in
the calling thread, with BLAS threads as NumPy set them.  A number above the
cores this process may use (:func:`usable_cores`) is capped to them with a
:class:`ThreadCountWarning` (the CLI prints it as one note): the blocks are
pure computation, so threads beyond the cores only queue and switch (1000
threads on 2 cores trained 20 times slower), while the results are the same
bits for any count, so the cap changes nothing but the speed -- and a script
written for a bigger machine still runs.
"""
from __future__ import annotations

import contextlib
import itertools
import mmap
import multiprocessing
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["get_num_threads", "set_num_threads", "set_threads_option", "usable_cores", "cap_to_cores", "ThreadCountWarning",
           "run_each", "map_each", "split", "pin_blas", "release_blas", "inline", "DEFAULT_MAX_THREADS",
           "can_fork", "shared_empty", "is_shared", "after_fork_in_worker"]

ENV_VAR = "GPUCNN_NUM_THREADS"
DEFAULT_MAX_THREADS = 8

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_num_threads: int | None = None
_blas = None            # threadpoolctl's BLAS libraries, looked up once


class ThreadCountWarning(UserWarning):
    """A thread count above the usable cores was capped to them."""


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; the CPU count where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def cap_to_cores(n: int, what: str = "num_threads") -> tuple[int, str | None]:
    """``(min(n, usable_cores()), note)``; the note (``None`` when ``n`` fits) names ``what``, ``n`` and the cores."""
    cores = usable_cores()
    if n <= cores:
        return n, None
    return cores, (f"{what} {n} is more than the {cores} CPU core(s) this process may use; using {cores} "
                   f"thread(s) (more only slows the NumPy path down; results are the same for any count)")


def set_threads_option(n: int, prog: str, say: bool = True) -> int:
    """A command's ``--threads n``: capped at the usable cores, with a one-line note on stderr
    (``"<prog>: note: ..."``, when ``say``), then set; returns the count used."""
    import sys

    n, note = cap_to_cores(n, "--threads")
    if note is not None and say:
        print(f"{prog}: note: {note}", file=sys.stderr, flush=True)
    set_num_threads(n)
    return n


def _capped(n: int, what: str) -> int:
    """``n`` capped at the usable cores, with a :class:`ThreadCountWarning` when it was above them."""
    n, note = cap_to_cores(n, what)
    if note is not None:
        warnings.warn(note, ThreadCountWarning, stacklevel=3)
    return n


def _parse(value, where: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")
    return n


def get_num_threads() -> int:
    """The threads the NumPy convolutions use (see the module docstring for the default)."""
    global _num_threads
    if _num_threads is None:
        env = os.environ.get(ENV_VAR, "").strip()
        _num_threads = _capped(_parse(env, ENV_VAR), ENV_VAR) if env else min(usable_cores(), DEFAULT_MAX_THREADS)
    return _num_threads


def set_num_threads(n: int) -> int:
    """Use ``n`` threads from now on, at most :func:`usable_cores` (above: capped, with a
    :class:`ThreadCountWarning`); returns the previous number.

    Raises:
        ValueError: ``n`` is not a positive integer.
    """
    global _num_threads, _pool
    n = _capped(_parse(n, "num_threads"), "num_threads")
    with _lock:
        previous = get_num_threads()
        if n != previous and _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        _num_threads = n
    return previous


def pin_blas() -> None:
    """Pin BLAS to one thread per call from now on (cheap when already pinned)."""
    if not _blas_restore and not _blas_pinned_none:
        with _lock:
            _pin_blas(True)


def release_blas() -> None:
    """Give BLAS back the threads it had before :func:`pin_blas` (the next NumPy-path op pins again)."""
    with _lock:
        _pin_blas(False)


def split(n: int, parts: int = 8) -> list[tuple[int, int]]:
    """``[start, stop)`` blocks covering ``range(n)``: at most ``parts``, fixed by ``n`` alone."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


_blas_restore: list = []   # (library controller, its thread count) while BLAS is pinned
_blas_pinned_none = False  # no BLAS library found to pin (nothing to do, every time)


def _pin_blas(pin: bool) -> None:
    """Pin BLAS to one thread (``pin``), or give it back the threads it had."""
    global _blas, _blas_pinned_none
    if pin and not _blas_restore:
        if _blas is None:
            try:
                from threadpoolctl import ThreadpoolController

                _blas = ThreadpoolController().select(user_api="blas").lib_controllers
            except Exception:  # pragma: no cover - threadpoolctl missing: BLAS keeps its threads
                _blas = []
            _blas_pinned_none = not _blas
        for lib in _blas:
            _blas_restore.append((lib, lib.num_threads))
            lib.set_num_threads(1)
    elif not pin:
        while _blas_restore:
            lib, n = _blas_restore.pop()
            lib.set_num_threads(n)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, get_num_threads() - 1), thread_name_prefix="gpucnn")
        return _pool


_inside = threading.local()   # .block: this thread is running blocks of a map_each


@contextlib.contextmanager
def inline():
    """Inside the block every :func:`map_each` runs in the calling thread (a caller that already
    has the cores busy, e.g. beside forked micro-batch workers)."""
    outer = getattr(_inside, "block", False)
    _inside.block = True
    try:
        yield
    finally:
        _inside.block = outer


def _take_blocks(fn, blocks, claim, out):
    """Run blocks ``next(claim)`` until none is left, into ``out`` (nested calls run inline)."""
    with inline():
        for i in claim:                  # itertools.count: each index handed out once, under the GIL
            if i >= len(blocks):
                return
            out[i] = fn(*blocks[i])


def map_each(fn, blocks):
    """``[fn(*block) for block in blocks]``, the blocks spread over the threads, results in block order.

    The calling thread and ``T - 1`` pool threads each take the next block not yet taken until
    none is left (one hand-off per pool thread, not per block; unequal blocks still balance).
    Which thread ran a block changes no result.  Inside a block (a nested call) everything runs
    in the calling thread: a block never waits on the pool it runs in.
    """
    blocks = list(blocks)
    pin_blas()
    n = min(get_num_threads(), len(blocks))
    out = [None] * len(blocks)
    claim = itertools.count()
    if n <= 1 or getattr(_inside, "block", False):
        _take_blocks(fn, blocks, claim, out)
        return out
    pool = _executor()
    futures = [pool.submit(_take_blocks, fn, blocks, claim, out) for _ in range(1, n)]
    try:
        _take_blocks(fn, blocks, claim, out)
    finally:
        errors = [f.exception() for f in futures]     # wait for every helper, even when a block raised
    for exc in errors:
        if exc is not None:
            raise exc
    return out


def _reset_after_fork() -> None:
    """In any forked child: no pool (its threads were not copied) and a fresh lock."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


def after_fork_in_worker() -> None:
    """In a forked micro-batch worker (:mod:`gpucnn.train.workers`): no pool, a fresh lock, and one
    thread (the cores are the workers')."""
    global _num_threads
    _reset_after_fork()
    _num_threads = 1


# -- worker processes: where they can be forked, and the memory they share ---------------------


def can_fork() -> bool:
    """Whether worker processes can be forked here: Linux (macOS frameworks are not fork-safe)."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork")
            and "fork" in multiprocessing.get_all_start_methods())


def shared_empty(shape, dtype) -> np.ndarray:
    """A zeroed array in anonymous shared memory (inherited, shared, by forked children)."""
    size = int(np.prod(shape, dtype=np.int64))
    buf = mmap.mmap(-1, max(1, size * np.dtype(dtype).itemsize))
    return np.frombuffer(buf, dtype=dtype, count=size).reshape(shape)


def is_shared(a) -> bool:
    """Whether ``a`` is (a view of) a :func:`shared_empty` array."""
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def run_each(fn, blocks) -> None:
    """Run ``fn(*block)`` for every block (blocks must write disjoint outputs)."""
    map_each(fn, blocks)
