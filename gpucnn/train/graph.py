"""The GPU train step as one CUDA graph: how ``gpucnn train --device cuda`` replays its steps.

On by default (``Trainer(cuda_graph=True)``; ``gpucnn train --no-cuda-graph``
runs every step eagerly).  Capture itself ran on an H200: lenet5 steps
captured as graphs (then opt-in, without the check below) were compared with
eager steps and measured in ``bench/results/nvidia-h200-2026-12-04-run2/``
(and runs 3-4).  The two-capture check and the fallback described here have
run only on the CPU stand-in, with the emulator running the kernels.

After a few eager steps have allocated every buffer, one step -- gather,
forward, loss, backward, optimizer -- is captured on a side stream
(``cupy.cuda.Stream.begin_capture`` / ``end_capture``) into a graph that reads
its inputs from fixed device buffers (:class:`FixedInputs`):

* ``idx`` -- the step's sample indices (copied from the epoch's device
  permutation), ``hyper`` -- the optimizer's device hyper-parameters (copied
  from the epoch's table row: the learning rate changes, the graph does not),
  and with augmentation ``aug`` -- the step's augmentation key (copied from the
  trainer's per-epoch key table; ``gather_batch_augment`` reads it);
* it writes the loss and the correct count into fixed (1,) buffers, copied to
  the trainer's per-step ring after each replay.

A replayed step is then 2 (augmented: 3) device-to-device copies in, one
``cudaGraphLaunch``, 2 copies out: no kernel is launched from Python, no host
sync.  Every buffer the captured kernels touch is one an eager step uses too
(the layers' and the loss's workspaces, the flat parameter/gradient/slot
buffers); the graph keeps a reference to each workspace buffer it uses, so a
workspace that later drops one (a new batch shape) cannot hand its memory to
anything else.

A graph is used only once it has been shown to be the step, on the device it
runs on (:class:`GraphedStep`):

1. a capture must not allocate device memory (what a graph would keep
   pointing at after the allocator recycled it), and must leave gpucnn's
   random stream and the model's host-side buffers as they were (the capture
   runs the step's Python code once, but a replay would not: a step that
   changes host state cannot be a graph);
2. the step is captured twice, on two consecutive eager steps.  CuPy's
   :class:`cupy.cuda.Graph` exposes no list of its nodes to compare, so the
   two captures are compared by what they do: both are replayed on the second
   step's inputs from one snapshot of the parameters, gradients, optimizer
   slots, buffers and loss-scaler state (fp16), and must leave the same bits -- a step whose launches
   change from step to step (a scalar that counts steps, a buffer that moves)
   is refused;
3. the snapshot is then restored, the second step run eagerly, and the
   replays' results (every parameter, gradient, slot, buffer, the loss and
   the count) must equal the eager step's bit for bit.  The first capture
   was made a step earlier, and the replays run while every intermediate
   buffer still holds the *previous* step's values, so device work the graph
   misses shows as a difference.

Any failure costs one warning line (``RuntimeWarning``) and nothing else: the
step runs eagerly from then on (the eager steps *were* the steps).  Only
batches of the captured size are replayed; the epoch's last, smaller batch
runs eagerly.
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np

from .. import backend
from .. import random as grandom
from ..functional import workspace

__all__ = ["GraphedStep", "FixedInputs", "GraphCaptureError", "WARMUP_STEPS", "warn_refused"]

#: eager steps of a batch size before its step is captured (buffers, slots, prepared launches)
WARMUP_STEPS = 2


class GraphCaptureError(RuntimeError):
    """The train step could not be captured, or its capture is not the step (the message says why)."""


def _copy(dst, src, stream) -> None:
    """``dst[...] = src`` (same size, contiguous, on the device) as one async device-to-device copy."""
    cp = backend.cupy
    cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes, cp.cuda.runtime.memcpyDeviceToDevice,
                                stream.ptr)


@contextlib.contextmanager
def _no_allocation():
    """Every device allocation inside the block raises :class:`GraphCaptureError`."""
    cp = backend.cupy

    def refuse(size):
        raise GraphCaptureError(f"the step allocated {size} bytes of device memory while being captured; "
                                "a CUDA graph needs a step that reuses its buffers")

    with cp.cuda.using_allocator(refuse):
        yield


def _host_state(trainer):
    """What a replay could not reproduce if the step changed it: gpucnn's random stream and the
    model's host (NumPy) buffers (copies)."""
    buffers = {name: np.array(layer.buffers[k], copy=True) for name, layer, k in trainer.model.named_buffers()
               if isinstance(layer.buffers[k], np.ndarray)}
    return grandom.get_state(), buffers


def _restore_host_state(trainer, state) -> bool:
    """Put ``state`` (:func:`_host_state`) back; whether anything had changed."""
    rng, buffers = state
    now = _host_state(trainer)
    changed = now[0] != rng or any(not np.array_equal(now[1][k], v) for k, v in buffers.items())
    grandom.set_state(rng)
    for name, layer, k in trainer.model.named_buffers():
        if name in buffers:
            layer.buffers[k][...] = buffers[name]
    return changed


def _state_arrays(trainer, fixed):
    """Every device array a step leaves behind: parameters, gradients, optimizer slots, buffers,
    the loss scaler's state, the loss and the correct count."""
    opt = trainer.optimizer
    arrays = [a for g in opt.groups for a in (g.params, g.grads)]
    arrays += [flat for slots in opt.slots for flat in slots.values()]
    arrays += [layer.buffers[k] for _, layer, k in trainer.model.named_buffers()
               if not isinstance(layer.buffers[k], np.ndarray)]
    if trainer.loss_scaler is not None:                  # the loss scale and its counters
        arrays += trainer.loss_scaler.arrays()
    return arrays + [fixed.loss, fixed.correct]


def _bits(a):
    """``a``'s contents as unsigned integers of its width (NaN == NaN, -0.0 != 0.0)."""
    host = backend.asnumpy(a)
    return host.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[host.dtype.itemsize])


class FixedInputs:
    """The fixed device buffers a replayed step reads and writes.

    ``idx`` (n,), ``hyper`` one row per optimizer dtype, ``aug`` (4,) int32 when
    the step is augmented; ``loss`` (1,) of the data's ``dtype`` and ``correct`` (1,) int32.  :meth:`copy_in` /
    :meth:`copy_out` move a step's values in and out (one async device-to-device
    copy each, checked against the buffer first).
    """

    def __init__(self, trainer, n: int, dtype, idx_dtype, augmented: bool):
        cp = backend.cupy
        opt = trainer.optimizer
        self.n = int(n)
        self.idx = cp.empty((self.n,), idx_dtype)
        self.hyper = {g.dtype: cp.empty((opt.HYPER_SIZE,), g.dtype) for g in opt.groups}
        self.loss = cp.empty((1,), dtype)
        self.correct = cp.empty((1,), np.int32)
        self.aug = cp.zeros((4,), np.int32) if augmented else None

    def run_step(self, trainer, x, y) -> None:
        """The step on the fixed buffers: gather, forward, loss, backward, optimizer."""
        xb, yb = trainer._gather(x, y, self.idx, (0, 0) if self.aug is not None else None, self.aug)
        trainer._forward_backward(xb, yb, 1.0, (self.loss, self.correct))
        trainer._update(self.hyper)

    def copy_in(self, idx, hyper, aug, stream) -> None:
        if idx.shape != self.idx.shape or idx.dtype != self.idx.dtype:
            raise ValueError(f"this step was captured for idx {self.idx.dtype} {self.idx.shape}, got "
                             f"{idx.dtype} {tuple(idx.shape)}")
        _copy(self.idx, idx, stream)
        for dtype, buf in self.hyper.items():
            _copy(buf, hyper[dtype], stream)
        if self.aug is not None:
            if aug is None:
                raise ValueError("this step was captured with augmentation; replaying it needs the step's key")
            _copy(self.aug, aug, stream)

    def copy_out(self, slot, stream) -> None:
        _copy(slot[0], self.loss, stream)
        _copy(slot[1], self.correct, stream)


def capture(trainer, fixed: FixedInputs, x, y):
    """One capture of the step on ``fixed``'s buffers: ``(graph, pinned workspace buffers)``.

    Nothing runs on the device; the step's Python code runs once, and the
    optimizer's step count and the host state it may touch are put back.
    Raises :class:`GraphCaptureError` (or CuPy's error) when the step cannot be captured.
    """
    cp = backend.cupy
    opt = trainer.optimizer
    stream = cp.cuda.Stream(non_blocking=True)
    stream.wait_event(cp.cuda.get_current_stream().record())    # the eager work before is done first
    step_count, host = opt.step_count, _host_state(trainer)
    graph = failure = None
    with workspace.pinning() as pins, stream:           # every buffer the graph touches, kept
        stream.begin_capture()
        try:
            with _no_allocation():
                fixed.run_step(trainer, x, y)
        except Exception as exc:
            failure = exc
        finally:
            opt.step_count = step_count                 # the capture ran nothing
        try:
            graph = stream.end_capture()
        except Exception as exc:
            if failure is None:
                failure = GraphCaptureError(f"capture failed ({type(exc).__name__}: {exc})")
    changed = _restore_host_state(trainer, host)
    if failure is not None:
        raise failure
    if changed:
        raise GraphCaptureError("the step changed gpucnn's random stream or a host-side buffer of the model, "
                                "which a replay would not")
    return graph, pins


class GraphedStep(FixedInputs):
    """The CUDA graph of one train step for batches of ``n`` samples of dataset ``(x, y)``.

    :meth:`step` runs one step: the first call captures it and runs the step
    eagerly, the second captures it again, validates both captures (see the
    module docstring) and runs the step eagerly, every later call replays the
    first capture.  It raises :class:`GraphCaptureError` from the first two
    calls when the step cannot be a graph; the step itself has then run,
    eagerly and correctly.
    """

    def __init__(self, trainer, x, y, n: int, idx_dtype, augmented: bool = False):
        super().__init__(trainer, n, trainer.batch_dtype(x), idx_dtype, augmented)
        self.trainer, self.dataset = trainer, (x, y)
        self.graph = None
        self.buffers = None
        self.validated = False

    def step(self, idx, hyper, slot, aug=None) -> None:
        """One train step on ``idx`` (capturing, validating or replaying); loss and count to ``slot``."""
        stream = backend.cupy.cuda.get_current_stream()
        self.copy_in(idx, hyper, aug, stream)
        if self.validated:
            self.graph.launch(stream=stream)
            self.trainer.optimizer.step_count += 1
        else:
            try:
                self._capture_and_check(stream)
            finally:
                self.copy_out(slot, stream)             # the step itself ran, eagerly
            return
        self.copy_out(slot, stream)

    def _capture_and_check(self, stream) -> None:
        """A capture, then the eager step; from the second call on, the captures are checked too."""
        trainer, (x, y) = self.trainer, self.dataset
        try:
            graph, pins = capture(trainer, self, x, y)
        except Exception as exc:
            self.run_step(trainer, x, y)                # the eager step runs before the refusal is said
            if isinstance(exc, GraphCaptureError):
                raise
            raise GraphCaptureError(f"capture failed ({type(exc).__name__}: {exc})") from exc
        if self.graph is None:
            self.graph, self.buffers = graph, pins
            self.run_step(trainer, x, y)
            return
        state = _state_arrays(trainer, self)
        snapshot = [a.copy() for a in state]
        replays = []
        for g in (self.graph, graph):
            g.launch(stream=stream)
            replays.append([_bits(a) for a in state])
            for a, saved in zip(state, snapshot):
                a[...] = saved
        self.run_step(trainer, x, y)                    # the eager step: from here on, the truth
        if not all(np.array_equal(a, b) for a, b in zip(*replays)):
            raise GraphCaptureError("two consecutive steps captured different graphs (their replays differ)")
        if not all(np.array_equal(_bits(a), bits) for a, bits in zip(state, replays[0])):
            raise GraphCaptureError("replaying the captured graph did not reproduce the eager step bit for bit")
        self.validated = True


def warn_refused(exc) -> None:
    """The one-line warning of a step that is not replayed as a graph."""
    warnings.warn(f"CUDA graph not used ({exc}); training continues with eager steps", RuntimeWarning,
                  stacklevel=4)
