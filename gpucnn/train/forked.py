"""Micro-batches in forked worker processes: the passes of :mod:`~gpucnn.train.microbatch`, free of the GIL.

Threads share one interpreter lock: two threads running micro-batch passes
hand it back and forth at every NumPy call, and on the 2-vCPU box of
BENCHMARKS.md a lenet5 step at batch 256 ran only about 1.2x faster on two
threads than on one, where two processes each running half the batch scale
close to 2x.  So on a system with ``fork`` the micro-batches of a step run in
``T - 1`` worker processes plus the calling one:

* the optimizer's flat parameter buffers are moved into shared memory once
  (:func:`share_groups`: the layers' parameter views are rebound to it, so an
  optimizer step or ``load_state_dict`` in the parent is what every worker
  reads);
* each step the parent copies the batch into a shared input buffer and sends
  ``(n, scale, training)`` down a pipe to every worker; process ``t`` runs
  micro-batches ``t, t + T, ...`` on a replica of its own and writes their
  gradients into shared per-micro-batch buffers and their loss and count into
  a shared table; the parent sums the gradients in micro-batch order.

The passes and the sum are those of the threaded runner, so the bits are the
same as with threads and for any worker count.  A worker that fails sends its
traceback back and the step raises it; workers exit on a stop message (the
runner is closed or collected, or the process exits) or when their parent
is gone.
"""
from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import traceback
import warnings
import weakref

import numpy as np

from ..functional import threads

__all__ = ["available", "share_groups", "ForkedRunner"]


def available() -> bool:
    """Whether worker processes can be forked here (Linux, macOS)."""
    return hasattr(os, "fork") and "fork" in multiprocessing.get_all_start_methods()


def _shared(shape, dtype):
    """A zeroed array in anonymous shared memory (inherited by forked children)."""
    size = int(np.prod(shape, dtype=np.int64))
    buf = mmap.mmap(-1, max(1, size * np.dtype(dtype).itemsize))
    return np.frombuffer(buf, dtype=dtype, count=size).reshape(shape)


def _is_shared(a) -> bool:
    """Whether ``a`` is a view of a :func:`_shared` buffer."""
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)


def share_groups(groups) -> None:
    """Move every flat group's parameters into shared memory, rebinding the layers' views."""
    for g in groups:
        if _is_shared(g.params):
            continue
        shared = _shared(g.params.shape, g.params.dtype)
        shared[...] = g.params
        views = []
        for (_, layer, key, off, shape), (_, grad_view) in zip(g.entries, g._views):
            view = shared[off:off + int(np.prod(shape, dtype=np.int64))].reshape(shape)
            layer.params[key] = view
            views.append((view, grad_view))
        g.params, g._views = shared, views


def _stop(conns, procs):
    for conn in conns:
        try:
            conn.send(None)          # the stop message (a sibling may hold a copy of this pipe: no EOF)
            conn.close()
        except OSError:  # pragma: no cover - the worker is gone already
            pass
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():  # pragma: no cover - a worker stuck in a pass
            p.terminate()


class ForkedRunner:
    """``workers`` forked processes running micro-batches for one :class:`~gpucnn.train.microbatch.MicroBatches`.

    Made for one input shape (``x`` batch-last without the batch, dtype) and up to
    ``max_n`` samples a step; the runner makes a new one when either changes.
    """

    def __init__(self, micro, workers: int, x, y, max_n: int):
        from .microbatch import _Replica, micro_bounds

        self.micro, self.T = micro, workers + 1
        self.key = (tuple(x.shape[:-1]), x.dtype, y.dtype, max_n)
        self.x = _shared(tuple(x.shape[:-1]) + (max_n,), x.dtype)
        self.y = _shared((max_n,), y.dtype)
        parts = len(micro_bounds(max_n))          # no fewer pieces than any smaller batch has
        self.flats = [[_shared(g.grads.shape, g.grads.dtype) for g in micro.groups] for _ in range(parts)]
        self.table = _shared((parts, 2), np.float64)       # per micro-batch: loss, correct
        self.local = _Replica(micro.model, micro.loss)
        self._seq = 0                                       # the step number the replies must carry
        ctx = multiprocessing.get_context("fork")
        self.conns, self.procs = [], []
        with warnings.catch_warnings():  # Python 3.12+ warns about forking a process that has threads
            warnings.simplefilter("ignore", DeprecationWarning)
            for t in range(1, self.T):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=self._serve, args=(t, child, parent), daemon=True,
                                name=f"gpucnn-micro-{t}")
                p.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(p)
        self._finalizer = weakref.finalize(self, _stop, self.conns, self.procs)

    # -- both sides -------------------------------------------------------
    def _views(self, m):
        return [(name, view) for g, flat in zip(self.micro.groups, self.flats[m])
                for name, view in g.views(flat).items()]

    def _run_share(self, rep, t, n, scale, training):
        from .microbatch import forward_backward, micro_bounds

        if rep.model.training != training:
            rep.model.train(training)
        bounds = micro_bounds(n)
        for m in range(t, len(bounds), self.T):
            a, b = bounds[m]
            xm = rep.input.get("x", self.x.shape[:-1] + (b - a,), self.x.dtype)
            np.copyto(xm, self.x[..., a:b])
            rep.bind(self._views(m))
            value, correct = forward_backward(rep.model, rep.loss, xm, self.y[a:b], scale * (b - a) / n)
            self.table[m] = (float(value), int(correct))

    # -- the worker ---------------------------------------------------------
    def _serve(self, t, conn, parent_end):
        from .microbatch import _Replica

        parent_end.close()
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle (it stops us)
        threads._after_fork_in_child()
        parent = os.getppid()
        rep = _Replica(self.micro.model, self.micro.loss)
        while True:
            try:
                while not conn.poll(1.0):
                    if os.getppid() != parent:   # the parent died without a word: so do we
                        return
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg is None:
                return
            seq, args = msg
            try:
                self._run_share(rep, t, *args)
                conn.send((seq, None))
            except BaseException:
                conn.send((seq, traceback.format_exc()))

    # -- the parent ---------------------------------------------------------
    def run(self, x, y, scale):
        from .microbatch import micro_bounds

        n = int(x.shape[-1])
        np.copyto(self.x[..., :n], x)
        self.y[:n] = y
        training = bool(self.micro.model.training)
        self._seq += 1
        for conn in self.conns:
            conn.send((self._seq, (n, scale, training)))
        failure = None
        try:
            self._run_share(self.local, 0, n, scale, training)
        except BaseException as exc:
            failure = exc
        errors = [self._reply(conn) for conn in self.conns]     # every worker has finished writing
        if failure is not None:
            raise failure
        for t, err in enumerate(errors, start=1):
            if err is not None:
                raise RuntimeError(f"micro-batch worker {t} of {self.T - 1} failed:\n{err}")
        bounds = micro_bounds(n)
        for gi, group in enumerate(self.micro.groups):
            np.add(self.flats[0][gi], self.flats[1][gi], out=group.grads)
            for m in range(2, len(bounds)):
                group.grads += self.flats[m][gi]
        sums = self.table[:len(bounds)]
        total = sum(float(v) * (b - a) for v, (a, b) in zip(sums[:, 0], bounds)) / n
        return np.asarray(total, dtype=x.dtype), np.asarray(int(sums[:, 1].sum()))

    def _reply(self, conn):
        """This step's reply of one worker: None or its traceback.  A reply to an earlier step (one the
        parent stopped waiting for, e.g. on Ctrl-C) is read and dropped, never taken for this one."""
        while True:
            seq, err = conn.recv()
            if seq == self._seq:
                return err

    def close(self):
        self._finalizer()
