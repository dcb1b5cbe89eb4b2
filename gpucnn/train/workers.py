"""CPU workers: a NumPy train step's batch in micro-batches, each one whole pass of a model replica.

On a CPU a whole-network pass per core beats splitting each op over the
cores: the ops of a small network are too short to share, and the working
set of 64 samples stays in the caches where 256 do not (the A/B figures are
in BENCHMARKS.md).

So :class:`MicroBatches` cuts a batch of N >= :data:`MIN_SPLIT` samples into
``M = max(2, ceil(N / MICRO_BATCH))`` near-equal contiguous micro-batches,
fixed by N alone.  Worker ``t`` of T (T = gpucnn's thread count,
:mod:`gpucnn.threads`) runs micro-batches ``t, t + T, ...`` on a replica of
its own (:func:`_replicate` of the model and the loss: the same parameter
arrays, its own gradients, workspaces and forward state); each micro-batch
``m`` back-propagates ``scale * n_m / N`` times its own mean loss into
gradient buffers of its own, and the step's gradient is their sum, added in
the order ``m = 0, 1, ..., M-1`` into the optimizer's flat gradients.  That
sum is the gradient of ``scale`` times the batch-mean loss (the gradient is
linear in the samples' losses); which worker ran a micro-batch changes
nothing, so the bits depend on N and not on the thread count.  The loss is
``sum_m n_m loss_m / N`` (float64 on the host, then the input's dtype) and
the correct count the sum of the counts.  The pass itself is the trainer's
(``forward_backward``, given to the runner), so a micro-batch runs exactly
what an eager step runs.

The workers are forked processes on Linux (threads would hand the
interpreter lock back and forth at every NumPy call), else threads; the
calling process is worker 0:

* a CPU optimizer's flat parameter buffer lives in shared memory from its
  creation (:func:`gpucnn.threads.shared_empty`, passed to
  :func:`gpucnn.layers.flat.flatten`), so an optimizer step or a
  ``load_state_dict`` in the parent is what every worker reads (a new
  optimizer makes the trainer fork new workers);
* each step the parent copies the batch into a shared input buffer and sends
  ``(step, n, scale, training)`` down a pipe to every worker; process ``t``
  runs its micro-batches and writes their gradients into shared
  per-micro-batch buffers and their loss and count into a shared table; the
  parent sums the gradients in micro-batch order -- the same bits as threads.

The pipes carry bytes, not pickles.  A worker that fails sends its error back
and the step raises the same built-in exception class (else RuntimeError)
with the worker's traceback in the message.  When a worker dies in the middle
of a step (the out-of-memory killer, a crash in native code), the step runs
again, with a warning, on new workers -- its inputs and the parameters are
untouched until the optimizer steps, so the bits are those of an
uninterrupted step; when the new workers die too, the runner goes on with
threads (the same bits).  Workers exit on a stop message (the runner is
closed or collected, or the process exits) or, quietly, when their parent is
gone, and ignore Ctrl-C (the parent's to handle).

A replica is a copy made at the first split step (forked workers: at the
fork); of the layers' and the loss's attributes only the parameters (shared
arrays) and the train/eval flag follow the model afterwards -- settings
changed later (a LeakyReLU's slope, ``check_labels``) reach the replicas when
the trainer makes new ones (a new optimizer, thread count, input shape or a
larger batch).

Which models are split: :func:`why_whole` (every layer passes
:func:`may_split`, the loss is a built-in per-sample mean, anomaly detection
is off); the others keep the whole batch in one pass, with its ops spread
over the threads.
"""
from __future__ import annotations

import builtins
import copy
import math
import multiprocessing
import os
import signal
import struct
import traceback
import warnings
import weakref

import numpy as np

from .. import backend, debug, losses, precision, threads
from ..functional.workspace import Workspace
from ..layers.base import Layer, compute_class

__all__ = ["MICRO_BATCH", "MIN_SPLIT", "micro_bounds", "may_split", "why_whole", "describe", "MicroBatches",
           "ForkedRunner", "WorkerDied"]

#: Run the micro-batches in forked processes where the system can fork; else (or when set False)
#: on threads.  Either way the same bits.
PROCESSES = threads.can_fork()

#: Samples per micro-batch at most (a batch is cut into ``max(2, ceil(N / MICRO_BATCH))``).
MICRO_BATCH = 64
#: Batches from this size on are split (in two at least); smaller ones run whole (two halves of a
#: lenet5 batch of 64 on two forked workers beat the whole batch in paired runs).
MIN_SPLIT = 32


def micro_bounds(n: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` micro-batches of a batch of ``n``: ``ceil(n / MICRO_BATCH)`` near-equal
    pieces, at least two from :data:`MIN_SPLIT` samples on, one below."""
    if n < MIN_SPLIT:
        return [(0, n)]
    return threads.split(n, parts=max(2, math.ceil(n / MICRO_BATCH)))


# -- which models are split, and their replicas ----------------------------------------------------


def _held_layers(obj):
    """The layers :func:`_replicate` replicates with ``obj``: attributes that are layers, or lists of layers."""
    for value in vars(obj).values():
        if isinstance(value, Layer):
            yield value
        elif isinstance(value, list) and value and all(isinstance(v, Layer) for v in value):
            yield from value


def _never_mixing():
    """The built-in computations whose samples never meet: each sample's output and input gradient
    depend on that sample alone, and the parameter gradients are sums over the samples.  Not
    BatchNorm (batch statistics), Dropout and RReLU (draws for the whole batch), Softmax (its axis
    may be the batch's)."""
    from .. import layers as L

    return (L.Conv2D, L.Dense, L.Flatten, L.Sigmoid, L.Tanh, L.ScaledTanh, L.ReLU, L.LeakyReLU, L.PReLU,
            L.MaxPool2D, L.AvgPool2D, L.GlobalAvgPool2D, L.Sequential, L.Residual)


def may_split(layer) -> str | None:
    """Why ``layer`` may not run as micro-batches, or None when it may: it computes with one of
    :func:`_never_mixing`'s ``_forward``/``_backward`` (:func:`~gpucnn.layers.base.compute_class`;
    a layer running its own ``forward``/``backward`` is never split) and :func:`_replicate` reaches
    every layer it holds.  The one place this is decided."""
    name = type(layer).__name__
    compute = compute_class(layer)
    if compute is None:
        return f"{name} runs its own forward/backward"
    if compute not in _never_mixing():
        return f"{name} may mix the samples of a batch"
    if {id(c) for c in layer.children()} - {id(c) for c in _held_layers(layer)}:
        return f"{name} holds layers that are neither attributes nor lists of layers (a replica would share them)"
    return None


def _walk(layer):
    yield layer
    for child in layer.children():
        yield from _walk(child)


def why_whole(model, loss) -> str | None:
    """Why a batch of ``model`` / ``loss`` cannot be split into micro-batches, or None when it can."""
    if debug.is_enabled():
        return "anomaly detection is on"
    if type(loss) not in (losses.SoftmaxCrossEntropy, losses.MSE):   # a subclass may weigh its samples otherwise
        return f"the loss {type(loss).__name__} is not a built-in per-sample mean"
    for layer in _walk(model):
        why = may_split(layer)
        if why is not None:
            return why
    return None


def _replicate(obj):
    """A twin of a layer or a loss for another worker: the same parameter arrays (never written by a
    pass), fresh zeroed gradients, a fresh workspace, and replicas of the layers it holds
    (:func:`_held_layers`); every other attribute copied as it is now (forward state is rebound by
    the twin's own passes)."""
    twin = copy.copy(obj)
    if isinstance(getattr(obj, "grads", None), dict):
        twin.grads = {k: backend.get_array_module(g).zeros_like(g) for k, g in obj.grads.items()}
    if hasattr(obj, "workspace"):
        twin.workspace = Workspace()
    for key, value in vars(obj).items():
        if isinstance(value, Layer):
            setattr(twin, key, _replicate(value))
        elif isinstance(value, list) and value and all(isinstance(v, Layer) for v in value):
            setattr(twin, key, [_replicate(v) for v in value])
    return twin


def describe(model, loss, n: int, device: str = "cpu") -> str:
    """How a NumPy train step of ``n`` samples runs, in words (``gpucnn bench`` prints it)."""
    if device != "cpu":
        return "whole batch (micro-batches are the NumPy path's)"
    why = why_whole(model, loss)
    if why is not None:
        return f"whole batch, its ops over {threads.get_num_threads()} thread(s) ({why})"
    parts = len(micro_bounds(n))
    if parts == 1:
        return f"whole batch (< {MIN_SPLIT} samples), its ops over {threads.get_num_threads()} thread(s)"
    workers = min(parts, threads.get_num_threads())
    kind = "process(es), forked" if PROCESSES and workers > 1 else "thread(s)"
    return f"{parts} micro-batches of <= {MICRO_BATCH} samples over {workers} {kind}"


class _Replica:
    """A model and loss twin, and where each of its parameters' gradients lives."""

    def __init__(self, model, loss, forward_backward):
        self.model, self.loss, self.forward_backward = _replicate(model), _replicate(loss), forward_backward
        self.by_name = {name: (layer, key) for name, layer, key in self.model.named_parameters()}
        self.input = Workspace()

    def bind(self, views):
        """Point the twin's gradients at ``views`` (``[(name, array)]``): its backward writes there."""
        for name, view in views:
            layer, key = self.by_name[name]
            layer.grads[key] = view

    def run_share(self, t, T, x, y, n, scale, training, views, table):
        """Worker ``t`` of ``T``: micro-batches ``t, t + T, ...`` of the batch-last ``x[..., :n]`` /
        ``y[:n]``, micro-batch ``m``'s gradients into ``views[m]``, its loss and count into ``table[m]``."""
        if self.model.training != training:
            self.model.train(training)
        bounds = micro_bounds(n)
        for m in range(t, len(bounds), T):
            a, b = bounds[m]
            xm = self.input.get("x", x.shape[:-1] + (b - a,), x.dtype)
            np.copyto(xm, x[..., a:b])
            self.bind(views[m])
            value, correct = self.forward_backward(self.model, self.loss, xm, y[a:b], scale * (b - a) / n)
            table[m] = (float(value), int(correct))


class MicroBatches:
    """The CPU-workers runner of one model, loss and optimizer (made once per trainer).

    ``forward_backward(model, loss, x, y, scale)`` is the pass each micro-batch runs (the trainer's).
    """

    def __init__(self, model, loss, optimizer, forward_backward, processes: bool = True):
        self.model, self.loss, self.optimizer, self.groups = model, loss, optimizer, optimizer.groups
        self._pass = forward_backward
        self.processes = bool(processes)        # False: threads only (e.g. inside an MPI rank)
        self._replicas: list[_Replica] = []
        self._flats, self._views = [], []       # the threads' per-micro-batch gradient buffers
        self.forked = None                      # a ForkedRunner, once made

    def usable(self, x) -> bool:
        """Whether a batch-last batch ``x`` is split: NumPy arrays, big enough, a splittable model."""
        return (not backend.is_cupy(x) and x.shape[-1] >= MIN_SPLIT
                and all(not backend.is_cupy(g.grads) for g in self.groups)
                and why_whole(self.model, self.loss) is None)

    # -- what the threads and the forked runner share ---------------------------
    def replica(self) -> _Replica:
        return _Replica(self.model, self.loss, self._pass)

    def gradient_buffers(self, parts, new=np.zeros_like):
        """``parts`` sets of per-group flat gradient buffers made by ``new``, and their views."""
        flats = [[new(g.grads) for g in self.groups] for _ in range(parts)]
        views = [[(name, view) for g, flat in zip(self.groups, fl) for name, view in g.views(flat).items()]
                 for fl in flats]
        return flats, views

    def reduce(self, flats, table, n, dtype):
        """The step's result from its micro-batches': the gradients summed in micro-batch order into
        the optimizer's, and ``(loss, correct)`` as 0-d arrays."""
        bounds = micro_bounds(n)
        for gi, group in enumerate(self.groups):
            np.add(flats[0][gi], flats[1][gi], out=group.grads)
            for m in range(2, len(bounds)):
                group.grads += flats[m][gi]
        total = sum(float(v) * (b - a) for v, (a, b) in zip(table[:len(bounds), 0], bounds)) / n
        return np.asarray(total, dtype=dtype), np.asarray(int(table[:len(bounds), 1].sum()))

    # -- running ------------------------------------------------------------
    def _forked(self, x, y, n):
        """The forked runner for this input (made, or made again for a new shape, a bigger batch or
        another thread count), or None when the micro-batches run on threads."""
        T = threads.get_num_threads()
        use = PROCESSES and self.processes and T >= 2 and usable_groups(self.groups)
        runner = self.forked
        if runner is not None and (not use or runner.closed or runner.T != T or runner.key[3] < n
                                   or runner.key[:3] != (tuple(x.shape[:-1]), x.dtype, y.dtype)):
            runner.close()
            runner = self.forked = None
        if use and runner is None:
            runner = self.forked = ForkedRunner(self, T - 1, x, y, n)
        return runner

    def close(self) -> None:
        """Stop the forked workers, if any (the next split step forks new ones)."""
        if self.forked is not None:
            self.forked.close()
            self.forked = None

    def forward_backward(self, x, y, scale, slot=None):
        """Forward, loss and backward of a batch-last batch: in micro-batches where :meth:`usable`,
        else in one pass; ``(loss, correct)`` as 0-d arrays."""
        if slot is None and self.usable(x):
            return self.run(x, y, scale)
        return self._pass(self.model, self.loss, x, y, scale, slot)

    def run(self, x, y, scale):
        """The pass of the batch-last ``x`` / ``y`` in micro-batches (module docstring); ``(loss, correct)``."""
        n = int(x.shape[-1])
        for retry in (False, True):   # a worker died mid-step: again on new workers, then on threads
            runner = self._forked(x, y, n)
            if runner is None:
                break
            try:
                with threads.inline():
                    return runner.run(x, y, scale)
            except WorkerDied as exc:   # the runner closed itself: _forked forks new workers
                if retry:
                    self.processes = False
                then = "on threads from now on" if retry else "on new workers"
                warnings.warn(f"{exc}; the step runs again {then} (the same bits)", RuntimeWarning, stacklevel=2)
        return self._threaded(x, y, scale)

    def _threaded(self, x, y, scale):
        """:meth:`run` on threads (this process's, or none)."""
        n = int(x.shape[-1])
        parts = len(micro_bounds(n))
        used = min(threads.get_num_threads(), parts)
        while len(self._replicas) < used:
            self._replicas.append(self.replica())
        if len(self._flats) < parts:
            self._flats, self._views = self.gradient_buffers(parts)
        table = np.empty((parts, 2), np.float64)
        training = bool(self.model.training)
        threads.map_each(lambda t: self._replicas[t].run_share(t, used, x, y, n, scale, training,
                                                                self._views, table),
                         [(t,) for t in range(used)])
        return self.reduce(self._flats, table, n, x.dtype)


# -- forked worker processes -------------------------------------------------------------------------

# The pipes carry bytes, not pickles: a command is (step, n, scale, training, precision mode: its
# index in gpucnn.precision.MODES, so a worker forked earlier runs the parent's mode of now), a reply
# is the step and an error (empty when the share ran): the exception's class name, then its message
# and the worker's traceback.
_COMMAND = struct.Struct("<qqd?B")
_STEP = struct.Struct("<q")
_STOP = b"stop"


class WorkerDied(RuntimeError):
    """A micro-batch worker process ended in the middle of a step (killed, or crashed in native code)."""


def usable_groups(groups) -> bool:
    """Whether the optimizer's parameters are in shared memory (so forked workers see its updates)."""
    return all(threads.is_shared(g.params) for g in groups)


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
    """``workers`` forked processes running micro-batches for one :class:`MicroBatches`.

    Made for one input shape (``x`` batch-last without the batch, dtype) and up to
    ``max_n`` samples a step; the runner makes a new one when either changes.
    """

    def __init__(self, micro, workers: int, x, y, max_n: int):
        self.micro, self.T = micro, workers + 1
        self.key = (tuple(x.shape[:-1]), x.dtype, y.dtype, max_n)
        self.x = threads.shared_empty(tuple(x.shape[:-1]) + (max_n,), x.dtype)
        self.y = threads.shared_empty((max_n,), y.dtype)
        parts = len(micro_bounds(max_n))          # no fewer pieces than any smaller batch has
        self.flats, self.views = micro.gradient_buffers(parts, new=lambda g: threads.shared_empty(g.shape, g.dtype))
        self.table = threads.shared_empty((parts, 2), np.float64)       # per micro-batch: loss, correct
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
        threads.after_fork_in_worker()
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
            seq, n, scale, training, mode = _COMMAND.unpack(msg)
            try:
                with precision.using(precision.MODES[mode]):
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
        command = _COMMAND.pack(self._seq, n, float(scale), training, precision.MODES.index(precision.current()))
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
