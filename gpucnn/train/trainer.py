"""One train step and one epoch loop: what ``gpucnn train``, ``gpucnn bench`` and the tests run.

A step is forward, loss, backward (without the first layer's input gradient)
and one optimizer step, in an NVTX range ``train_step``.  Its loss and its
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

import math
from dataclasses import dataclass

import numpy as np

from .. import debug as debug_mod
from ..data.batching import batch_indices, shard_bounds
from ..nvtx import nvtx_range
from .config import NonFiniteLossError
from .evaluation import evaluate, evaluate_sums, loss_targets

__all__ = ["Trainer", "EpochStats"]


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
    """

    def __init__(self, model, loss, optimizer, *, batch_size: int, schedule=None, num_classes: int = 10,
                 sync_every: int | None = None, comm=None):
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.comm = comm
        self.batch_size = int(batch_size)
        self.schedule = schedule
        self.num_classes = num_classes
        device = getattr(model, "device", "cpu")
        self.sync_every = int(sync_every) if sync_every else (1 if device == "cpu" else 50)

    def step(self, xb, yb):
        """One training step on a batch; returns ``(loss, correct)`` as 0-d device arrays."""
        with nvtx_range("train_step"):
            out = self.model.forward(xb)
            value = self.loss.forward(out, loss_targets(self.loss, yb, self.num_classes, out.dtype))
            self.model.backward(self.loss.backward(), input_grad=False)
            self.optimizer.step()
        return value, (out.argmax(axis=1) == yb).sum()

    def step_shard(self, xb, yb, n_global: int):
        """One data-parallel step on this rank's shard of a global batch of ``n_global`` examples.

        Returns ``(local mean loss, local correct)`` as 0-d device arrays
        (``(None, None)`` for an empty shard, which contributes zero gradients).
        """
        n = int(xb.shape[0])
        value = correct = None
        with nvtx_range("train_step"):
            if n:
                out = self.model.forward(xb)
                value = self.loss.forward(out, loss_targets(self.loss, yb, self.num_classes, out.dtype))
                self.model.backward(self.loss.backward(n / n_global), input_grad=False)
                correct = (out.argmax(axis=1) == yb).sum()
            else:  # more ranks than examples in this (last) batch
                for group in self.optimizer.groups:
                    group.grads.fill(0)
            with nvtx_range("allreduce_grads"):
                for group in self.optimizer.groups:
                    self.comm.allreduce_sum(group.grads)
            self.optimizer.step()
        return value, correct

    def _batch(self, order, step):
        """``(this rank's indices, examples in the global batch)``."""
        if self.comm is None:
            idx = batch_indices(order, step, self.batch_size)
            return idx, int(idx.shape[0])
        idx = batch_indices(order, step, self.batch_size, self.comm.rank, self.comm.size)
        return idx, min(self.batch_size, int(order.shape[0]) - step * self.batch_size)

    def run_steps(self, x, y, order, epoch: int, steps, steps_per_epoch: int, stats: EpochStats | None = None,
                  on_sync=None) -> EpochStats:
        """Run ``steps`` (a range of step numbers) of epoch ``epoch`` over ``order``.

        ``on_sync(stats, n)`` is called after each host read, with ``n`` steps
        newly counted.  Raises :class:`~gpucnn.train.NonFiniteLossError` (epoch
        and step 1-based) on a NaN/Inf loss, or when anomaly detection finds one.
        """
        stats = stats if stats is not None else EpochStats()
        self.model.train()
        pending = []
        steps = list(steps)
        for step in steps:
            lr = self.schedule(epoch, step) if self.schedule is not None else self.optimizer.lr
            self.optimizer.lr = lr
            if stats.lr_first is None:
                stats.lr_first = lr
            stats.lr_last = lr
            idx, n_global = self._batch(order, step)
            try:
                if self.comm is None:
                    value, correct = self.step(x[idx], y[idx])
                else:
                    value, correct = self.step_shard(x[idx], y[idx], n_global)
            except debug_mod.NonFiniteError as exc:  # anomaly detection named a layer
                raise NonFiniteLossError(f"{exc} at epoch {epoch + 1}, step {step + 1}/{steps_per_epoch} "
                                         f"(lr {lr:g})", epoch=epoch + 1, step=step + 1) from None
            pending.append((step, value, correct, int(idx.shape[0]), lr, n_global))
            if len(pending) >= self.sync_every or step == steps[-1]:
                if self.comm is None:
                    self._drain(pending, stats, epoch, steps_per_epoch)
                else:
                    self._drain_reduced(pending, stats, epoch, steps_per_epoch)
                if on_sync is not None:
                    on_sync(stats, len(pending))
                pending = []
        return stats

    @staticmethod
    def _drain(pending, stats, epoch, steps_per_epoch):
        values = [float(p[1]) for p in pending]  # one host sync for the whole batch of steps
        for (step, _, correct, n, lr, _), v in zip(pending, values):
            if not math.isfinite(v):
                raise NonFiniteLossError(f"training loss is {v} at epoch {epoch + 1}, step {step + 1}/"
                                         f"{steps_per_epoch} (lr {lr:g})", epoch=epoch + 1, step=step + 1)
            stats.loss_sum += v * n
            stats.correct += int(correct)
            stats.seen += n
            stats.steps += 1

    def _drain_reduced(self, pending, stats, epoch, steps_per_epoch):
        """:meth:`_drain` with each step's loss sum and correct count summed over the ranks."""
        k = len(pending)
        local = np.zeros(2 * k, dtype=np.float64)
        for i, (_, value, correct, n, _, _) in enumerate(pending):
            if n:
                local[i] = float(value) * n
                local[k + i] = int(correct)
        total = self.comm.allreduce_scalars(local)
        for i, (step, _, _, _, lr, n_global) in enumerate(pending):
            if not math.isfinite(total[i]):
                raise NonFiniteLossError(f"training loss is {total[i] / n_global} at epoch {epoch + 1}, step "
                                         f"{step + 1}/{steps_per_epoch} (lr {lr:g})", epoch=epoch + 1,
                                         step=step + 1, collective=True)
            stats.loss_sum += float(total[i])
            stats.correct += int(total[k + i])
            stats.seen += n_global
            stats.steps += 1

    def evaluate(self, x, y, batch_size: int = 1000) -> dict:
        """:func:`~gpucnn.train.evaluate` with this trainer's model and loss.

        Data-parallel: each rank evaluates its contiguous shard of ``x``; the
        loss sums and correct counts are summed over the ranks.
        """
        if self.comm is None:
            return evaluate(self.model, x, y, self.loss, batch_size, self.num_classes)
        n = int(x.shape[0])
        start, stop = shard_bounds(n, self.comm.rank, self.comm.size)
        loss_sum, correct, _ = evaluate_sums(self.model, x[start:stop], y[start:stop], self.loss, batch_size,
                                             self.num_classes)
        loss_sum, correct = self.comm.allreduce_scalars([loss_sum, correct])
        return {"loss": float(loss_sum) / n if n else float("nan"),
                "accuracy": int(correct) / n if n else float("nan"), "n": n}
