"""Training: the engine behind ``gpucnn train`` and ``gpucnn evaluate``.

>>> from gpucnn.train import TrainConfig, train          # doctest: +SKIP
>>> result = train(TrainConfig(model="lenet5", epochs=3), out_dir="runs/demo")
>>> result.test_accuracy                                   # doctest: +SKIP
0.99...

One module per job:

* :mod:`.config` -- :class:`TrainConfig`, the defaults, the resume rule;
* :mod:`.schedule` -- learning-rate schedules;
* :mod:`.trainer` -- :class:`Trainer`: one train step and one epoch loop,
  shared by ``gpucnn train``, ``gpucnn bench`` and the tests;
* :mod:`.scaler` -- :class:`LossScaler`, the dynamic loss scaling of fp16;
* :mod:`.evaluation` -- evaluation and the confusion matrix;
* :mod:`.rundir` -- the run directory (config, metrics, checkpoint);
* :mod:`.loop` -- :func:`train`, a whole run;
* :mod:`.parallel` -- the data-parallel parts of :func:`train`
  (``distributed=...``; communicators in :mod:`gpucnn.distributed`).

Data-parallel training
    ``mpiexec -n N gpucnn train --distributed ...`` (or ``train(...,
    distributed=True)`` in a script started by ``mpiexec``) runs the same
    training on N processes: ``batch_size`` is the global batch; every rank
    draws the same permutation each epoch and takes its contiguous shard of
    every batch; parameters (and the optimizer state on resume) are
    broadcast from rank 0; each rank back-propagates its mean loss times
    ``n_rank / n_global`` and the gradients are summed over the ranks as one
    flat buffer per dtype, so the step equals the single-process step on the
    global batch up to rounding (2 ranks x 32 vs 1 x 64 on the CPU: 1e-16
    after 30 float64 steps).  Metrics and the sharded evaluation are summed
    over the ranks; rank 0 alone prints and writes.  Without a launcher,
    ``--distributed`` is one process and bit-identical to a plain run.

Reproducibility
    The model is initialised after ``gpucnn.seed(seed)``.  Epoch ``e`` (0-based)
    is shuffled by its own generator, ``numpy.random.default_rng([seed, e])``,
    so the order of an epoch depends on nothing but the seed and the epoch.
    The checkpoint stores gpucnn's counter-stream state (RReLU's slopes and
    Dropout's masks: the same draws on NumPy and CuPy) and the
    next epoch's shuffling-generator state; Python's ``random`` and NumPy's
    global generator are not used.  On the CPU, the same configuration gives
    bit-identical metrics and weights, and ``--resume`` continues a run bit
    for bit (as long as the schedule's horizon, ``epochs``, is the same: the
    cosine schedule depends on it).  gpucnn's own kernels use no atomics, but
    bit-identical GPU runs (cuBLAS, CuPy reductions) have not been verified.

Defaults (``OPTIMIZER_DEFAULTS``): SGD lr 0.05, momentum 0.9, weight decay
2e-3, batch 64, cosine schedule with a quarter-epoch warm-up; Adam lr 1e-3.
With them LeNet-5 reaches 99.04% / 99.19% / 99.18% MNIST test accuracy after
3 epochs for seeds 0 / 1 / 2 (weight decay 5e-4 gave 99.16% / 98.98%).
The sigmoid networks get their own SGD defaults (:data:`MODEL_DEFAULTS`):
3 epochs give zhang2016 97.65%, seed002_c1 98.23%, seed002_c2 98.37%.
"""
from . import config, evaluation, loop, options, parallel, rundir, scaler, schedule, trainer
from .config import (MODEL_DEFAULTS, OPTIMIZER_DEFAULTS, SCHEDULES, NonFiniteLossError, ResumeConflictError,
                     TrainConfig, resume_config)
from .evaluation import confusion_matrix, evaluate, evaluate_sums
from .loop import Terminated, TrainingInterrupted, TrainResult, make_optimizer, train
from .options import RunOptions
from .rundir import (METRICS_NAME, MetricsWarning, RunDir, RunDirInUse, RunDirWriteError, default_out_dir,
                     read_metrics)
from .scaler import LossScaler
from .schedule import Schedule, learning_rate
from .trainer import EpochStats, Trainer

__all__ = [
    "TrainConfig", "TrainResult", "NonFiniteLossError", "ResumeConflictError", "OPTIMIZER_DEFAULTS",
    "MODEL_DEFAULTS", "SCHEDULES", "train", "evaluate", "evaluate_sums", "confusion_matrix", "learning_rate", "Schedule",
    "Trainer", "EpochStats", "RunDir", "default_out_dir", "read_metrics", "resume_config", "make_optimizer",
    "METRICS_NAME", "TrainingInterrupted", "Terminated", "RunDirInUse", "RunDirWriteError", "MetricsWarning",
    "RunOptions", "LossScaler",
]
