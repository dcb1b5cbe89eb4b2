"""Learning-rate schedules, per step.

With ``t`` the global step (``epoch * steps_per_epoch + step``, 0-based) and
``T = epochs * steps_per_epoch``:

* ``constant``: ``lr``;
* ``step``: ``lr * lr_gamma ** (epoch // lr_step)``;
* ``cosine`` (default): ``lr * (1 + cos(pi * t / T)) / 2``;

each times a linear warm-up ``(t + 1) / W`` during the first
``W = round(warmup * steps_per_epoch)`` steps (``warmup`` in epochs, default
0.25; 0 disables it).  Without the warm-up, LeNet-5 at SGD lr 0.05 momentum 0.9
can kill its ReLUs in the first steps.
"""
from __future__ import annotations

import math

__all__ = ["learning_rate", "Schedule"]


def learning_rate(cfg, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate for ``step`` (0-based, within ``epoch``, 0-based) of a resolved config."""
    base = cfg.lr
    t = epoch * steps_per_epoch + step
    W = int(round(cfg.warmup * steps_per_epoch))
    warm = (t + 1) / W if t < W else 1.0
    if cfg.lr_schedule == "constant":
        return base * warm
    if cfg.lr_schedule == "step":
        return base * cfg.lr_gamma ** (epoch // cfg.lr_step) * warm
    T = cfg.epochs * steps_per_epoch
    return base * warm * 0.5 * (1.0 + math.cos(math.pi * min(t, T) / T))


class Schedule:
    """``schedule(epoch, step) -> lr`` for a resolved config and an epoch length."""

    def __init__(self, cfg, steps_per_epoch: int):
        self.cfg, self.steps_per_epoch = cfg, int(steps_per_epoch)

    def __call__(self, epoch: int, step: int) -> float:
        return learning_rate(self.cfg, epoch, step, self.steps_per_epoch)
