"""Dynamic loss scaling, what ``--precision fp16`` trains with: :class:`LossScaler`.

fp16 operands hold magnitudes from 2^-24 to 65504 only; the gradients of a
batch-mean loss are mostly far below 2^-14 and would round to zero.  So the
train step back-propagates ``S`` times the loss (``S`` a power of two), and
before the optimizer step it divides every gradient by ``S`` again (exact:
``S`` is a power of two) and checks them.  When some gradient is Inf or NaN
(a scaled fp16 operand overflowed) the step is *skipped*: no parameter and
no optimizer slot changes, bit for bit, and ``S`` is halved.  After
``growth_interval`` finite steps in a row ``S`` is doubled.  These are
``torch.cuda.amp.GradScaler``'s semantics (initial scale 2^16, factors 2 and
1/2, growth every 2000 good steps), with two choices of gpucnn's:

* ``S`` stays within ``[min_scale, max_scale]``, by default ``[1, 2^64]``:
  halving below 1 would shrink the gradients, which by then overflow fp16
  at their true size -- a diverging run, which the non-finite loss check
  stops, not one a smaller scale saves; a ceiling keeps ``S`` and ``1/S``
  normal floats.  A step that overflows at the floor is still skipped and
  counted (``skipped_steps``, in every epoch's metrics row).
* The optimizer's ``step_count`` advances on a skipped step too (see
  :mod:`gpucnn.optim`): on a GPU the host does not know which steps were
  skipped until it reads the device, and the hyper rows are uploaded first.

One step, as :class:`~gpucnn.train.Trainer` runs it::

    forward, loss; dy = S * dloss     # the loss's gradient, scaled
    backward                          # every gradient is S times the true one
    allreduce (data-parallel)         # every rank sees the same overflow
    flag = unscale_(optimizer)        # g /= S for every flat gradient buffer; flag = any Inf/NaN
    optimizer.step(skip=flag)         # nothing changes when flag is set
    update()                          # the scale's rule; flag cleared

Where the state lives: two small arrays on the gradients' device, ``[S, 1/S]``
(float32) and ``[found, good, skipped]`` (int32).  On NumPy every operation
above is a NumPy operation and the scale is folded into the loss's backward
coefficient (``scale * S / N``, exact); on CUDA they are the kernels of
kernels/amp.cu (:mod:`gpucnn.cuda.amp`) and the optimizer's ``*_skip``
kernels, which read and write the state on the device: no host sync, and the
step is still captured as a CUDA graph.  Both give the same bits, except
that CUDA multiplies the loss's gradient after the loss computed it, so an
unscaled loss gradient below FP32's normal range (under 2^-126) keeps fewer
bits there (and CuPy's flush-to-zero drops FP32 subnormal results anyway).

Reading :attr:`LossScaler.scale`, :attr:`~LossScaler.good_steps` or
:attr:`~LossScaler.skipped_steps` copies them to the host (on a GPU it waits
for the device); the trainer does so only at the end of an epoch, for the
metrics and the checkpoint (:meth:`LossScaler.state_dict`).
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..functional import _dispatch

__all__ = ["LossScaler"]


def _power_of_two(name: str, value) -> float:
    """``value`` as a float if it is a power of two that FP32 holds as a normal number (its inverse too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a power of two, got {name}={value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0 and math.frexp(v)[0] == 0.5 and 2.0 ** -126 <= v <= 2.0 ** 126):
        raise ValueError(f"{name} must be a power of two from 2**-126 to 2**126, got {name}={value!r}")
    return v


class LossScaler:
    """Dynamic loss scaling of fp16 training (see the module docstring for the rule and its costs).

    Args:
        init_scale: the first scale ``S``, a power of two (default 2**16, as PyTorch).
        growth_interval: finite steps in a row after which ``S`` doubles (default 2000).
        min_scale, max_scale: the floor and the ceiling of ``S``, powers of two (default 1 and 2**64).

    The scaler belongs to one :class:`~gpucnn.train.Trainer` (``Trainer(..., loss_scaler=...)``),
    which binds it to its optimizer's float32 gradient buffers: its state moves to their device.
    ``gpucnn train --precision fp16`` makes one with the defaults; the other precisions never scale.

    >>> s = LossScaler(init_scale=8.0, growth_interval=2)
    >>> s.scale, s.good_steps, s.skipped_steps
    (8.0, 0, 0)
    """

    def __init__(self, init_scale=2.0 ** 16, growth_interval: int = 2000, min_scale=1.0, max_scale=2.0 ** 64):
        self._configure(init_scale, growth_interval, min_scale, max_scale)
        s = self.init_scale
        self._scale = np.array([s, 1.0 / s], np.float32)     # [S, 1/S]
        self._steps = np.zeros(3, np.int32)                  # [found, good, skipped]
        self._groups: list = []

    def _configure(self, init_scale, growth_interval, min_scale, max_scale) -> None:
        init, lo, hi = (_power_of_two(n, v) for n, v in (("init_scale", init_scale), ("min_scale", min_scale),
                                                           ("max_scale", max_scale)))
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, (int, np.integer)) \
                or not 1 <= growth_interval < 2 ** 31:
            raise ValueError(f"growth_interval must be an integer >= 1, got growth_interval={growth_interval!r}")
        if not lo <= init <= hi:
            raise ValueError(f"init_scale must lie in [min_scale, max_scale], got init_scale={init_scale!r}, "
                             f"min_scale={min_scale!r}, max_scale={max_scale!r}")
        self.init_scale, self.growth_interval, self.min_scale, self.max_scale = init, int(growth_interval), lo, hi

    # -- binding ---------------------------------------------------------------------------------
    def bind(self, optimizer) -> None:
        """Scale the gradients of ``optimizer``'s flat buffers (float32, one device); the state moves there."""
        groups = list(optimizer.groups)
        bad = [str(g.dtype) for g in groups if g.dtype != np.float32]
        if bad:
            raise TypeError(f"LossScaler: loss scaling runs on float32 parameters (fp16 mode's master weights), "
                            f"got a {bad[0]} parameter buffer; float64 models train in precision 'fp32'")
        devices = {backend.device_of(g.grads) for g in groups}
        if len(devices) != 1:
            raise ValueError(f"LossScaler: the optimizer's buffers live on {sorted(devices)}; one device needed")
        device = devices.pop()
        self._scale = backend.to_device(backend.asnumpy(self._scale), device)
        self._steps = backend.to_device(backend.asnumpy(self._steps), device)
        self._groups = groups

    @property
    def on_host(self) -> bool:
        """Whether the state is a NumPy array, which the host reads without waiting (the NumPy path)."""
        return isinstance(self._scale, np.ndarray)

    def arrays(self) -> list:
        """The state arrays (``[S, 1/S]`` and ``[found, good, skipped]``), for snapshots of a step."""
        return [self._scale, self._steps]

    # -- the step --------------------------------------------------------------------------------
    def scale_gradient(self, dy):
        """``dy *= S`` in place (the loss's gradient, before the backward pass); returns ``dy``."""
        if _dispatch.use_kernels(dy, self._scale):
            from ..cuda import amp

            return amp.scale_gradient(dy, self._scale)
        dy *= self._scale[0]
        return dy

    def unscale_(self, optimizer=None):
        """Divide every gradient of the bound buffers by ``S`` and note whether one is Inf or NaN.

        Returns the flag for ``optimizer.step(skip=...)``: the int32 state array, whose element 0
        is nonzero when the step must be skipped (on the gradients' device; nothing is read back).
        ``optimizer``, if given, must be the one bound.
        """
        if optimizer is not None and [id(g) for g in optimizer.groups] != [id(g) for g in self._groups]:
            raise ValueError("LossScaler.unscale_: this optimizer is not the one the scaler is bound to "
                             "(LossScaler.bind(optimizer))")
        if not self._groups:
            raise RuntimeError("LossScaler.unscale_: the scaler is not bound to an optimizer (LossScaler.bind)")
        for group in self._groups:
            g = group.grads
            if _dispatch.use_kernels(g, self._scale):
                from ..cuda import amp

                amp.unscale_check(g, self._scale, self._steps)
            else:
                np.multiply(g, self._scale[1], out=g)
                if not np.isfinite(g).all():
                    self._steps[0] = 1
        return self._steps

    def update(self) -> None:
        """The scale's rule after the step: halve on overflow (floor ``min_scale``), double after
        ``growth_interval`` good steps (ceiling ``max_scale``); the overflow flag is cleared."""
        if _dispatch.use_kernels(self._scale):
            from ..cuda import amp

            amp.update(self._scale, self._steps, self.growth_interval, self.min_scale, self.max_scale)
            return
        scale, steps, f = self._scale, self._steps, np.float32
        s = scale[0]
        if steps[0]:
            s = max(s * f(0.5), f(self.min_scale))
            steps[1] = 0
            steps[2] += 1
        else:
            good = int(steps[1]) + 1
            if good >= self.growth_interval:
                s = min(s * f(2.0), f(self.max_scale))
                good = 0
            steps[1] = good
        scale[0] = s
        scale[1] = f(1.0) / s
        steps[0] = 0

    # -- reading and saving ------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The current loss scale ``S`` (a host read)."""
        return float(backend.asnumpy(self._scale)[0])

    @property
    def good_steps(self) -> int:
        """Finite steps in a row since ``S`` last changed (a host read)."""
        return int(backend.asnumpy(self._steps)[1])

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients so far (a host read)."""
        return int(backend.asnumpy(self._steps)[2])

    def state_dict(self) -> dict:
        """The scale, the counters and the configuration, as JSON numbers (checkpoints keep it)."""
        scale, steps = backend.asnumpy(self._scale), backend.asnumpy(self._steps)
        return {"scale": float(scale[0]), "good_steps": int(steps[1]), "skipped_steps": int(steps[2]),
                "init_scale": self.init_scale, "growth_interval": self.growth_interval,
                "min_scale": self.min_scale, "max_scale": self.max_scale}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (configuration included), checked; the state stays on its device."""
        if not isinstance(state, dict):
            raise ValueError(f"loss scaler state must be a dict, got {type(state).__name__}")
        keys = {"scale", "good_steps", "skipped_steps", "init_scale", "growth_interval", "min_scale", "max_scale"}
        if set(state) != keys:
            raise ValueError(f"loss scaler state has keys {sorted(state)}, expected {sorted(keys)}")
        scale = _power_of_two("scale", state["scale"])
        counts = {k: state[k] for k in ("good_steps", "skipped_steps")}
        for k, v in counts.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < 2 ** 31:
                raise ValueError(f"loss scaler {k} must be a non-negative int, got {k}={v!r}")
        saved = (self.init_scale, self.growth_interval, self.min_scale, self.max_scale)
        self._configure(state["init_scale"], state["growth_interval"], state["min_scale"], state["max_scale"])
        if not self.min_scale <= scale <= self.max_scale or counts["good_steps"] >= self.growth_interval:
            self._configure(*saved)
            raise ValueError(f"loss scaler state does not fit its own rule: scale={state['scale']!r} in "
                             f"[{state['min_scale']!r}, {state['max_scale']!r}], good_steps={counts['good_steps']!r} "
                             f"< growth_interval={state['growth_interval']!r}")
        host_scale = np.array([scale, 1.0 / scale], np.float32)
        host_steps = np.array([0, counts["good_steps"], counts["skipped_steps"]], np.int32)
        device = backend.device_of(self._scale)
        self._scale[...] = backend.to_device(host_scale, device)
        self._steps[...] = backend.to_device(host_steps, device)

    def __repr__(self) -> str:
        return (f"LossScaler(scale={self.scale:g}, growth_interval={self.growth_interval}, "
                f"min_scale={self.min_scale:g}, max_scale={self.max_scale:g}, skipped_steps={self.skipped_steps})")
