"""One train step and one epoch loop: what ``gpucnn train``, ``gpucnn bench`` and the tests run.

Read :meth:`Trainer._train_step` first: gather, forward + loss + backward
(:func:`forward_backward`, through the runner the trainer picked once:
CPU workers on NumPy, one pass on a GPU), update.  On a GPU the full-size
steps are then replayed as CUDA graphs (:mod:`gpucnn.train.graph`).

A step is forward, loss, backward (without the first layer's input gradient)
and one optimizer step, in an NVTX range ``train_step``, all on the internal
batch-last layout (:mod:`gpucnn.functional.layout`): the batch is gathered
from the dataset straight into it (one ``gather_batch`` kernel on a GPU), the
loss reads the network's ``(K, N)`` output as it is and counts the correct
predictions in the same pass, and the optimizer reads its learning rate for
every step of the epoch from one table uploaded at the epoch's start.  On a
GPU nothing in a step waits for the host.  Its loss and its
count of correct predictions stay on the device; :meth:`Trainer.run_steps`
reads them back every ``sync_every`` steps (every step on the CPU, every 50
on a GPU, so the GPU is not stalled by a host sync per step), checks them for
NaN/Inf and adds them up.

Data-parallel (``comm``, a :class:`gpucnn.distributed.Communicator`): every
rank takes its contiguous shard of each global batch
(:func:`~gpucnn.data.batching.batch_indices`), back-propagates its local mean
loss scaled by ``n_rank / n_global``, and the gradients are summed over the
ranks, one flat buffer per dtype (the optimizer's
:class:`~gpucnn.layers.flat.FlatGroup` ``grads``: the layers write into it,
nothing is packed).  The sum is the gradient of the global batch's mean loss,
for uneven shards too, and every rank applies the same optimizer step.
Losses and correct counts are summed over the ranks at each host read, so
every rank sees the same metrics and stops at the same NaN/Inf step.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from .. import backend
from .. import debug as debug_mod
from .. import losses, precision
from ..data.augment import augment_batch
from ..data.batching import batch_indices, batch_start, shard_bounds
from ..functional import _dispatch
from ..functional.layout import from_internal, to_internal
from ..layers.base import run_backward, run_forward, runs_batch_last
from ..nvtx import nvtx_range
from . import graph as graph_mod
from . import workers
from .config import NonFiniteLossError
from .evaluation import evaluate, evaluate_sums, loss_targets

__all__ = ["Trainer", "EpochStats", "forward_backward"]


def forward_backward(model, loss, x, y, scale=1.0, slot=None, loss_scaler=None):
    """Forward, loss and backward of one batch-last batch in one pass; ``(loss, correct)`` as 0-d arrays.

    The gradients written (overwritten) are those of ``scale`` times the batch-mean loss;
    ``slot``: ``(loss_out, correct_out)`` for the loss's kernel path to write into;
    ``loss_scaler``: a :class:`~gpucnn.train.LossScaler` whose scale, held on the device,
    multiplies the loss's gradient before the backward pass (a GPU step; on NumPy the trainer
    folds the scale into ``scale``).  The one place the train step calls the model's and the
    loss's batch-last passes.
    """
    with _quiet_overflow():
        return _one_batch(model, loss, x, y, scale, slot, loss_scaler)


def _quiet_overflow():
    """An fp16 step runs with NumPy's overflow and invalid-value warnings off: a scaled gradient that
    overflows is what loss scaling detects (the step is skipped and counted), and an overflowing
    forward gives a non-finite loss, which stops the run with its own message."""
    if precision.current() in precision.LOSS_SCALED:
        return np.errstate(over="ignore", invalid="ignore")
    return contextlib.nullcontext()


def _one_batch(model, loss, x, y, scale, slot, loss_scaler):
    """:func:`forward_backward`'s forward, loss and backward, top to bottom."""
    out = run_forward(model, x)                                         # forward
    if not runs_batch_last(loss):                                       # a loss of one's own: public passes
        return _own_loss(model, loss, out, y, scale, loss_scaler)
    if isinstance(loss, losses.MSE):                                    # loss and its gradient
        value = loss._forward(out, losses.one_hot_internal(y, out.shape[0], out.dtype))
        correct = (out.argmax(axis=0) == y).sum()
        dy = loss._backward(scale)
    else:                                                               # cross-entropy: one pass
        loss_out, correct_out = slot if slot is not None else (None, None)
        value, dy = loss._forward_backward(out, y, scale, loss_out=loss_out, correct_out=correct_out)
        correct = loss.correct
    if loss_scaler is not None:                                         # a device scale: dy *= S
        dy = loss_scaler.scale_gradient(dy)
    run_backward(model, dy, input_grad=False)                           # backward
    return value, correct


def _own_loss(model, loss, out, y, scale, loss_scaler=None):
    """The loss and backward of :func:`forward_backward` through a loss's own public ``forward`` /
    ``backward`` (a subclass overriding them, or a loss of one's own): batch-first arrays, converted."""
    target = losses.one_hot(y, out.shape[0], out.dtype) if isinstance(loss, losses.MSE) else y
    value = loss.forward(from_internal(out), target)
    correct = (out.argmax(axis=0) == y).sum()
    dy = to_internal(loss.backward(scale))
    if loss_scaler is not None:
        dy = loss_scaler.scale_gradient(dy)
    run_backward(model, dy, input_grad=False)
    return value, correct


class _OnePass:
    """The runner of a batch in one pass (a GPU's eager steps): :func:`forward_backward`."""

    def __init__(self, model, loss):
        self.model, self.loss = model, loss

    def forward_backward(self, x, y, scale, slot=None, loss_scaler=None):
        return forward_backward(self.model, self.loss, x, y, scale, slot, loss_scaler)

    def close(self) -> None:
        pass


@dataclass
class StepInputs:
    """What one step of :meth:`Trainer.run_steps` reads besides the dataset."""

    idx: object             #: this rank's sample indices into the dataset
    n_global: int           #: the examples of the global batch (all ranks)
    hyper: dict             #: per optimizer dtype, the step's device hyper row (kernel path; else empty)
    slot: object            #: ``(loss_out, correct_out)`` in the metric ring, or None
    key: tuple              #: ``(epoch, start)``: the augmentation's key (start None without augmentation)
    aug_words: object       #: the step's row of the device augmentation-key table, or None


@dataclass
class PendingStep:
    """A step run but not read back yet (:meth:`Trainer.run_steps` reads every ``sync_every``)."""

    step: int               #: the step's number in the epoch (0-based)
    loss: object            #: its loss, a 0-d device array, or None (in the trainer's ring; an empty shard)
    correct: object         #: its count of correct predictions, likewise
    n: int                  #: this rank's examples in it
    lr: float               #: its learning rate
    n_global: int           #: the examples of the global batch (all ranks)


@dataclass
class EpochStats:
    """Running totals of the steps run so far in one epoch (over all ranks when data-parallel)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0
    lr_first: float | None = None
    lr_last: float | None = None

    @property
    def loss(self) -> float:
        return self.loss_sum / self.seen if self.seen else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen if self.seen else float("nan")


class Trainer:
    """Train ``model`` with ``loss`` and ``optimizer``.

    Args:
        model: a :class:`~gpucnn.layers.Sequential` (on the device of the data).
        loss: a gpucnn loss object (:class:`~gpucnn.losses.MSE` gets one-hot targets).
        optimizer: a :class:`~gpucnn.optim.Optimizer` over ``model``'s parameters.
        batch_size: examples per step (the global batch when ``comm`` is given).
        schedule: ``schedule(epoch, step) -> lr`` set before every step; None
            keeps the optimizer's ``lr``.
        num_classes: for one-hot targets.
        sync_every: steps between host reads of the loss (default: 1 on the
            CPU, 50 on a GPU).
        comm: a :class:`~gpucnn.distributed.Communicator` for data-parallel
            training; None: this process alone.
        normalize: ``(mean, std)`` per channel, for a uint8 dataset ``x`` (the raw training set kept
            on the device): each batch is normalised as :func:`gpucnn.data.normalize` does, in the
            same kernel that gathers and augments it (``gather_batch_augment_u8``), or on the
            NumPy path by :func:`gpucnn.data.augment.augment_uint8_batch` -- the same bits.
        augment: None, or ``{"seed": int, "fill": float, "flip": bool[, "max_shift": int (default 2)]}``: every
            training batch is shifted (and flipped) by
            :func:`gpucnn.data.augment.augment_batch`, keyed by ``(seed, epoch)``
            and each example's position in the epoch's order, so runs, resumed
            runs and any number of ranks see the same batches.
        cuda_graph: on a GPU, replay full-size steps as one captured CUDA graph
            (:mod:`gpucnn.train.graph`: two captures checked against each other
            and against an eager step bit for bit before they are used).
            Default True; a step that fails those checks runs eagerly after a
            one-line warning; steps that are never captured run eagerly
            without one (see :meth:`why_eager`).
        loss_scaler: None, or a :class:`~gpucnn.train.LossScaler`: dynamic loss scaling,
            what fp16 needs (:func:`~gpucnn.train.train` makes one for ``precision="fp16"``
            and for no other mode).  Every step then back-propagates the scaled loss,
            unscales and checks the gradients, and skips the update when one is Inf or NaN.
    """

    def __init__(self, model, loss, optimizer, *, batch_size: int, schedule=None, num_classes: int = 10,
                 sync_every: int | None = None, comm=None, cuda_graph: bool = True, augment=None,
                 normalize=None, loss_scaler=None):
        self._model, self._loss, self._optimizer = model, loss, optimizer
        self.loss_scaler = loss_scaler
        if loss_scaler is not None:
            loss_scaler.bind(optimizer)
        self._runner = None              # forward, loss and backward: picked at the first step (_passes)
        self.comm = comm
        self.batch_size = int(batch_size)
        self.schedule = schedule
        self.num_classes = num_classes
        device = getattr(model, "device", "cpu")
        self.sync_every = int(sync_every) if sync_every else (1 if device == "cpu" else 50)
        self._batch_buffers: dict = {}
        self._ring = None
        self.augment = augment
        self.normalize = None if normalize is None else (tuple(normalize[0]), tuple(normalize[1]))
        self._affine = {}     # (device, C) -> (scale, shift, no-augment key words) on the device, for uint8 datasets
        self.cuda_graph = bool(cuda_graph)
        self._graphs: dict = {}          # (id(x), id(y), n) -> GraphedStep, or None: eager
        self._eager_steps: dict = {}     # the same key -> eager steps run (capture waits for WARMUP_STEPS)

    # model, loss and optimizer may be replaced between steps; the runner made for them goes with them
    def _replace(name):  # noqa: N805 - a property factory
        def set_(self, value):
            setattr(self, "_" + name, value)
            self.close()
            self._runner = None
            self._graphs.clear()             # captured graphs point into the old buffers
            self._eager_steps.clear()
            if name == "optimizer" and self.loss_scaler is not None:
                self.loss_scaler.bind(value)   # it scales the new optimizer's gradients
        return property(lambda self: getattr(self, "_" + name), set_)

    model, loss, optimizer = _replace("model"), _replace("loss"), _replace("optimizer")

    def close(self) -> None:
        """Stop this trainer's micro-batch worker processes, if it forked any (they also stop when the
        trainer is collected or the process exits; a later step forks new ones)."""
        if self._runner is not None:
            self._runner.close()

    def _passes(self, x):
        """The runner of forward, loss and backward, picked once (again only after the model, the loss
        or the optimizer is replaced): CPU workers for NumPy arrays (:mod:`gpucnn.train.workers`:
        micro-batches where the model allows, else one pass), one pass on a GPU (whose full-size steps
        are replayed as CUDA graphs above it, :meth:`_graphed_step`)."""
        if self._runner is None:
            if backend.is_cupy(x):
                self._runner = _OnePass(self._model, self._loss)
            else:   # no forked workers beside a communicator: MPI libraries do not survive a fork
                self._runner = workers.MicroBatches(self._model, self._loss, self._optimizer, forward_backward,
                                                    processes=self.comm is None)
        return self._runner

    def step(self, xb, yb):
        """One training step on a public batch ``xb`` (N, ...) / ``yb`` (N,); returns
        ``(loss, correct)`` as 0-d device arrays."""
        with nvtx_range("train_step"):
            value, correct = self._forward_backward(to_internal(xb), yb, 1.0)
            self._update()
        return value, correct

    def _forward_backward(self, x, y, scale, slot=None):
        """Forward, loss and backward on a batch-last batch; ``(loss, correct)``, both 0-d arrays.

        The gradients written are those of ``scale`` times the batch-mean loss, times the loss
        scale with a :class:`~gpucnn.train.LossScaler` (on NumPy folded into ``scale``: the host
        reads it for free; on a GPU multiplied into the loss's gradient on the device).
        ``slot``: ``(loss_out, correct_out)`` for the loss's kernel path to write into.
        On NumPy a batch of a model whose layers never mix samples runs as
        micro-batches in forked workers or on threads (:mod:`gpucnn.train.workers`).
        """
        scaler = self.loss_scaler
        if scaler is None:
            return self._passes(x).forward_backward(x, y, scale, slot)
        with _quiet_overflow():              # the micro-batches' gradients are summed here
            if scaler.on_host:               # a power of two: scale * S / N is exact
                return self._passes(x).forward_backward(x, y, scale * scaler.scale, slot)
            return self._passes(x).forward_backward(x, y, scale, slot, loss_scaler=scaler)

    def _update(self, hyper=None) -> None:
        """The optimizer step; with a loss scaler, the gradients unscaled and checked first, the step
        skipped on the device when one is Inf or NaN, and the scale updated after it."""
        scaler = self.loss_scaler
        if scaler is None:
            self.optimizer.step(hyper)
            return
        skip = scaler.unscale_(self.optimizer)
        self.optimizer.step(hyper, skip=skip)
        scaler.update()

    @staticmethod
    def _gather_kernel(x, y) -> bool:
        """Whether batches of the dataset ``(x, y)`` are gathered by a kernel (``gather_batch[_augment]``,
        ``gather_batch_augment_u8`` for a uint8 dataset)."""
        return (_dispatch.use_kernels(x) and (x.dtype.kind == "f" or (x.dtype == np.uint8 and x.ndim == 4))
                and x.flags.c_contiguous and y.dtype.kind == "i")

    @staticmethod
    def batch_dtype(x):
        """The dtype of the batches of dataset ``x``: its own, float32 for a uint8 dataset."""
        return np.dtype(np.float32) if x.dtype == np.uint8 else x.dtype

    def _gather_u8(self, x, y, idx, key, aug_words):
        """:meth:`_gather` of a uint8 dataset: normalised (and augmented) on the way."""
        if self.normalize is None:
            raise ValueError("a uint8 dataset needs the Trainer's normalize=(mean, std) to make its batches")
        mean, std = self.normalize
        aug = self.augment if key is not None else None
        if self._gather_kernel(x, y) and (aug is None or aug_words is not None):
            from ..cuda.batch import augment_key_words, gather_batch_augment_u8
            from ..data import channel_affine

            xp, C, n = backend.get_array_module(x), int(x.shape[1]), int(idx.shape[0])
            dev = backend.device_of(x)
            if (dev, C) not in self._affine:     # (scale, shift, the key words of an unaugmented gather)
                self._affine[(dev, C)] = tuple(backend.to_device(a, dev) for a in channel_affine(mean, std, C)) \
                    + (backend.to_device(augment_key_words((0, 0)), dev),)
            scale, shift, nokey = self._affine[(dev, C)]
            bkey = (n, np.dtype(np.float32), tuple(x.shape[1:]))
            bufs = self._batch_buffers.get(bkey)
            if bufs is None:
                bufs = self._batch_buffers[bkey] = (xp.empty(tuple(x.shape[1:]) + (n,), np.float32),
                                                   xp.empty((n,), np.int32))
            if aug is None:     # no shift, no flip: the key is never read
                return gather_batch_augment_u8(x, y, idx, nokey, scale, shift, fill=0.0,
                                               max_shift=0, flip=False, x_out=bufs[0], y_out=bufs[1])
            return gather_batch_augment_u8(x, y, idx, aug_words, scale, shift, fill=aug["fill"],
                                           flip=bool(aug["flip"]), max_shift=int(aug.get("max_shift", 2)),
                                           x_out=bufs[0], y_out=bufs[1])
        from ..data import normalize as normalize_images
        from ..data.augment import augment_uint8_batch

        if aug is not None:
            epoch, start = key
            xb = augment_uint8_batch(x, idx, (aug["seed"], epoch), mean=mean, std=std, fill=aug["fill"],
                                     flip=aug["flip"], start=start, max_shift=int(aug.get("max_shift", 2)))
            return to_internal(xb), y[idx]
        xb = backend.to_device(normalize_images(backend.asnumpy(x[idx]), mean=mean, std=std), backend.device_of(x))
        return to_internal(xb), y[idx]

    def _gather(self, x, y, idx, key=None, aug_words=None):
        """Examples ``idx`` of the dataset ``(x, y)`` as a batch-last batch and its labels.

        On the kernel path one launch writes them into buffers kept per batch
        size (so a step allocates nothing): ``gather_batch``, or with
        augmentation ``gather_batch_augment``, which shifts (and mirrors) them
        on the way, reading the batch's key from the device (``aug_words``, a
        row of the table :meth:`_augment_rows` uploads per :meth:`run_steps`
        call).  Otherwise ``x[idx]``, converted; with augmentation (``key`` =
        ``(epoch, start)``, ``start`` the position of ``idx[0]`` in the epoch's
        order) shifted by :func:`~gpucnn.data.augment.augment_batch` first --
        the same bits either way.
        """
        if x.dtype == np.uint8:
            return self._gather_u8(x, y, idx, key, aug_words)
        aug = self.augment if key is not None else None
        # aug_words exists only where _augment_rows found the augmented gather kernel usable
        if self._gather_kernel(x, y) and (aug is None or aug_words is not None):
            from ..cuda.batch import gather_batch, gather_batch_augment

            n = int(idx.shape[0])
            bkey = (n, x.dtype, tuple(x.shape[1:]))
            bufs = self._batch_buffers.get(bkey)
            xp = backend.get_array_module(x)
            if bufs is None:
                bufs = self._batch_buffers[bkey] = (xp.empty(tuple(x.shape[1:]) + (n,), x.dtype),
                                                   xp.empty((n,), np.int32))
            if aug is None:
                return gather_batch(x, y, idx, x_out=bufs[0], y_out=bufs[1])
            return gather_batch_augment(x, y, idx, aug_words, fill=aug["fill"], flip=bool(aug["flip"]),
                                        max_shift=int(aug.get("max_shift", 2)),
                                        x_out=bufs[0], y_out=bufs[1])
        if aug is not None:
            epoch, start = key
            xb = augment_batch(x[idx], (aug["seed"], epoch), fill=aug["fill"], flip=aug["flip"], start=start,
                               max_shift=int(aug.get("max_shift", 2)))
            return to_internal(xb), y[idx]
        return to_internal(x[idx]), y[idx]

    def _augment_rows(self, x, y, epoch, starts):
        """The device table of the steps' augmentation keys, ``(len(starts), 4)`` int32 (one row per
        step, :func:`~gpucnn.cuda.batch.augment_key_words` of ``(seed, epoch)`` and the position
        ``starts[i]`` of the step's first example in the epoch's order), when the augmented gather
        runs as a kernel; else None."""
        if self.augment is None or not self._gather_kernel(x, y) or x.ndim != 4 or not starts:
            return None
        from ..cuda.batch import augment_key_words

        host = np.stack([augment_key_words((self.augment["seed"], epoch), start) for start in starts])
        return backend.to_device(host, backend.device_of(x))

    def why_eager(self, x, n: int, replayable_loss: bool = True, augment_kernel: bool = True) -> str | None:
        """Why a step of ``n`` samples of ``x`` runs eagerly rather than as a CUDA graph; None: it may
        be captured.  No warning is given for these: they are what the step is, not failures."""
        if not self.cuda_graph:
            return "cuda_graph=False (--no-cuda-graph)"
        if not backend.is_cupy(x):
            return "the CPU: NumPy steps are eager"
        if debug_mod.is_enabled():
            return "anomaly detection checks every layer on the host"
        if n != self.batch_size:
            return "the epoch's last, smaller batch (only the full batch size is captured)"
        if self.comm is not None and self.comm.size > 1:
            return "several ranks: the gradient allreduce is not captured"
        if not augment_kernel:
            return ("the augmented batches of this dataset are gathered by CuPy operations, not the augmented "
                    "gather kernel")
        if not replayable_loss:
            return f"only softmax cross-entropy steps are captured, not {type(self.loss).__name__}"
        if getattr(self.loss, "check_labels", False):
            return ("the loss checks the labels on the host every step (SoftmaxCrossEntropy(check_labels=True)); "
                    "gpucnn train turns that off on a GPU")
        return None

    def _graphed_step(self, x, y, idx, ring, augment_rows):
        """The :class:`~gpucnn.train.graph.GraphedStep` for this dataset and batch size, made once the
        step has warmed up; None while warming up or when the step runs eagerly (:meth:`why_eager`)."""
        n = int(idx.shape[0])
        if self.why_eager(x, n, ring is not None, self.augment is None or augment_rows is not None):
            return None
        key = (id(x), id(y), n)
        if key in self._graphs:
            g = self._graphs[key]
            if g is not None:
                for group in self.optimizer.groups:   # a replaced parameter would leave the step behind
                    group.check(type(self.optimizer).__name__)
            return g
        seen = self._eager_steps.get(key, 0)
        if seen < graph_mod.WARMUP_STEPS:
            self._eager_steps[key] = seen + 1         # this step runs eagerly
            return None
        g = self._graphs[key] = graph_mod.GraphedStep(self, x, y, n, idx.dtype, augmented=augment_rows is not None)
        return g

    def _metric_ring(self, x, size):
        """Per-step device slots for the loss and the correct count (kernel path with softmax
        cross-entropy), so pending steps keep their own values and one read fetches them all."""
        if not (isinstance(self.loss, losses.SoftmaxCrossEntropy) and runs_batch_last(self.loss)
                and _dispatch.use_kernels(x)):
            return None
        ring = self._ring
        dtype = self.batch_dtype(x)
        if ring is None or ring[0].shape[0] < size or ring[0].dtype != dtype:
            xp = backend.get_array_module(x)
            ring = self._ring = (xp.empty((size, 1), dtype), xp.empty((size, 1), np.int32))
        return ring

    def _hyper_rows(self, epoch, steps):
        """Per step: the optimizer's device hyper rows (kernel path), or None; sets nothing."""
        lrs = [self.schedule(epoch, st) if self.schedule is not None else self.optimizer.lr for st in steps]
        tables = {}
        for group in self.optimizer.groups:
            if _dispatch.use_kernels(group.params) and group.dtype not in tables:
                host = self.optimizer.hyper_table(lrs, self.optimizer.step_count + 1, group.dtype)
                tables[group.dtype] = backend.to_device(host, group.device)
        return lrs, tables

    def step_shard(self, xb, yb, n_global: int, hyper=None, slot=None):
        """One data-parallel step on this rank's shard (batch-last ``xb``) of a global batch of
        ``n_global`` examples.

        Returns ``(local mean loss, local correct)`` as 0-d device arrays
        (``(None, None)`` for an empty shard, which contributes zero gradients).
        """
        n = int(yb.shape[0])
        value = correct = None
        with nvtx_range("train_step"):
            if n:
                value, correct = self._forward_backward(xb, yb, n / n_global, slot)
            else:  # more ranks than examples in this (last) batch
                for group in self.optimizer.groups:
                    group.grads.fill(0)
            with nvtx_range("allreduce_grads"):
                for group in self.optimizer.groups:
                    self.comm.allreduce_sum(group.grads)
            self._update(hyper)          # after the sum: every rank skips the same steps
        return value, correct

    def _one_step(self, x, y, s: StepInputs, ring, aug_rows):
        """One step of :meth:`run_steps`: a CUDA-graph replay, or :meth:`_train_step`."""
        graphed = self._graphed_step(x, y, s.idx, ring, aug_rows)
        if graphed is not None:
            with nvtx_range("train_step (CUDA graph)"):
                try:
                    graphed.step(s.idx, s.hyper, s.slot, s.aug_words)
                except graph_mod.GraphCaptureError as exc:   # the step ran eagerly; so will the next ones
                    self._graphs[(id(x), id(y), int(s.idx.shape[0]))] = None
                    graph_mod.warn_refused(exc)
            return s.slot
        return self._train_step(x, y, s)

    def _train_step(self, x, y, s: StepInputs):
        """One eager train step, top to bottom: gather, forward + loss + backward, update."""
        xb, yb = self._gather(x, y, s.idx, s.key, s.aug_words) if s.idx.shape[0] else (None, y[s.idx])  # gather
        if self.comm is not None:
            return self.step_shard(xb, yb, s.n_global, s.hyper, s.slot)   # the same, gradients summed over ranks
        with nvtx_range("train_step"):
            value, correct = self._forward_backward(xb, yb, 1.0, s.slot)  # forward, loss, backward
            self._update(s.hyper)                                         # update
        return value, correct

    def _rank_world(self):
        return (0, 1) if self.comm is None else (self.comm.rank, self.comm.size)

    def _batch(self, order, step):
        """``(this rank's indices, examples in the global batch)``."""
        idx = batch_indices(order, step, self.batch_size, *self._rank_world())
        return idx, min(self.batch_size, int(order.shape[0]) - step * self.batch_size)

    def run_steps(self, x, y, order, epoch: int, steps, steps_per_epoch: int, stats: EpochStats | None = None,
                  on_sync=None, watch=None) -> EpochStats:
        """Run ``steps`` (a range of step numbers) of epoch ``epoch`` over ``order``.

        ``on_sync(stats, n)`` is called after each host read, with ``n`` steps
        newly counted.  ``watch`` (a :class:`~gpucnn.train.watch.Watch`) is
        told before and after every step (it queues device work, no read) and
        at every host read (``watch.at_sync(pending, losses)``, where it reads
        its statistics back).  Raises :class:`~gpucnn.train.NonFiniteLossError` (epoch
        and step 1-based) on a NaN/Inf loss, or when anomaly detection finds one.
        """
        stats = stats if stats is not None else EpochStats()
        self.model.train()
        pending = []
        steps = list(steps)
        lrs, tables = self._hyper_rows(epoch, steps)
        # where this rank's share of each step starts in the epoch's order: it keys the augmentation
        starts = ([batch_start(int(order.shape[0]), st, self.batch_size, *self._rank_world()) for st in steps]
                  if self.augment is not None else [None] * len(steps))
        aug_rows = self._augment_rows(x, y, epoch, starts)
        ring = self._metric_ring(x, min(self.sync_every, len(steps)))
        for i, step in enumerate(steps):
            lr = lrs[i]
            self.optimizer.lr = lr
            if stats.lr_first is None:
                stats.lr_first = lr
            stats.lr_last = lr
            idx, n_global = self._batch(order, step)
            s = StepInputs(idx, n_global, hyper={dtype: table[i] for dtype, table in tables.items()},
                           slot=None if ring is None else (ring[0][len(pending)], ring[1][len(pending)]),
                           key=(epoch, starts[i]), aug_words=None if aug_rows is None else aug_rows[i])
            if watch is not None:
                watch.before_step(epoch, step)
            try:
                value, correct = self._one_step(x, y, s, ring, aug_rows)
            except debug_mod.NonFiniteError as exc:  # anomaly detection named a layer
                raise NonFiniteLossError(f"{exc} at epoch {epoch + 1}, step {step + 1}/{steps_per_epoch} "
                                         f"(lr {lr:g})", epoch=epoch + 1, step=step + 1) from None
            if watch is not None:
                watch.after_step(epoch, step)
            pending.append(PendingStep(step, value, correct, int(idx.shape[0]), lr, n_global))
            if len(pending) >= self.sync_every or step == steps[-1]:
                values, counts = self._read(pending, ring)
                if watch is not None:
                    watch.at_sync(pending, values)
                if self.comm is None:
                    self._drain(pending, values, counts, stats, epoch, steps_per_epoch)
                else:
                    self._drain_reduced(pending, values, counts, stats, epoch, steps_per_epoch)
                if on_sync is not None:
                    on_sync(stats, len(pending))
                pending = []
        return stats

    @staticmethod
    def _read(pending, ring):
        """The pending steps' losses and correct counts on the host (one read of the ring on a GPU)."""
        k = len(pending)
        if ring is not None:
            values = backend.asnumpy(ring[0][:k]).ravel().tolist()
            counts = backend.asnumpy(ring[1][:k]).ravel().tolist()
            return ([v if p.n else None for v, p in zip(values, pending)],
                    [c if p.n else None for c, p in zip(counts, pending)])
        return ([None if p.loss is None else float(p.loss) for p in pending],
                [None if p.correct is None else int(p.correct) for p in pending])

    @staticmethod
    def _drain(pending, values, counts, stats, epoch, steps_per_epoch):
        for p, v, c in zip(pending, values, counts):
            if not math.isfinite(v):
                raise NonFiniteLossError(f"training loss is {v} at epoch {epoch + 1}, step {p.step + 1}/"
                                         f"{steps_per_epoch} (lr {p.lr:g})", epoch=epoch + 1, step=p.step + 1)
            stats.loss_sum += v * p.n
            stats.correct += c
            stats.seen += p.n
            stats.steps += 1

    def _drain_reduced(self, pending, values, counts, stats, epoch, steps_per_epoch):
        """:meth:`_drain` with each step's loss sum and correct count summed over the ranks."""
        k = len(pending)
        local = np.zeros(2 * k, dtype=np.float64)
        for i, p in enumerate(pending):
            if p.n:
                local[i] = values[i] * p.n
                local[k + i] = counts[i]
        total = self.comm.allreduce_scalars(local)
        for i, p in enumerate(pending):
            if not math.isfinite(total[i]):
                raise NonFiniteLossError(f"training loss is {total[i] / p.n_global} at epoch {epoch + 1}, step "
                                         f"{p.step + 1}/{steps_per_epoch} (lr {p.lr:g})", epoch=epoch + 1,
                                         step=p.step + 1, collective=True)
            stats.loss_sum += float(total[i])
            stats.correct += int(total[k + i])
            stats.seen += p.n_global
            stats.steps += 1

    def evaluate(self, x, y, batch_size: int = 1000, return_predictions: bool = False) -> dict:
        """:func:`~gpucnn.train.evaluate` with this trainer's model and loss.

        Data-parallel: each rank evaluates its contiguous shard of ``x``; the
        loss sums and correct counts are summed over the ranks (and
        ``return_predictions`` is ignored: each rank has only its shard's).
        """
        if self.comm is None:
            return evaluate(self.model, x, y, self.loss, batch_size, self.num_classes, return_predictions)
        n = int(x.shape[0])
        start, stop = shard_bounds(n, self.comm.rank, self.comm.size)
        loss_sum, correct, _ = evaluate_sums(self.model, x[start:stop], y[start:stop], self.loss, batch_size,
                                             self.num_classes)
        loss_sum, correct = self.comm.allreduce_scalars([loss_sum, correct])
        return {"loss": float(loss_sum) / n if n else float("nan"),
                "accuracy": int(correct) / n if n else float("nan"), "n": n}
