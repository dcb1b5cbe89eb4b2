"""``train()``: a whole run -- configuration, data, model, epochs, checkpoints, metrics.

One epoch is a shuffled pass over the training set in minibatches
(:class:`~gpucnn.train.Trainer`), an evaluation of the test set in eval mode,
a checkpoint written atomically and one line appended to ``metrics.jsonl``
(:class:`~gpucnn.train.rundir.RunDir`).  Data stay on the device: the
normalised dataset is moved once (NumPy on the CPU, CuPy on ``cuda``) and
every batch is indexed there.

With ``distributed=...`` (``mpiexec -n N gpucnn train --distributed``) the
same run is data-parallel (:mod:`gpucnn.train.parallel`,
:mod:`gpucnn.distributed`): rank 0 reads the configuration and the checkpoint
and shares them; parameters (and the optimizer state on resume) are broadcast
from rank 0; each global batch of ``batch_size`` is split over the ranks and
the gradients are summed; metrics and the sharded evaluation are summed over
the ranks; rank 0 alone prints and writes the run directory, then every rank
waits at a barrier.  An exception on any rank aborts the whole job, naming the
rank; the last complete checkpoint stays loadable, also with another number
of ranks.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import backend, checkpoint as ckpt_mod, losses, models, optim, precision
from .. import random as grandom
from .._utils import check_directory_path, inputs_for
from . import parallel
from ..data import load_arrays
from ..data.augment import AUGMENT_SCHEME
from ..data.batching import SHUFFLE_SCHEME, epoch_permutation, shuffle_generator, steps_per_epoch
from .config import NonFiniteLossError, TrainConfig, resume_config
from .datasource import augment_spec, dataset_for, raw_train_images  # noqa: F401 (augment_spec: gpucnn.bench)
from .options import RunOptions
from .rundir import RunDir
from .scaler import LossScaler
from .schedule import Schedule
from .stops import Terminated, TrainingInterrupted, sigterm_stops_like_ctrl_c, stopped_by  # noqa: F401 (re-exported)
from .trainer import EpochStats, Trainer
from .watch import Watch, require_tensorboard

__all__ = ["train", "TrainResult", "make_optimizer", "TrainingInterrupted", "Terminated"]


class _NoBar:
    """What a progress bar does when none is shown: nothing."""

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _progress_bar(progress: bool, total: int, desc: str):
    """A tqdm bar on stderr (shown when it is a terminal), or a silent stand-in when
    ``progress`` is off or tqdm is not installed: training needs no tqdm."""
    if not progress:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="batch", disable=None, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, leave=False)


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    out_dir: Path
    checkpoint: Path | None
    metrics: list = field(default_factory=list)
    model: object = None
    config: TrainConfig | None = None
    device: str = "cpu"
    #: epochs trained by this call, and in total (the last checkpoint's epoch; more than
    #: ``epochs_run`` after a resume)
    epochs_run: int = 0
    epochs_done: int = 0
    seconds: float = 0.0
    images_per_sec: float = 0.0
    #: ranks of a distributed run (1 otherwise) and this process's rank
    world_size: int = 1
    rank: int = 0

    @property
    def test_accuracy(self) -> float | None:
        return self.metrics[-1]["test_accuracy"] if self.metrics else None

    def epochs_phrase(self) -> str:
        """How many epochs this call trained and where the run stands: ``"3 epochs"`` (a whole run
        from the start), ``"5 epochs, 5 of 7 done"`` (stopped early), ``"2 epochs now (6-7), 7 of 7
        done"`` (resumed)."""
        n, done, total = self.epochs_run, self.epochs_done, self.config.epochs
        text = f"{n} epoch{'s' if n != 1 else ''}"
        if n != done:
            first = done - n + 1
            text += " now" + ("" if n == 0 else f" ({done})" if n == 1 else f" ({first}-{done})")
        if n != done or done != total:
            text += f", {done} of {total} done"
        return text

    def summary(self) -> str:
        """The one-line summary ``gpucnn train`` prints last."""
        cfg = self.config
        acc = self.test_accuracy
        acc_s = f"{100 * acc:.2f}%" if acc is not None else "n/a"
        where = self.device + (f", {self.world_size} ranks" if self.world_size > 1 else "")
        return (f"done: {cfg.model} on {cfg.dataset}, {self.epochs_phrase()}, "
                f"test accuracy {acc_s}, {self.images_per_sec:.0f} images/s ({where}), "
                f"{self.seconds:.1f} s, checkpoint {self.checkpoint}")


def make_optimizer(cfg: TrainConfig, model):
    """The optimizer a resolved config asks for."""
    if cfg.optimizer == "sgd":
        return optim.SGD(model, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                         weight_decay=cfg.weight_decay)
    return optim.Adam(model, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _check_stop_after(stop_after):
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                   or stop_after <= 0):
        raise ValueError(f"stop_after must be a positive integer, got stop_after={stop_after!r}")


def _check_rng(ckpt) -> None:
    """The checkpoint's random states must be there and valid: resuming continues them.

    (Silently keeping the current state would give another run than the one
    resumed.)  The ``shuffle`` state is recomputed from the seed, but it
    must still be a generator state.
    """
    rng = ckpt.rng
    checks = {"gpucnn": grandom.check_state, "shuffle": grandom.check_generator_state}
    if "gpucnn" not in rng:
        raise ckpt_mod.CheckpointError(f"{ckpt.path}: cannot resume: the checkpoint's rng has no 'gpucnn' state "
                                       f"(it has {sorted(rng)}); gpucnn's random streams could not continue")
    for key, check in checks.items():
        if key in rng:
            try:
                check(rng[key])
            except ValueError as exc:
                raise ckpt_mod.CheckpointError(f"{ckpt.path}: cannot resume: rng {key!r} is not a valid random "
                                               f"state: {exc}") from None


def augment_phrase(spec) -> str:
    """What an augmentation spec does, as the run's ``augment:`` line says it."""
    shift = spec["max_shift"]
    parts = ([f"random shifts of up to {shift} pixel{'s' if shift != 1 else ''}"] if shift else []) + \
        (["left-right flips"] if spec["flip"] else [])
    return " and ".join(parts) or "nothing (no shifts, no flips)"


def _batch_phrase(batch_size: int, n: int) -> str:
    """``"batch 64"``, or the batch really used when ``batch_size`` is more than the ``n`` training images
    (then every epoch is one step over all of them, as a DataLoader does)."""
    if batch_size <= n:
        return f"batch {batch_size}"
    return f"batch {n} (batch_size {batch_size} is more than the {n} training images: one step of all of them)"


def _check_out_dir(out_dir) -> None:
    """``out_dir`` (when given) must be a directory or a path one can be made at (``ValueError`` naming the file)."""
    if out_dir is not None:
        check_directory_path(out_dir, "the run directory (--out)")


def _run_config(config, resume, say):
    """``(resolved config, checkpoint or None)``; the resume rule is :func:`resume_config`'s."""
    ckpt = ckpt_mod.load_checkpoint(resume) if resume is not None else None
    if ckpt is None:
        return (config or TrainConfig()).resolved(), None
    _check_rng(ckpt)
    given = {} if config is None else asdict(config.resolved())
    cfg = resume_config(ckpt.config, given).resolved()
    if ckpt.config.get("epochs") != cfg.epochs and cfg.lr_schedule == "cosine":
        say(_cosine_note(cfg, int(ckpt.config.get("epochs")), int(ckpt.epoch)))
    return cfg, ckpt


def _cosine_note(cfg, old_epochs: int, done: int) -> str:
    """What a cosine schedule does when a run of ``old_epochs`` resumes after ``done`` with ``cfg.epochs``."""
    def lr_at(epochs):
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(done, epochs) / epochs))

    was, now = lr_at(old_epochs), lr_at(cfg.epochs)
    return (f"note: epochs changed from {old_epochs} to {cfg.epochs}: the cosine schedule now spans "
            f"{cfg.epochs} epochs, so epoch {done + 1} starts at lr {now:.3g} (the {old_epochs}-epoch "
            f"schedule was at {was:.3g} there) and decays to 0 by epoch {cfg.epochs}; this is not the "
            f"same run as {cfg.epochs} epochs from the start")


def train(config: TrainConfig | None = None, *, model=None, loss=None, data=None,
          device: str = "auto", data_dir=None, out_dir=None, resume=None,
          stop_after: int | None = None, nvtx: bool = False, debug: bool = False,
          progress: bool = True, overwrite: bool = False,
          log: Callable[[str], None] | None = print, distributed=None, cuda_graph: bool = True,
          collective_timeout: float | None = None, precision: str = "fp32",
          options: RunOptions | None = None) -> TrainResult:
    """Train, evaluating and checkpointing every epoch.

    Args:
        config: the run's :class:`TrainConfig` (None: defaults, or the
            checkpoint's configuration when resuming).  When resuming, only
            ``epochs`` (the total to reach) may differ from the checkpoint's.
        model: a custom :class:`~gpucnn.layers.Sequential` (then
            ``config.model`` is only a label, e.g. ``"custom"``; seed before
            building it).  Default: ``models.build(config.model)`` after
            ``gpucnn.seed(config.seed)``.  The images are converted to its
            dtype (a float64 model trains on float64 images).
        loss: loss object (default: ``models.make_loss(config.model)``, or
            softmax cross-entropy for a custom model).
        data: an already loaded :class:`gpucnn.data.Dataset`.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        data_dir: where to look for the dataset first.
        out_dir: run directory (default: the resumed one, else
            ``runs/<model>-<timestamp>``).  Refused if it already holds a
            checkpoint, unless ``overwrite`` or resuming into it.
        resume: a run directory or checkpoint file to continue from.
        stop_after: stop after this epoch (1-based) as if interrupted.
        nvtx, debug: enable NVTX ranges / NaN-Inf anomaly detection.
        progress: show a tqdm progress bar (on stderr, when it is a terminal).
        log: called with each human-readable line (None: silent).
        distributed: data-parallel over the processes of an MPI launch:
            True (``"auto"``), ``"mpi"``, ``"nccl"``, ``"single"`` or a
            :class:`gpucnn.distributed.Communicator`; None: this process
            alone.  ``config.batch_size`` is then the global batch; only rank
            0 logs and writes, and ``config``/``resume``/``out_dir`` are
            taken from rank 0.
        collective_timeout: with ``distributed``, seconds a collective waits
            for every rank (default: the communicator's ``timeout``, 600 s
            unless set); a rank that has not arrived by then -- stopped, hung
            -- ends the job, named (:class:`gpucnn.distributed.CollectiveTimeout`).
        precision: the arithmetic of the conv and dense GEMMs, one of
            :data:`gpucnn.precision.MODES` (``"fp32"``, ``"tf32"``, ``"3xtf32"``,
            ``"bf16"``, ``"fp16"``): operands rounded as a tensor core rounds them, FP32
            accumulation and master weights (:mod:`gpucnn.precision`); the
            checkpoint's metrics row and ``metrics.jsonl`` note it.  fp16 trains
            with dynamic loss scaling (:class:`~gpucnn.train.LossScaler`, defaults):
            every metrics row gives the loss scale and the steps skipped so far,
            and the checkpoint keeps the scaler's state, so a resume goes on bit for bit.
        cuda_graph: on a GPU, replay each full-size step as one captured CUDA
            graph (:mod:`gpucnn.train.graph`): the same numbers as the eager
            step, far less host work; a step that fails the capture checks
            runs eagerly after a one-line warning.  False: every step eager.
        options: all of how the run runs as one
            :class:`~gpucnn.train.options.RunOptions` (``gpucnn train`` passes
            one, with ``threads`` too); ``device``, ``nvtx``, ``debug``,
            ``distributed``, ``cuda_graph``, ``collective_timeout`` and ``precision`` are
            shorthands for its fields and must be left out when it is given.

    Raises:
        NonFiniteLossError: the loss became NaN/Inf; the last good checkpoint
            is kept (not overwritten) and named in the message.
        ValueError: bad configuration, or a config that conflicts with the
            checkpoint being resumed.
        gpucnn.checkpoint.CheckpointError: unusable checkpoint.

    In a distributed run with several ranks, the errors that reach the caller
    are those every rank raised alike (``exc.collective``); any other error
    on a rank ends the whole job (``MPI_Abort``) with ``gpucnn: rank R: ...``.
    """
    options = RunOptions.resolve(options, device=device, nvtx=nvtx, debug=debug, distributed=distributed,
                                 cuda_graph=cuda_graph, collective_timeout=collective_timeout, precision=precision)
    say = log or (lambda s: None)
    t_start = time.perf_counter()
    if options.tensorboard is not None:
        require_tensorboard()              # before any data is loaded or directory made
    opts = dict(model=model, loss=loss, data=data, data_dir=data_dir)
    if not options.is_distributed:
        cfg, ckpt = _run_config(config, resume, say)
        _check_stop_after(stop_after)
        _check_out_dir(out_dir)
        dev, why = backend.resolve_device(options.device)
        options.check_device(dev)
        say(f"device: {dev}" + (f" ({backend.gpu_name()})" if dev == "cuda" else "") + f" [{why}]")
        run = _run(cfg, ckpt, dev, say, None, stop_after, progress, options,
                   lambda: RunDir(out_dir, model=cfg.model, resumed=ckpt, overwrite=overwrite, log=say), **opts)
        return run.result(time.perf_counter() - t_start)
    _check_stop_after(stop_after)
    dev, why = backend.resolve_device(options.device)
    options.check_device(dev)
    comm = parallel.communicator(options.distributed, dev)
    say = say if comm.is_root else (lambda s: None)

    def body():
        cfg, ckpt, rundir, metrics = _shared_start(comm, config, resume, out_dir, overwrite, say)
        say(f"device: {dev}" + (f" ({backend.gpu_name()})" if dev == "cuda" else "") + f" [{why}]")
        say(f"distributed: {comm.describe()}; global batch {cfg.batch_size}")
        run = _run(cfg, ckpt, dev, say, comm, stop_after, progress and comm.is_root, options, lambda: rundir,
                   metrics=metrics, **opts)
        return run.result(time.perf_counter() - t_start)

    if options.collective_timeout is None:
        return parallel.guarded(comm, body)
    previous, comm.timeout = comm.timeout, options.collective_timeout
    try:                                   # for this run: the communicator may be used again
        return parallel.guarded(comm, body)
    finally:
        comm.timeout = previous


def _run(cfg, ckpt, dev, say, comm, stop_after, progress, options, make_rundir, *, metrics=None,
         **opts) -> "_Run":
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_stops_like_ctrl_c())
        stack.enter_context(options.applied(say, note=comm is None or comm.is_root))
        # the directory is claimed once the data and the model are there (a refused run leaves
        # none behind), and owned until the run ends
        run = _Run.prepare(cfg, ckpt, dev, say, comm, lambda: stack.enter_context(make_rundir()), metrics,
                           cuda_graph=options.cuda_graph, **opts)
        if comm is None or comm.is_root:     # rank 0 alone writes the run directory
            run.watch = stack.enter_context(contextlib.closing(run.make_watch(options)))
        run.epochs(stop_after, progress)
    return run


def _shared_start(comm, config, resume, out_dir, overwrite, say):
    """Rank 0 resolves the configuration, checkpoint and run directory; every rank gets them.

    Returns ``(config, checkpoint or None, RunDir, metrics rows kept)``; on
    the other ranks the checkpoint holds no tensors (they come by broadcast)
    and the RunDir writes nothing.
    """
    local = {}

    def prepare():
        cfg, ckpt = _run_config(config, resume, say)
        _check_out_dir(out_dir)
        rundir = RunDir(out_dir, model=cfg.model, resumed=ckpt, overwrite=overwrite, log=say)
        try:
            metrics = rundir.previous_metrics()
        except BaseException:
            rundir.close()
            raise
        local.update(cfg=cfg, ckpt=ckpt, rundir=rundir)
        return {"config": asdict(cfg), "out": str(rundir.path), "metrics": metrics,
                "resume": parallel.resume_meta(ckpt)}

    plan = parallel.share(comm, prepare)
    if comm.is_root:
        return local["cfg"], local["ckpt"], local["rundir"], plan["metrics"]
    ckpt = parallel.resume_point(plan["resume"])
    rundir = RunDir(plan["out"], resumed=ckpt, writer=False)
    return TrainConfig(**plan["config"]), ckpt, rundir, plan["metrics"]


class _Run:
    """The state of one :func:`train` call between preparation and the result."""

    @classmethod
    def prepare(cls, cfg, ckpt, dev, say, comm, make_rundir, metrics, *, model, loss, data, data_dir, cuda_graph):
        """Load the data and build the model, then create the run directory (``make_rundir()``): a run
        refused on the way (a bad ``subset``, a missing dataset) leaves no empty directory behind."""
        self = cls()
        self.cfg, self.ckpt, self.dev, self.say, self.comm = cfg, ckpt, dev, say, comm
        ds = data if data is not None else dataset_for(cfg, data_dir, say)
        self.data = ds
        self.x_tr, self.y_tr, self.x_te, self.y_te, classes = load_arrays(
            cfg.dataset, data_dir, cfg.subset, cfg.test_subset, "cpu" if dev == "cuda" else dev, ds)
        self.raw_train = raw_train_images(ds, cfg, dev)
        if dev == "cuda":     # the float training set goes up only when the raw bytes do not
            self._host_x_tr = self.x_tr
            self.x_tr = self.raw_train if self.raw_train is not None else backend.to_device(self.x_tr, dev)
            self.y_tr, self.x_te, self.y_te = (backend.to_device(a, dev) for a in (self.y_tr, self.x_te, self.y_te))
        self.classes = classes
        self.num_classes = len(classes)
        self.n = int(self.x_tr.shape[0])
        self.steps = steps_per_epoch(self.n, cfg.batch_size)
        say(f"data: {cfg.dataset}, {self.n} training / {int(self.x_te.shape[0])} test images of "
            f"{'x'.join(map(str, ds.in_shape))}, {self.num_classes} classes"
            + (f" (first {cfg.subset} training images)" if cfg.subset else "")
            + (f", from {ds.source}" if ds.source is not None else " (given in memory)"))
        self.model, self.loss = self._model_and_loss(model, loss)
        self._inputs_to_model_dtype()
        self.rundir = make_rundir()
        self.opt = make_optimizer(cfg, self.model)
        self.rundir.check_space(self.model, self.opt)   # before any training, not after an epoch
        self.scaler = LossScaler() if precision.current() in precision.LOSS_SCALED else None
        self.start_epoch = 0
        if ckpt is not None:
            self._resume(ckpt)
        elif comm is not None:
            parallel.broadcast_state(comm, self.opt)
        self.metrics = self.rundir.previous_metrics() if metrics is None else list(metrics)
        self.rundir.start(cfg, self.metrics)
        say(f"model: {cfg.model} ({self.model.num_parameters()} parameters), {cfg.optimizer} lr {cfg.lr:g}"
            + (f" momentum {cfg.momentum:g}" if cfg.optimizer == "sgd" and cfg.momentum else "")
            + f" {cfg.lr_schedule} schedule, {_batch_phrase(cfg.batch_size, self.n)}, {cfg.epochs} "
              f"epoch{'s' if cfg.epochs != 1 else ''}, precision {precision.current()}"
            + (f" with dynamic loss scaling (scale {self.scaler.scale:g})" if self.scaler is not None else "")
            + f"; writing to {self.rundir.path}")
        self.trainer = Trainer(self.model, self.loss, self.opt, batch_size=cfg.batch_size,
                               schedule=Schedule(cfg, self.steps), num_classes=self.num_classes, comm=comm,
                               cuda_graph=cuda_graph, augment=self._augment_spec(),
                               normalize=(ds.mean, ds.std) if self.raw_train is not None else None,
                               loss_scaler=self.scaler)
        self.epochs_run, self.train_images, self.train_seconds = 0, 0, 0.0
        self.classes, self.watch = classes, None
        return self

    def make_watch(self, options: RunOptions) -> Watch:
        """The run's :class:`~gpucnn.train.watch.Watch`: ``layers.jsonl`` every ``options.log_every`` steps,
        and the TensorBoard log when ``options.tensorboard`` asks for one."""
        watch = Watch(self.rundir.path, self.model, self.opt, steps_per_epoch=self.steps,
                      log_every=options.log_every, tensorboard=options.tensorboard, start_epoch=self.start_epoch,
                      config=self.cfg, x_test=self.x_te, classes=self.classes, device=self.dev)
        if watch.writer is not None:
            self.say(f"tensorboard: writing to {watch.tb_dir} (tensorboard --logdir {watch.tb_dir})")
        return watch

    def _augment_spec(self):
        spec = augment_spec(self.cfg, self.data)
        if spec is not None:
            self.say(f"augment: {augment_phrase(spec)}")
        return spec

    def _resume(self, ckpt):
        """Load the checkpoint (rank 0 when distributed, then broadcast to the other ranks)."""
        comm = self.comm
        if comm is None or comm.is_root:
            ckpt_mod.load_into(ckpt, self.model, self.opt, self.scaler)
        elif self.scaler is not None and ckpt.loss_scaler is not None:   # rank 0's, shared with the plan
            self.scaler.load_state_dict(ckpt.loss_scaler)
        if comm is not None:
            meta = parallel.resume_meta(ckpt) if comm.is_root else None
            meta = comm.broadcast_json(meta and {"slots": meta["slots"], "step_count": meta["step_count"]})
            parallel.broadcast_state(comm, self.opt, meta["slots"], meta["step_count"])
        scaler_state = ckpt.loss_scaler
        if self.scaler is not None and scaler_state is None:
            self.say(f"note: {ckpt.path} holds no loss scale (its run did not use fp16): the loss scale starts "
                     f"at {self.scaler.scale:g}")
        elif self.scaler is None and scaler_state is not None:
            self.say(f"note: {ckpt.path} holds an fp16 run's loss scale, which precision {precision.current()} "
                     "does not use")
        self.start_epoch = ckpt.epoch
        grandom.set_state(ckpt.rng["gpucnn"])   # checked by _check_rng
        self.say(f"resumed from {ckpt.path} after epoch {ckpt.epoch}")
        for key, scheme, on in (("shuffle_scheme", SHUFFLE_SCHEME, True),
                                ("augment_scheme", AUGMENT_SCHEME, bool(self.cfg.augment))):
            if on and ckpt.rng.get(key) != scheme:
                warnings.warn(f"{ckpt.path} was written under another {key.replace('_', ' ')} "
                              f"({ckpt.rng.get(key)!r}, this gpucnn: {scheme!r}): the resumed run goes on, "
                              f"but not bit for bit the run it continues", RuntimeWarning, stacklevel=2)

    def _inputs_to_model_dtype(self):
        """Images follow a floating model's dtype (float64 models; float32 data stay as they are)."""
        if self.raw_train is not None and np.dtype(getattr(self.model, "dtype", None) or np.float32) != np.float32:
            # the uint8 kernel makes float32 batches: a float64 model trains from the float set
            self.raw_train, self.x_tr = None, backend.to_device(self._host_x_tr, self.dev)
        if self.raw_train is None:
            self.x_tr = inputs_for(self.model, self.x_tr)
        self.x_te = inputs_for(self.model, self.x_te)

    def _model_and_loss(self, model, loss):
        cfg, dev = self.cfg, self.dev
        if model is None:
            grandom.seed(cfg.seed)
            model = models.build(cfg.model, in_shape=self.data.in_shape, num_classes=self.num_classes)
        model.classes, model.mean, model.std = tuple(self.classes), self.data.mean, self.data.std
        model.to(dev)
        if loss is None:
            loss = models.make_loss(cfg.model) if cfg.model in models.MODELS else losses.SoftmaxCrossEntropy()
            if isinstance(loss, losses.SoftmaxCrossEntropy) and dev == "cuda":
                # labels come from a verified dataset; on the GPU the range
                # check would cost a host sync every step
                loss.check_labels = False
        return model, loss

    def epochs(self, stop_after, progress):
        """Run the epochs left; Ctrl-C or SIGTERM anywhere in them raises :class:`TrainingInterrupted`."""
        try:
            self._epochs(stop_after, progress)
        except KeyboardInterrupt as exc:
            rd = self.rundir
            current = min(rd.saved_epoch + 1, self.cfg.epochs)   # the epoch cut short (or about to start)
            raise TrainingInterrupted(current, rd.saved_epoch, rd.last_good or rd.checkpoint,
                                      getattr(exc, "signum", signal.SIGINT)) from None

    def _epochs(self, stop_after, progress):
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs):
            row = self._epoch(epoch, progress)
            self.say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc "
                     f"{100 * row['train_accuracy']:.2f}%, test loss {row['test_loss']:.4f} acc "
                     f"{100 * row['test_accuracy']:.2f}%, {row['images_per_sec']:.0f} images/s, "
                     f"{row['seconds']:.1f} s"
                     + (f", loss scale {row['loss_scale']:g} ({row['skipped_steps']} step"
                        f"{'s' if row['skipped_steps'] != 1 else ''} skipped so far)" if "loss_scale" in row else ""))
            if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.epochs:
                self.say(f"stopping after epoch {epoch + 1} as asked; continue with --resume {self.rundir.path}")
                break
        if self.epochs_run == 0 and self.ckpt is not None:
            self.say(f"nothing to do: the checkpoint already has {self.start_epoch} of {cfg.epochs} epochs")

    def _epoch(self, epoch, progress):
        cfg, dev, comm = self.cfg, self.dev, self.comm
        t_epoch = time.perf_counter()
        self.rundir.check_space(self.model, self.opt)
        order = backend.to_device(epoch_permutation(cfg.seed, epoch, self.n), dev)
        stats = self._train_steps(epoch, order, progress)
        backend.synchronize(dev)
        t_train = time.perf_counter() - t_epoch
        if comm is not None:  # the slowest rank sets the pace
            t_train = float(comm.allreduce_scalars([t_train], op="max")[0])
        confusion = self.watch is not None and self.watch.writer is not None and comm is None
        ev = self.trainer.evaluate(self.x_te, self.y_te, cfg.eval_batch_size, return_predictions=confusion)
        self.train_images += stats.seen
        self.train_seconds += t_train
        row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
               "test_loss": ev["loss"], "test_accuracy": ev["accuracy"], "lr": stats.lr_first,
               "lr_end": stats.lr_last, "images_per_sec": stats.seen / t_train if t_train > 0 else float("nan"),
               "train_seconds": t_train, "seconds": time.perf_counter() - t_epoch, "device": dev,
               "precision": precision.current()}
        if self.scaler is not None:     # a host read, at the epoch's end only
            row["loss_scale"], row["skipped_steps"] = self.scaler.scale, self.scaler.skipped_steps
        if comm is not None:
            row["ranks"] = comm.size
            parallel.check_in_sync(comm, self.opt, epoch + 1)
        rng = {"gpucnn": grandom.get_state(), "shuffle": shuffle_generator(cfg.seed, epoch + 1).bit_generator.state,
               "shuffle_scheme": SHUFFLE_SCHEME, "augment_scheme": AUGMENT_SCHEME}
        self.rundir.save_epoch(self.model, self.opt, config=cfg, epoch=epoch + 1, rng=rng, row=row,
                               loss_scaler=self.scaler)
        row["seconds"] = time.perf_counter() - t_epoch  # include the checkpoint write
        self.metrics.append(row)
        self.rundir.append_metrics(row)
        if self.watch is not None:
            self.watch.epoch_end(row, ev.get("predictions"), backend.asnumpy(self.y_te) if confusion else None,
                                 cfg.batch_size)
        if comm is not None:  # rank 0 has written the checkpoint and the metrics
            comm.barrier()
        self.epochs_run += 1
        return row

    def _train_steps(self, epoch, order, progress) -> EpochStats:
        cfg, t0 = self.cfg, time.perf_counter()
        bar = _progress_bar(progress, total=self.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}")

        def on_sync(stats, n):
            bar.update(n)
            if stats.steps % 20 == 1 or stats.steps == self.steps:
                el = time.perf_counter() - t0
                bar.set_postfix(loss=f"{stats.loss:.4f}", acc=f"{100 * stats.accuracy:.2f}%",
                                img_s=f"{stats.seen / el:.0f}" if el > 0 else "-", lr=f"{stats.lr_last:.3g}",
                                refresh=False)

        try:
            return self.trainer.run_steps(self.x_tr, self.y_tr, order, epoch, range(self.steps), self.steps,
                                          on_sync=on_sync, watch=self.watch)
        except NonFiniteLossError as exc:
            hint = "" if "layer" in str(exc) else (". Try a smaller --lr, or --debug to find the first layer "
                                                   "producing NaN/Inf")
            raise NonFiniteLossError(f"{exc}; stopping: {self.rundir.kept(epoch)}{hint}", epoch=exc.epoch,
                                     step=exc.step, checkpoint=self.rundir.last_good,
                                     collective=exc.collective) from None
        finally:
            bar.close()

    def result(self, seconds) -> TrainResult:
        rd = self.rundir
        ck = rd.checkpoint if (rd.writer and rd.checkpoint.exists()) or (not rd.writer and self.epochs_run) \
            else rd.last_good
        comm = self.comm
        return TrainResult(out_dir=rd.path, checkpoint=ck, metrics=self.metrics, model=self.model,
                           config=self.cfg, device=self.dev, epochs_run=self.epochs_run,
                           epochs_done=self.start_epoch + self.epochs_run, seconds=seconds,
                           images_per_sec=(self.train_images / self.train_seconds) if self.train_seconds > 0 else 0.0,
                           world_size=comm.size if comm is not None else 1, rank=comm.rank if comm is not None else 0)
