"""The train step as a recorded launch plan: a GPU step's host work cut to its launches.

An eager GPU step spends most of its host time in Python -- the layers'
bookkeeping, argument checks, workspace lookups -- around launches that are the
same every step: same kernels, same grids, same buffers, same scalars.  After a
few eager warm-up steps the trainer (``Trainer(launch_plan=True)``, the
default on a GPU unless ``--cuda-graph`` is given) records one step's launches
from the launcher (:func:`gpucnn.cuda.loader.recording`: the prepared, checked
calls) and from then on issues exactly those calls, one after another, for
every full-size batch: no layer code, no checks, nothing recomputed.  NVTX
ranges (``--nvtx``) are recorded with the launches and replayed in their
place, so a profile of planned steps shows the same per-layer ranges.  Like a
CUDA graph (:mod:`gpucnn.train.graph`, whose fixed input buffers it shares),
the plan reads the step's inputs from fixed buffers, copied in per step: the
sample indices, the optimizer's hyper row, the augmentation key; and writes
its loss and correct count into fixed buffers copied out to the trainer's ring.

A plan is used only once it has been shown to be the step, on the device it
runs on:

1. the step is recorded twice, on two consecutive eager steps, and the two
   recordings must be identical (kernels, grids, buffers, scalars): a step
   whose launches change from step to step (a scalar that counts steps, a
   buffer that moves) is refused;
2. neither recorded step allocated device memory, changed gpucnn's random
   stream or a host-side buffer of the model (CuPy operations and host state
   a replay would skip);
3. between the two recordings, the first is *replayed* on the second step's
   inputs from a snapshot of the parameters, gradients, optimizer slots and
   buffers; the snapshot is then restored, the second step run eagerly, and
   the replay's results (every parameter, gradient, slot, buffer, the loss
   and the count) must equal the eager step's bit for bit.  The replay runs
   while every intermediate buffer still holds the *previous* step's values,
   so a device operation the plan misses (one that does not allocate: a
   ``fill``, an in-place add) leaves a stale value and shows as a difference.

A refused plan costs one warning line and nothing else: the step runs eagerly
from then on (the second recording *was* the eager step).  Only batches of the
recorded size use the plan; the epoch's last, smaller batch runs eagerly.
Still unverified on a real GPU (it has run on the CuPy stand-in with the CPU
emulator running the kernels); ``--no-launch-plan`` turns it off.
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np

from .. import backend, nvtx
from .. import random as grandom
from ..cuda import loader
from ..functional import workspace
from .graph import WARMUP_STEPS, FixedInputs

__all__ = ["StepPlan", "PlanRefused", "WARMUP_STEPS", "warn_refused"]


class PlanRefused(RuntimeError):
    """The recorded step is not a launch plan this trainer may replay (the message says why)."""


@contextlib.contextmanager
def _counting_allocations():
    """Count device allocations inside the block (they still happen, through the allocator in
    use): ``yield`` a list of sizes."""
    cp = backend.cupy
    inner = cp.cuda.get_allocator()
    sizes = []

    def counting(size):
        sizes.append(int(size))
        return inner(size)          # an allocator returns the memory: CuPy builds the array on it

    with cp.cuda.using_allocator(counting):
        yield sizes


def _host_state(trainer):
    """What a replay could not reproduce if an eager step changed it: gpucnn's random stream and
    the model's host (NumPy) buffers."""
    buffers = {name: np.array(layer.buffers[k], copy=True) for name, layer, k in trainer.model.named_buffers()
               if isinstance(layer.buffers[k], np.ndarray)}
    return dict(grandom.get_state()["stream"]), buffers


def _same_host_state(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(np.array_equal(a[1][k], b[1][k]) for k in a[1])


def _state_arrays(trainer, fixed):
    """Every device array a step leaves behind: parameters, gradients, optimizer slots, buffers,
    the loss and the correct count."""
    opt = trainer.optimizer
    arrays = [a for g in opt.groups for a in (g.params, g.grads)]
    arrays += [flat for slots in opt.slots for flat in slots.values()]
    arrays += [layer.buffers[k] for _, layer, k in trainer.model.named_buffers()
               if not isinstance(layer.buffers[k], np.ndarray)]
    return arrays + [fixed.loss, fixed.correct]


def _bits(a):
    """``a``'s contents as unsigned integers of its width (NaN == NaN, -0.0 != 0.0)."""
    host = backend.asnumpy(a)
    return host.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[host.dtype.itemsize])


def _launch_key(launch):
    """A recorded launch, comparable across recordings: arrays by address, shape and dtype."""
    function, grid, block, args, shared_mem = launch
    return (id(function), grid, block, shared_mem,
            tuple((a.data.ptr, a.shape, a.dtype.str) if hasattr(a, "data") and hasattr(a.data, "ptr")
                  else (type(a), a) for a in args))


class StepPlan(FixedInputs):
    """The launch plan of one train step for batches of ``n`` samples of dataset ``(x, y)``.

    :meth:`step` runs one step: the first call records it (an eager step), the
    second validates the recording (see the module docstring) and runs an
    eager step, every later call replays it.  It raises :class:`PlanRefused`
    from the first two calls when the step cannot be a plan; the step itself
    has then run correctly.
    """

    def __init__(self, trainer, x, y, n: int, idx_dtype, augmented: bool = False):
        super().__init__(trainer, n, x.dtype, idx_dtype, augmented)
        self.trainer, self.dataset = trainer, (x, y)
        self.launches: list | None = None
        self.validated = False
        self.buffers = None

    def _record(self):
        """Run the step eagerly on the fixed inputs; its launches, after the checks of 1. and 2."""
        trainer = self.trainer
        before = _host_state(trainer)
        with workspace.pinning() as pins, loader.recording() as launches, nvtx.recording_into(launches), \
                _counting_allocations() as allocs:
            self.run_step(trainer, *self.dataset)
        if allocs:
            raise PlanRefused(f"the step allocated device memory ({len(allocs)} allocations, {sum(allocs)} "
                              "bytes): it holds CuPy operations a launch plan would not replay")
        if not _same_host_state(before, _host_state(trainer)):
            raise PlanRefused("the step changed gpucnn's random stream or a host-side buffer of the model")
        if not any(grid is not None for _, grid, _, _, _ in launches):
            raise PlanRefused("the step launched no gpucnn kernel")
        return launches, pins

    def _replay(self):
        for function, grid, block, args, shared_mem in self.launches:
            if grid is None:                            # an NVTX push or pop, in its place
                function(*args)
            elif shared_mem:
                function(grid, block, args, shared_mem=shared_mem)
            else:
                function(grid, block, args)

    def step(self, idx, hyper, slot, aug=None) -> None:
        """One train step on ``idx`` (recording, validating or replaying); loss and count to ``slot``."""
        stream = backend.cupy.cuda.get_current_stream()
        self.copy_in(idx, hyper, aug, stream)
        try:
            if self.validated:
                self._replay()
                self.trainer.optimizer.step_count += 1
            elif self.launches is None:
                self.launches, self.buffers = self._record()
            else:
                self._validate()
        except PlanRefused:
            self.copy_out(slot, stream)                 # the step itself ran, eagerly
            raise
        self.copy_out(slot, stream)

    def _validate(self):
        trainer = self.trainer
        state = _state_arrays(trainer, self)
        snapshot = [a.copy() for a in state]
        self._replay()
        replayed = [_bits(a) for a in state]
        for a, saved in zip(state, snapshot):
            a[...] = saved
        second, pins = self._record()                  # the eager step: from here on, the truth
        self.buffers = self.buffers + pins
        if [_launch_key(x) for x in second] != [_launch_key(x) for x in self.launches]:
            raise PlanRefused("two consecutive steps launched different kernels, grids, buffers or scalars")
        for a, bits in zip(state, replayed):
            if not np.array_equal(_bits(a), bits):
                raise PlanRefused("replaying the recorded launches did not reproduce the eager step bit for bit "
                                  "(the step does device work outside gpucnn's launcher)")
        self.validated = True


def warn_refused(exc) -> None:
    """The one-line warning of a refused plan."""
    warnings.warn(f"launch plan refused ({exc}); training continues with eager steps", RuntimeWarning,
                  stacklevel=4)
