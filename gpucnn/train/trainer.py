"""One train step and one epoch loop: what ``gpucnn train``, ``gpucnn bench`` and the tests run.

A step is forward, loss, backward (without the first layer's input gradient)
and one optimizer step, in an NVTX range ``train_step``.  Its loss and its
count of correct predictions stay on the device; :meth:`Trainer.run_steps`
reads them back every ``sync_every`` steps (every step on the CPU, every 50
on a GPU, so the GPU is not stalled by a host sync per step), checks them for
NaN/Inf and adds them up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import debug as debug_mod
from ..data.batching import batch_indices
from ..nvtx import nvtx_range
from .config import NonFiniteLossError
from .evaluation import evaluate, loss_targets

__all__ = ["Trainer", "EpochStats"]


@dataclass
class EpochStats:
    """Running totals of the steps run so far in one epoch."""

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
        batch_size: examples per step.
        schedule: ``schedule(epoch, step) -> lr`` set before every step; None
            keeps the optimizer's ``lr``.
        num_classes: for one-hot targets.
        sync_every: steps between host reads of the loss (default: 1 on the
            CPU, 50 on a GPU).
    """

    def __init__(self, model, loss, optimizer, *, batch_size: int, schedule=None, num_classes: int = 10,
                 sync_every: int | None = None):
        self.model, self.loss, self.optimizer = model, loss, optimizer
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
            idx = batch_indices(order, step, self.batch_size)
            try:
                value, correct = self.step(x[idx], y[idx])
            except debug_mod.NonFiniteError as exc:  # anomaly detection named a layer
                raise NonFiniteLossError(f"{exc} at epoch {epoch + 1}, step {step + 1}/{steps_per_epoch} "
                                         f"(lr {lr:g})", epoch=epoch + 1, step=step + 1) from None
            pending.append((step, value, correct, int(idx.shape[0]), lr))
            if len(pending) >= self.sync_every or step == steps[-1]:
                self._drain(pending, stats, epoch, steps_per_epoch)
                if on_sync is not None:
                    on_sync(stats, len(pending))
                pending = []
        return stats

    @staticmethod
    def _drain(pending, stats, epoch, steps_per_epoch):
        values = [float(p[1]) for p in pending]  # one host sync for the whole batch of steps
        for (step, _, correct, n, lr), v in zip(pending, values):
            if not math.isfinite(v):
                raise NonFiniteLossError(f"training loss is {v} at epoch {epoch + 1}, step {step + 1}/"
                                         f"{steps_per_epoch} (lr {lr:g})", epoch=epoch + 1, step=step + 1)
            stats.loss_sum += v * n
            stats.correct += int(correct)
            stats.seen += n
            stats.steps += 1

    def evaluate(self, x, y, batch_size: int = 1000) -> dict:
        """:func:`~gpucnn.train.evaluate` with this trainer's model and loss."""
        return evaluate(self.model, x, y, self.loss, batch_size, self.num_classes)
