"""Watching a run: per-layer statistics (``layers.jsonl``) and, with ``--tensorboard``, TensorBoard event files.

Every ``log_every`` steps (global step ``g`` with ``g % log_every == 0``) the
:class:`Watch` computes, for every parameter of the model, ``||w||``,
``||grad||`` and ``||update||`` (the change the optimizer made in that one
step: the parameters are copied on the device just before it), and with
TensorBoard a histogram of the weights and of the gradients.  All of it is
computed on the device with the array module of the parameters (NumPy or
CuPy alike), into one row per logged step of a device buffer; nothing is
read back then.  The rows are read back when the trainer reads its losses
anyway (:meth:`~gpucnn.train.Trainer.run_steps`, every ``sync_every``
steps), all of them in one copy with no device work queued before it:
watching adds no point where the host waits for the device.

``layers.jsonl`` (in the run directory, written with or without
TensorBoard) holds one JSON object per logged step::

    {"epoch": 1, "step": 20, "lr": 0.0123, "loss": 0.871,
     "layers": {"0.weight": {"kind": "Conv2D", "size": 150, "weight_norm": ..., "grad_norm": ...,
                             "update_norm": ..., "update_ratio": ...}, ...}}

``update_ratio`` is ``||update|| / ||w||``, the usual health signal for a
learning rate (around 1e-3 per step is typical; far above it the step is too
large, far below it the layer barely learns).  ``gpucnn plot`` draws the
gradient-flow chart from it.

The TensorBoard run (``RUN_DIR/tb`` unless given) holds, with every step
axis the global step (epoch scalars at the epoch's last step):

* scalars ``accuracy/train``, ``accuracy/test``, ``loss/train``,
  ``loss/test``, ``lr/epoch`` (the epoch's first), ``speed/images_per_sec``
  (one per epoch, the values of ``metrics.jsonl``: :data:`EPOCH_SCALARS`),
  ``loss/step`` and ``lr/step`` (every logged step),
  ``update_ratio/<param>``, and ``time/forward/<stage>`` /
  ``time/backward/<stage>`` (seconds, per epoch: the median of
  :class:`gpucnn.timing.Timer`, the timer of ``gpucnn bench``, over a
  batch of test images);
* histograms ``weights/<param>`` and ``grads/<param>``;
* images ``filters`` (the first convolution's filters, in colour on RGB
  input), ``features/<stage>`` (every convolution stage's output for the
  first :data:`~gpucnn.views.FEATURE_IMAGES` test images) and
  ``confusion_matrix`` (the test set, every epoch);
* the configuration as text (``config``) and as hparams.

The epoch-end work (images, stage times) runs after the epoch's training
time is taken; the stage timing runs the model's stages in train mode and
puts back the random state, the buffers and the gradients, so a run with
``--tensorboard`` computes the same bits as one without.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import backend, views
from .. import random as grandom

__all__ = ["Watch", "TensorBoardMissing", "require_tensorboard", "LAYERS_NAME", "DEFAULT_LOG_EVERY",
           "HIST_BINS", "EPOCH_SCALARS", "read_layer_stats"]

LAYERS_NAME = "layers.jsonl"
#: steps between logged steps by default, as PyTorch Lightning's log_every_n_steps (its cost: the README, "Watching a run")
DEFAULT_LOG_EVERY = 50
#: buckets of each histogram
HIST_BINS = 30
#: the TensorBoard tag of each ``metrics.jsonl`` value, logged at every epoch's end (TensorBoard sorts its
#: groups by name: accuracy and loss come first, train and test side by side)
EPOCH_SCALARS = (("accuracy/train", "train_accuracy"), ("accuracy/test", "test_accuracy"),
                 ("loss/train", "train_loss"), ("loss/test", "test_loss"), ("lr/epoch", "lr"),
                 ("speed/images_per_sec", "images_per_sec"))
_INSTALL = 'pip install "gpucnn[tensorboard]"'


class TensorBoardMissing(ImportError):
    """``--tensorboard`` was asked for and tensorboardX is not installed."""


def require_tensorboard():
    """tensorboardX's ``SummaryWriter``, or :class:`TensorBoardMissing` naming the extra to install."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as exc:
        raise TensorBoardMissing(f"--tensorboard needs tensorboardX, which is not importable ({exc}); "
                                 f"install it with: {_INSTALL}") from None
    return SummaryWriter


def read_layer_stats(path) -> list[dict]:
    """The rows of a ``layers.jsonl`` (a file or a run directory); unreadable lines are skipped."""
    p = Path(path)
    p = p / LAYERS_NAME if p.is_dir() else p
    rows = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("layers"), dict):
            rows.append(row)
    return rows


def _histogram(xp, v, bins: int):
    """``[min, max, sum, count_0 .. count_{bins-1}]`` of ``v`` (float64, on ``v``'s device): equal buckets
    from min to max, computed without a host read.  A non-finite ``v`` (the gradients of an fp16 step
    whose loss scale overflowed, which the step skipped) gives a non-finite min, max or sum and puts
    what cannot be placed in the first bucket, rather than a bucket index out of range."""
    mn, mx = v.min(), v.max()
    with np.errstate(invalid="ignore"):                 # inf - inf: NaN, placed in bucket 0 below
        span = mx - mn
        ok = (span > 0) & (span < np.inf)
        scale = ok * (bins / xp.where(ok, span, 1))
        pos = (v - mn) * scale
    idx = xp.minimum(xp.where(pos > 0, pos, 0), bins - 1).astype(np.int32)   # NaN -> 0, before the cast
    counts = xp.bincount(idx.ravel(), minlength=bins)
    return xp.concatenate([xp.stack([mn, mx, v.sum()]).astype(np.float64), counts.astype(np.float64)])


class Watch:
    """The per-layer statistics and the TensorBoard log of one run (see the module docstring).

    Args:
        path: the run directory (``layers.jsonl`` goes there).
        model, optimizer: the run's (the optimizer's flat groups are the parameters watched).
        steps_per_epoch: for the global step.
        log_every: steps between logged steps; 0: no per-step statistics.
        tensorboard: None (no TensorBoard), True (``path / "tb"``) or a directory.
        start_epoch: epochs already done (a resumed run keeps the ``layers.jsonl`` rows up to it).
        config: the run's :class:`~gpucnn.train.TrainConfig` (text and hparams).
        x_test, classes: test images (NCHW, on the device) for the feature maps and stage times; class names.
    """

    def __init__(self, path, model, optimizer, *, steps_per_epoch: int, log_every: int, tensorboard=None,
                 start_epoch: int = 0, config=None, x_test=None, classes=None, device: str = "cpu"):
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
            raise ValueError(f"log_every must be a non-negative integer, got log_every={log_every!r}")
        self.model, self.optimizer, self.device = model, optimizer, device
        self.spe, self.every = int(steps_per_epoch), int(log_every)
        self.path = Path(path)
        self.classes = classes
        self.x_test = x_test
        self._pending: list = []           # (global step, epoch) of the logged steps not read back yet
        self._ring = None                  # their statistics, a row each, on the device
        self._snap = None
        self._names = [(name, type(layer).__name__, int(np.prod(shape)))
                       for g in optimizer.groups for name, layer, _, _, shape in g.entries]
        self.writer = None
        self._layers_file = self._open_layers(start_epoch)
        if tensorboard is not None:
            SummaryWriter = require_tensorboard()
            self.tb_dir = self.path / "tb" if tensorboard is True else Path(tensorboard)
            self.writer = SummaryWriter(log_dir=str(self.tb_dir), flush_secs=10)
            if config is not None and start_epoch == 0:
                self._log_config(config)

    # -- layers.jsonl ------------------------------------------------------------------------
    def _open_layers(self, start_epoch):
        """``layers.jsonl`` for appending: emptied for a new run; a resumed run keeps its rows up to
        ``start_epoch`` (the checkpoint's), as ``metrics.jsonl`` does.  With ``log_every`` 0 and no rows
        kept there is no file (None), so no stale one from an earlier run in the directory either."""
        p = self.path / LAYERS_NAME
        kept = [json.dumps(r) + "\n" for r in read_layer_stats(p) if r.get("epoch", 0) <= start_epoch] \
            if start_epoch and p.exists() else []
        with self._writing():
            if not self.every and not kept:
                p.unlink(missing_ok=True)
                return None
            p.write_text("".join(kept), encoding="utf-8")
            return open(p, "a", encoding="utf-8")

    @contextlib.contextmanager
    def _writing(self):
        """An OSError writing ``layers.jsonl`` as a :class:`~gpucnn.train.rundir.RunDirWriteError` naming it."""
        from .rundir import RunDirWriteError

        try:
            yield
        except OSError as exc:
            raise RunDirWriteError(f"cannot write {self.path / LAYERS_NAME} ({exc.strerror or exc})") from exc

    # -- the step hooks (Trainer.run_steps) --------------------------------------------------
    def _logged(self, epoch: int, step: int) -> int | None:
        g = epoch * self.spe + step + 1
        return g if self.every and g % self.every == 0 else None

    def before_step(self, epoch: int, step: int) -> None:
        """Before a logged step: copy the parameters (on the device) to measure the step's update."""
        if self._logged(epoch, step) is None:
            return
        if self._snap is None:
            self._snap = [backend.get_array_module(g.params).empty_like(g.params) for g in self.optimizer.groups]
        for buf, g in zip(self._snap, self.optimizer.groups):
            buf[...] = g.params

    def after_step(self, epoch: int, step: int) -> None:
        """After a logged step: its statistics, as one device vector kept until the next host read."""
        g = self._logged(epoch, step)
        if g is None:
            return
        parts = []
        hist = self.writer is not None
        for snap, group in zip(self._snap, self.optimizer.groups):
            xp = backend.get_array_module(group.params)
            for name, layer, key, off, shape in group.entries:
                w, gr = layer.params[key].ravel(), layer.grads[key].ravel()
                d = w - snap[off:off + w.size]
                parts.append(xp.stack([xp.vdot(w, w), xp.vdot(gr, gr), xp.vdot(d, d)]).astype(np.float64))
                if hist:
                    parts += [_histogram(xp, w, HIST_BINS), _histogram(xp, gr, HIST_BINS)]
        xp = backend.get_array_module(parts[0])
        vec = xp.concatenate(parts)
        k = len(self._pending)
        if self._ring is None or self._ring.shape[0] <= k or self._ring.shape[1] != vec.size:
            ring = xp.empty((max(2 * k, 4), vec.size), np.float64)   # grows (rarely) at a step, never at a read
            if self._ring is not None and self._ring.shape[1] == vec.size and k:
                ring[:k] = self._ring[:k]
            self._ring = ring
        self._ring[k] = vec
        self._pending.append((g, epoch + 1))

    def at_sync(self, pending_steps, values) -> None:
        """At a host read of the trainer: ``pending_steps`` (its :class:`~gpucnn.train.trainer.PendingStep`
        s) and their losses; the statistics of the logged steps among them are read back in one copy."""
        if not self._pending:
            return
        stats, self._pending = self._pending, []
        host = backend.asnumpy(self._ring[:len(stats)])      # one copy, no device work queued before it
        by_step = {}
        for p, v in zip(pending_steps, values):
            by_step[p.step] = (v, p.lr)
        lines = []
        for i, (g, epoch) in enumerate(stats):
            loss, lr = by_step.get((g - 1) % self.spe, (None, None))
            row = self._row(g, epoch, loss, lr, host[i])
            lines.append(json.dumps(row) + "\n")
        with self._writing():
            self._layers_file.write("".join(lines))
            self._layers_file.flush()

    def _row(self, g, epoch, loss, lr, vec):
        """One ``layers.jsonl`` row from a logged step's vector (and its TensorBoard records)."""
        hist = self.writer is not None
        per = 3 + (2 * (3 + HIST_BINS) if hist else 0)
        layers = {}
        for j, (name, kind, size) in enumerate(self._names):
            v = vec[j * per:(j + 1) * per]
            wn, gn, un = (float(np.sqrt(max(t, 0.0))) for t in v[:3])
            layers[name] = {"kind": kind, "size": size, "weight_norm": wn, "grad_norm": gn, "update_norm": un,
                            "update_ratio": un / wn if wn > 0 else float("nan")}
            if hist:
                w = self.writer
                w.add_scalar(f"update_ratio/{name}", layers[name]["update_ratio"], g)
                for k, (tag, sumsq) in enumerate(((f"weights/{name}", v[0]), (f"grads/{name}", v[1]))):
                    h = v[3 + k * (3 + HIST_BINS):3 + (k + 1) * (3 + HIST_BINS)]
                    self._histogram(tag, h, size, sumsq, g)
        if hist and loss is not None:
            self.writer.add_scalar("loss/step", loss, g)
            self.writer.add_scalar("lr/step", lr, g)
        return {"epoch": epoch, "step": g, "lr": lr, "loss": loss, "layers": layers}

    def _histogram(self, tag, h, num, sumsq, step):
        mn, mx, total, counts = float(h[0]), float(h[1]), float(h[2]), h[3:]
        if mx > mn and np.isfinite(mx - mn):
            limits = (mn + (mx - mn) * np.arange(1, HIST_BINS + 1) / HIST_BINS).tolist()
            counts = counts.tolist()
        else:   # every value the same: one bucket
            limits, counts = [mx], [float(num)]
        self.writer.add_histogram_raw(tag, mn, mx, num, total, float(sumsq), limits, counts, global_step=step)

    # -- the end of an epoch -----------------------------------------------------------------
    def epoch_end(self, row: dict, predictions=None, labels=None, batch_size: int = 64) -> None:
        """TensorBoard records of an epoch: its ``metrics.jsonl`` row as scalars, the filters, the feature
        maps, the confusion matrix (from the test ``predictions`` and ``labels``, when given) and the time
        per stage."""
        w = self.writer
        if w is None:
            return
        g = row["epoch"] * self.spe
        for tag, key in EPOCH_SCALARS:
            w.add_scalar(tag, row[key], g)
        convs = views.conv_stages(self.model)
        if convs:
            weight = convs[0][1].lead.params["W"]
            w.add_image("filters", views.filter_grid(weight), g, dataformats="HWC" if weight.shape[1] == 3 else "HW")
        if convs and self.x_test is not None:
            for label, img in views.feature_maps(self.model, self.x_test[:views.FEATURE_IMAGES]):
                w.add_image(f"features/{label}", img, g, dataformats="HW")
        if predictions is not None:
            from .evaluation import confusion_matrix

            k = len(self.classes) if self.classes is not None else int(max(labels.max(), predictions.max())) + 1
            cm = confusion_matrix(labels, predictions, k)
            w.add_image("confusion_matrix", views.confusion_rgb(cm, self.classes, f"epoch {row['epoch']}"), g,
                        dataformats="HWC")
        if self.x_test is not None and hasattr(self.model, "stages"):
            for label, fwd, bwd in self.stage_times(self.x_test[:batch_size]):
                w.add_scalar(f"time/forward/{label}", fwd, g)
                w.add_scalar(f"time/backward/{label}", bwd, g)
        w.flush()

    def stage_times(self, x, warmup: int = 1, repeats: int = 3) -> list[tuple[str, float, float]]:
        """``[(stage label, forward s, backward s)]``: every stage of the model timed as ``gpucnn bench``
        times it (:class:`~gpucnn.timing.Timer`, the median of ``repeats``), in train mode, on ``x``.
        The random state, the buffers (running statistics) and the gradients are put back afterwards."""
        from ..timing import Timer
        from ..functional.layout import to_internal

        model = self.model
        rng_state = grandom.get_state()
        buffers = [(layer.buffers, k, layer.buffers[k].copy()) for _, layer, k in model.named_buffers()]
        grads = [g.grads.copy() for g in self.optimizer.groups]
        was = getattr(model, "training", True)
        timer, rows = Timer(self.device, warmup, repeats), []
        noise = np.random.default_rng(0)
        try:
            model.train()
            h = to_internal(x)
            for stage in model.stages():
                y = stage.forward(h)
                dy = backend.to_device(noise.standard_normal(y.shape).astype(y.dtype), self.device)
                fwd = timer(lambda: stage.forward(h))
                stage.forward(h)
                bwd = timer(lambda: stage.backward(dy, True))
                rows.append((f"{stage.start}:{stage.name}", fwd, bwd))
                h = y
        finally:
            grandom.set_state(rng_state)
            for store, k, saved in buffers:
                store[k][...] = saved
            for g, saved in zip(self.optimizer.groups, grads):
                g.grads[...] = saved
            model.train(was)
        return rows

    def _log_config(self, config) -> None:
        from tensorboardX.summary import hparams

        cfg = asdict(config)
        self.writer.add_text("config", "```\n" + json.dumps(cfg, indent=2) + "\n```", 0)
        hp = {k: v for k, v in cfg.items() if isinstance(v, (bool, int, float, str))}
        hp.update({k: str(v) for k, v in cfg.items() if v is not None and k not in hp})
        for summary in hparams(hp, {"accuracy/test": 0.0, "loss/test": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        """Close ``layers.jsonl`` and the event file (everything written is on disk)."""
        if self._layers_file is not None:
            self._layers_file.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
