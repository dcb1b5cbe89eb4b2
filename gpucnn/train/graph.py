"""The train step as one CUDA graph (``gpucnn train --cuda-graph``; opt-in, UNVERIFIED on a GPU).

After a few eager steps have allocated every buffer, one step -- gather,
forward, loss, backward, optimizer -- is captured on a side stream
(``cupy.cuda.Stream.begin_capture`` / ``end_capture``) into a graph that reads
its inputs from fixed device buffers:

* ``idx`` -- the step's sample indices (copied from the epoch's device
  permutation), ``hyper`` -- the optimizer's device hyper-parameters (copied
  from the epoch's table row: the learning rate changes, the graph does not),
  and with augmentation ``aug`` -- the step's augmentation key (copied from the
  trainer's per-epoch key table; ``gather_batch_augment`` reads it);
* it writes the loss and the correct count into fixed (1,) buffers, copied to
  the trainer's per-step ring after each replay.

A replayed step is then 2 (augmented: 3) device-to-device copies in, one ``cudaGraphLaunch``,
2 copies out: no kernel is launched from Python, no host sync.  Every buffer
the captured kernels touch is one an eager step uses too (the layers' and the
loss's workspaces, the flat parameter/gradient/slot buffers), so a replay does
exactly what an eager step does, bit for bit; the graph keeps a reference to
each workspace buffer it uses, so a workspace that later drops one (a new batch
shape) cannot hand its memory to anything else.

Capture refuses a step that allocates device memory (what a graph captured
would keep pointing at after the allocator recycled it): an allocation during
capture raises, and the trainer goes on eagerly after a one-line warning, as
it does for any other capture failure.  Only batches of the captured size are
replayed; the epoch's last, smaller batch runs eagerly.
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np

from .. import backend
from ..functional import workspace

__all__ = ["StepGraph", "FixedInputs", "GraphCaptureError", "WARMUP_STEPS"]

#: eager steps of a batch size before its step is captured (buffers, slots, prepared launches)
WARMUP_STEPS = 2


class GraphCaptureError(RuntimeError):
    """The train step could not be captured as a CUDA graph (the message says why)."""


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


class FixedInputs:
    """The fixed device buffers a replayed step (a CUDA graph, a launch plan) reads and writes.

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
        trainer.optimizer.step(self.hyper)

    def copy_in(self, idx, hyper, aug, stream) -> None:
        if idx.shape != self.idx.shape or idx.dtype != self.idx.dtype:
            raise ValueError(f"this step was recorded for idx {self.idx.dtype} {self.idx.shape}, got "
                             f"{idx.dtype} {tuple(idx.shape)}")
        _copy(self.idx, idx, stream)
        for dtype, buf in self.hyper.items():
            _copy(buf, hyper[dtype], stream)
        if self.aug is not None:
            if aug is None:
                raise ValueError("this step was recorded with augmentation; replaying it needs the step's key")
            _copy(self.aug, aug, stream)

    def copy_out(self, slot, stream) -> None:
        _copy(slot[0], self.loss, stream)
        _copy(slot[1], self.correct, stream)


class StepGraph(FixedInputs):
    """One captured train step for batches of ``n`` samples of dataset ``(x, y)``."""

    def __init__(self, trainer, x, y, n: int, idx_dtype, augmented: bool = False):
        super().__init__(trainer, n, x.dtype, idx_dtype, augmented)
        cp = backend.cupy
        opt = trainer.optimizer
        self.stream = cp.cuda.Stream(non_blocking=True)
        current = cp.cuda.get_current_stream()
        self.stream.wait_event(current.record())         # the eager work before is done first
        step_count = opt.step_count
        graph = failure = None
        with workspace.pinning() as self.buffers, self.stream:   # every buffer the graph touches, kept
            self.stream.begin_capture()
            try:
                with _no_allocation():
                    self.run_step(trainer, x, y)
            except Exception as exc:
                failure = exc
            finally:
                opt.step_count = step_count                 # the capture ran nothing
            try:
                graph = self.stream.end_capture()
            except Exception as exc:
                if failure is None:
                    raise GraphCaptureError(f"ending the capture failed: {exc}") from exc
        if failure is not None:
            raise failure
        self.graph = graph

    def replay(self, idx, hyper, slot, aug=None) -> None:
        """One step: copy ``idx``, the ``hyper`` rows (and the augmentation key ``aug``) in, launch,
        copy loss and count to ``slot``."""
        stream = backend.cupy.cuda.get_current_stream()
        self.copy_in(idx, hyper, aug, stream)
        self.graph.launch(stream=stream)
        self.copy_out(slot, stream)


def try_capture(trainer, x, y, n, idx_dtype, augmented: bool = False):
    """A :class:`StepGraph`, or None after a one-line warning saying why it could not be captured."""
    try:
        return StepGraph(trainer, x, y, n, idx_dtype, augmented)
    except Exception as exc:   # any failure: the eager step is always correct
        warnings.warn(f"--cuda-graph: capture failed ({type(exc).__name__}: {exc}); training continues "
                      "without a CUDA graph", RuntimeWarning, stacklevel=3)
        return None
