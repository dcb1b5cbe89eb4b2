"""A NumPy train step's batch in micro-batches, each one whole pass of a model replica.

On a CPU a whole-network pass per core beats splitting each op over the
cores: the ops of a small network are too short to share, and the working
set of 64 samples stays in the caches where 256 do not.  Measured on the
2-vCPU Xeon of BENCHMARKS.md: a lenet5 step at batch 256 took about as long
with its ops over two threads as with one, and one thread spent 89 us per
sample at batch 64 against 137 at batch 256.

So :class:`MicroBatches` cuts a batch of N >= :data:`MIN_SPLIT` samples into
``M = max(2, ceil(N / MICRO_BATCH))`` near-equal contiguous micro-batches,
fixed by N alone.  Worker ``t`` of T (T = gpucnn's thread count) runs
micro-batches ``t, t + T, ...`` on a replica of its own
(:meth:`~gpucnn.layers.Layer.replica` of the model and the loss: the same
parameter arrays, its own gradients, workspaces and forward state); each
micro-batch ``m`` back-propagates ``scale * n_m / N`` times its own mean loss
into gradient buffers of its own, and the step's gradient is their sum,
added in the order ``m = 0, 1, ..., M-1`` into the optimizer's flat
gradients.  That sum is the gradient of ``scale`` times the batch-mean loss
(the gradient is linear in the samples' losses); which worker ran a
micro-batch changes nothing, so the bits depend on N and not on the thread
count.  The loss is ``sum_m n_m loss_m / N`` (float64 on the host, then the
input's dtype) and the correct count the sum of the counts.

The workers are forked processes on Linux (:mod:`gpucnn.train.forked`:
threads would hand the interpreter lock back and forth at every NumPy call),
else threads; the calling process is worker 0.  When a forked worker dies in
the middle of a step (the out-of-memory killer), the step runs again, with a
warning, on new workers -- its inputs and the parameters are untouched until
the optimizer steps, so the bits are those of an uninterrupted step; when
the new workers die too, this runner goes on with threads (the same bits).  A replica is a copy made at
the first split step (forked workers: at the fork); of the layers' and the
loss's attributes only the parameters (shared arrays) and the train/eval
flag follow the model afterwards -- settings changed later (a LeakyReLU's
slope, ``check_labels``) reach the replicas when the trainer makes new ones
(a new optimizer, thread count, input shape or a larger batch).

It applies when every layer's own class declares ``batch_independent``
(samples never meet: convolutions, dense layers, activations, pooling,
flattening, global average pooling, Residual and Sequential of such) and the
arrays are NumPy's; BatchNorm (batch statistics), Dropout and RReLU (draws
for the whole batch), a layer of the user's that does not declare it, and
anomaly detection (which names one layer of one pass) keep the whole batch
in one pass, with its ops spread over the threads
(:mod:`gpucnn.functional.threads`).
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from .. import backend, debug, losses
from ..functional import threads
from ..functional.workspace import Workspace
from ..layers.base import run_backward, run_forward
from . import forked

__all__ = ["MICRO_BATCH", "micro_bounds", "why_whole", "describe", "forward_backward", "MicroBatches"]

#: Run the micro-batches in forked processes (:mod:`gpucnn.train.forked`) where the system can
#: fork; else (or when set False) on threads.  Either way the same bits.
PROCESSES = forked.available()

#: Samples per micro-batch at most (a batch is cut into ``max(2, ceil(N / MICRO_BATCH))``).
MICRO_BATCH = 64
#: Batches from this size on are split (in two at least); smaller ones run whole.  lenet5 at
#: batch 64, two forked workers: 4.8-5.9 ms a step as two halves, 5.7-7.3 ms whole (paired runs).
MIN_SPLIT = 32


def micro_bounds(n: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` micro-batches of a batch of ``n``: ``ceil(n / MICRO_BATCH)`` near-equal
    pieces, at least two from :data:`MIN_SPLIT` samples on, one below."""
    if n < MIN_SPLIT:
        return [(0, n)]
    return threads.split(n, parts=max(2, math.ceil(n / MICRO_BATCH)))


def _walk(layer):
    yield layer
    for child in layer.children():
        yield from _walk(child)


def why_whole(model, loss) -> str | None:
    """Why a batch of ``model`` / ``loss`` cannot be split into micro-batches, or None when it can."""
    if debug.is_enabled():
        return "anomaly detection is on"
    if "replica" not in vars(type(loss)):    # a subclass may weigh its samples another way
        return f"the loss {type(loss).__name__} does not define replica()"
    for layer in _walk(model):
        own = vars(type(layer))
        if not own.get("batch_independent", False):
            return f"{type(layer).__name__} does not declare batch_independent"
        if layer.children() and "replica" not in own:     # its replica would share its children
            return f"{type(layer).__name__} holds layers but does not define replica()"
    return None


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


def forward_backward(model, loss, x, y, scale, slot=None):
    """Forward, loss and backward of one batch-last batch in one pass; ``(loss, correct)`` as 0-d arrays.

    The gradients written (overwritten) are those of ``scale`` times the batch-mean loss;
    ``slot``: ``(loss_out, correct_out)`` for the loss's kernel path to write into.
    """
    out = run_forward(model, x)
    if isinstance(loss, losses.MSE):
        value = loss.forward_internal(out, losses.one_hot_internal(y, out.shape[0], out.dtype))
        correct = (out.argmax(axis=0) == y).sum()
    elif slot is not None:
        value = loss.forward_internal(out, y, loss_out=slot[0], correct_out=slot[1])
        correct = loss.correct
    else:
        value = loss.forward_internal(out, y)
        correct = loss.correct
    run_backward(model, loss.backward_internal(scale), input_grad=False)
    return value, correct


class _Replica:
    """A model and loss twin, and where each of its parameters' gradients lives."""

    def __init__(self, model, loss):
        self.model, self.loss = model.replica(), loss.replica()
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
            value, correct = forward_backward(self.model, self.loss, xm, y[a:b], scale * (b - a) / n)
            table[m] = (float(value), int(correct))


class MicroBatches:
    """The micro-batch runner of one model, loss and optimizer (made once per trainer)."""

    def __init__(self, model, loss, optimizer, processes: bool = True):
        self.model, self.loss, self.optimizer, self.groups = model, loss, optimizer, optimizer.groups
        self.processes = bool(processes)        # False: threads only (e.g. inside an MPI rank)
        self._replicas: list[_Replica] = []
        self._flats, self._views = [], []       # the threads' per-micro-batch gradient buffers
        self._runner = None                     # a forked.ForkedRunner, once made

    def usable(self, x) -> bool:
        """Whether a batch-last batch ``x`` is split: NumPy arrays, big enough, a splittable model."""
        return (not backend.is_cupy(x) and x.shape[-1] >= MIN_SPLIT
                and all(not backend.is_cupy(g.grads) for g in self.groups)
                and why_whole(self.model, self.loss) is None)

    # -- what the threads and the forked runner share ---------------------------
    bounds = staticmethod(micro_bounds)

    def replica(self) -> _Replica:
        return _Replica(self.model, self.loss)

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
        use = PROCESSES and self.processes and T >= 2 and forked.usable_groups(self.groups)
        runner = self._runner
        if runner is not None and (not use or runner.closed or runner.T != T or runner.key[3] < n
                                   or runner.key[:3] != (tuple(x.shape[:-1]), x.dtype, y.dtype)):
            runner.close()
            runner = self._runner = None
        if use and runner is None:
            runner = self._runner = forked.ForkedRunner(self, T - 1, x, y, n)
        return runner

    def close(self) -> None:
        """Stop the forked workers, if any (the next split step forks new ones)."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def run(self, x, y, scale):
        """:func:`forward_backward` of the batch-last ``x`` / ``y`` in micro-batches (module docstring)."""
        n = int(x.shape[-1])
        for retry in (False, True):   # a worker died mid-step: again on new workers, then on threads
            runner = self._forked(x, y, n)
            if runner is None:
                break
            try:
                with threads.inline():
                    return runner.run(x, y, scale)
            except forked.WorkerDied as exc:   # the runner closed itself: _forked forks new workers
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
