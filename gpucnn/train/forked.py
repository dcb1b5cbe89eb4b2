"""Micro-batches in forked worker processes: the passes of :mod:`~gpucnn.train.microbatch`, free of the GIL.

Threads share one interpreter lock: two threads running micro-batch passes
hand it back and forth at every NumPy call, and on the 2-vCPU box of
BENCHMARKS.md a lenet5 step at batch 256 ran only about 1.2x faster on two
threads than on one, where two processes each running half the batch scale
close to 2x.  So on Linux the micro-batches of a step run in
``T - 1`` worker processes plus the calling one:

* a CPU optimizer's flat parameter buffer lives in shared memory from its
  creation (:func:`gpucnn.layers.flat.flatten`), so an optimizer step or a
  ``load_state_dict`` in the parent is what every worker reads (a new
  optimizer makes the trainer fork new workers);
* each step the parent copies the batch into a shared input buffer and sends
  ``(n, scale, training)`` down a pipe to every worker; process ``t`` runs
  micro-batches ``t, t + T, ...`` on a replica of its own and writes their
  gradients into shared per-micro-batch buffers and their loss and count into
  a shared table; the parent sums the gradients in micro-batch order.

The passes and the sum are those of the threaded runner, so the bits are the
same as with threads and for any worker count.  The pipes carry bytes, not
pickles.  A worker that fails sends its error back and the step raises the
same built-in exception class (else RuntimeError) with the worker's
traceback in the message; a worker that dies mid-step (the out-of-memory
killer's SIGKILL, a crash in native code) closes the runner and raises
:class:`WorkerDied`, and :class:`~gpucnn.train.microbatch.MicroBatches` runs
the step again on new workers.  Workers exit on a stop message (the runner is
closed or collected, or the process exits) or, quietly, when their parent is
gone, and ignore Ctrl-C (the parent's to handle).
"""
from __future__ import annotations

import builtins
import multiprocessing
import os
import signal
import struct
import traceback
import warnings
import weakref

import numpy as np

from .. import _shm
from ..functional import threads

__all__ = ["available", "usable_groups", "ForkedRunner", "WorkerDied"]

available = _shm.available
_shared = _shm.empty
_is_shared = _shm.is_shared

# The pipes carry bytes, not pickles: a command is (step, n, scale, training), a reply is the step
# and an error (empty when the share ran): the exception's class name, then its message and the
# worker's traceback.
_COMMAND = struct.Struct("<qqd?")
_STEP = struct.Struct("<q")
_STOP = b"stop"


class WorkerDied(RuntimeError):
    """A micro-batch worker process ended in the middle of a step (killed, or crashed in native code)."""


def usable_groups(groups) -> bool:
    """Whether the optimizer's parameters are in shared memory (so forked workers see its updates)."""
    return all(_is_shared(g.params) for g in groups)


def _stop(conns, procs):
    for conn in conns:
        try:
            conn.send_bytes(_STOP)   # the stop message (a sibling may hold a copy of this pipe: no EOF)
            conn.close()
        except OSError:  # pragma: no cover - the worker is gone already
            pass
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():  # pragma: no cover - a worker stuck in a pass
            p.terminate()
            p.join(timeout=5)


class ForkedRunner:
    """``workers`` forked processes running micro-batches for one :class:`~gpucnn.train.microbatch.MicroBatches`.

    Made for one input shape (``x`` batch-last without the batch, dtype) and up to
    ``max_n`` samples a step; the runner makes a new one when either changes.
    """

    def __init__(self, micro, workers: int, x, y, max_n: int):
        self.micro, self.T = micro, workers + 1
        self.key = (tuple(x.shape[:-1]), x.dtype, y.dtype, max_n)
        self.x = _shared(tuple(x.shape[:-1]) + (max_n,), x.dtype)
        self.y = _shared((max_n,), y.dtype)
        parts = len(micro.bounds(max_n))          # no fewer pieces than any smaller batch has
        self.flats, self.views = micro.gradient_buffers(parts, new=lambda g: _shared(g.shape, g.dtype))
        self.table = _shared((parts, 2), np.float64)       # per micro-batch: loss, correct
        self.local = micro.replica()
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

    def _run_share(self, rep, t, n, scale, training):
        rep.run_share(t, self.T, self.x, self.y, n, scale, training, self.views, self.table)

    # -- the worker ---------------------------------------------------------
    def _serve(self, t, conn, parent_end):
        parent_end.close()
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle (it stops us)
        # SIGTERM ends a worker as the kernel's default does: the parent's "stop like Ctrl-C" handler,
        # inherited at the fork, would raise in the worker (a traceback when the whole process group
        # is signalled; an error reply, not a dead worker to replace, when the OOM daemon signals it)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        threads._after_fork_in_child()
        parent = os.getppid()
        rep = self.micro.replica()
        while True:
            try:
                while not conn.poll(1.0):
                    if os.getppid() != parent:   # the parent died without a word: so do we
                        return
                msg = conn.recv_bytes()
            except (EOFError, OSError):
                return
            if msg == _STOP:
                return
            seq, n, scale, training = _COMMAND.unpack(msg)
            try:
                self._run_share(rep, t, n, scale, training)
                reply = _STEP.pack(seq)
            except BaseException as exc:
                text = f"{type(exc).__name__}\x1f{exc}\x1f{traceback.format_exc()}"
                reply = _STEP.pack(seq) + text.encode("utf-8", "replace")
            try:
                conn.send_bytes(reply)
            except OSError:   # the parent is gone (killed, or stopped by a signal) mid-step: so are we
                return

    # -- the parent ---------------------------------------------------------
    def run(self, x, y, scale):
        n = int(x.shape[-1])
        np.copyto(self.x[..., :n], x)
        self.y[:n] = y
        training = bool(self.micro.model.training)
        self._seq += 1
        command = _COMMAND.pack(self._seq, n, float(scale), training)
        for t, conn in enumerate(self.conns, start=1):
            self._io(t, conn.send_bytes, command)
        failure = None
        try:
            self._run_share(self.local, 0, n, scale, training)
        except BaseException as exc:
            failure = exc
        errors = [self._reply(t, conn) for t, conn in enumerate(self.conns, start=1)]  # all done writing
        if failure is not None:
            raise failure
        for t, err in enumerate(errors, start=1):
            if err:
                raise _worker_error(t, self.T - 1, err)
        return self.micro.reduce(self.flats, self.table, n, x.dtype)

    def _io(self, t, fn, *args):
        """A pipe operation with worker ``t``; a worker gone mid-step closes the runner and raises."""
        try:
            return fn(*args)
        except (EOFError, OSError):
            self.close()
            p = self.procs[t - 1]
            raise WorkerDied(f"micro-batch worker {t} of {self.T - 1} (pid {p.pid}) ended in the middle of a "
                             f"step ({_how_it_ended(p.exitcode)})") from None

    def _reply(self, t, conn):
        """This step's reply of worker ``t``: empty, or its error.  A reply to an earlier step (one the
        parent stopped waiting for, e.g. on Ctrl-C) is read and dropped, never taken for this one."""
        while True:
            msg = self._io(t, conn.recv_bytes)
            (seq,) = _STEP.unpack_from(msg)
            if seq == self._seq:
                return msg[_STEP.size:].decode("utf-8", "replace")

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self):
        self._finalizer()


def _how_it_ended(exitcode) -> str:
    """A worker's end in words, from its ``Process.exitcode``."""
    if exitcode is None:
        return "still running, its pipe closed"
    if exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    return f"killed by {name}" + (", as the out-of-memory killer does" if -exitcode == signal.SIGKILL else "")


def _worker_error(t, workers, text):
    """The exception a worker's failure raises in the parent: the same built-in class when it is one
    (a bad label is a ValueError whichever process met it), else RuntimeError; the message says where
    and carries the worker's traceback."""
    name, _, rest = text.partition("\x1f")
    message, _, tb = rest.partition("\x1f")
    cls = getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
        message = f"{name}: {message}"
    return cls(f"{message}\n(raised in micro-batch worker {t} of {workers}; its traceback:)\n{tb}")
