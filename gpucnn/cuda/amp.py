"""Dynamic loss scaling on the device (kernels/amp.cu): the kernel half of :class:`gpucnn.train.LossScaler`.

The scaler's state is two small device arrays -- ``scale`` (2,) float32
``[S, 1/S]`` and ``steps`` (3,) int32 ``[found, good, skipped]`` -- that only
these kernels and the optimizer's ``*_skip`` kernels read and write, so a train
step never waits for the host and replays as a CUDA graph.  One step is
:func:`scale_gradient` on the loss's gradient, :func:`unscale_check` on each
flat gradient buffer, the optimizer with ``skip=steps``
(:mod:`gpucnn.cuda.optim`), then :func:`update`.  Bit for bit what the scaler
computes on NumPy arrays (up to CuPy's flush-to-zero of FP32 subnormal
results: kernels/amp.cu).
"""
from __future__ import annotations

import numpy as np

from . import loader
from .elementwise import _contiguous, _xp

__all__ = ["scale_gradient", "unscale_check", "update"]


def _float32(func: str, name: str, a) -> None:
    if getattr(a, "dtype", None) != np.float32:
        raise TypeError(f"{func}: {name} must be float32 (fp16 mode's gradients and scale), got "
                        f"{getattr(a, 'dtype', type(a).__name__)}")


def _state(func: str, scale, steps=None) -> None:
    _float32(func, "scale", scale)
    if scale.shape != (2,):
        raise ValueError(f"{func}: scale must have shape (2,) ([S, 1/S]), got {tuple(scale.shape)}")
    if steps is not None:
        if getattr(steps, "dtype", None) != np.int32 or steps.shape != (3,):
            raise TypeError(f"{func}: steps must be int32 of shape (3,) ([found, good, skipped]), got "
                            f"{getattr(steps, 'dtype', type(steps).__name__)} {tuple(getattr(steps, 'shape', ()))}")


def scale_gradient(dy, scale):
    """``dy *= S`` in place (the loss's gradient before the backward pass); returns ``dy``.

    Launches: 1, ``amp_scale``, one thread per element: grid (ceil(dy.size / 256), 1, 1), block (256, 1, 1).
    """
    func = "amp_scale"
    _xp(dy=dy, scale=scale)
    _float32(func, "dy", dy)
    _state(func, scale)
    _contiguous(func, dy=dy)
    loader.launch(func, (dy, scale, dy.size), n_threads=dy.size)
    return dy


def unscale_check(g, scale, steps):
    """``g *= 1/S`` in place, and ``steps[0] = 1`` when any result is Inf or NaN; returns ``g``.

    Launches: 1, ``amp_unscale_check``, one thread per element: grid (ceil(g.size / 256), 1, 1),
    block (256, 1, 1).
    """
    func = "amp_unscale_check"
    _xp(g=g, scale=scale, steps=steps)
    _float32(func, "g", g)
    _state(func, scale, steps)
    _contiguous(func, g=g)
    loader.launch(func, (g, scale, steps, g.size), n_threads=g.size)
    return g


def update(scale, steps, growth_interval: int, min_scale: float, max_scale: float) -> None:
    """The scale's rule after a step (halve on overflow, double after ``growth_interval`` good steps,
    within ``[min_scale, max_scale]``), and ``steps[0] = 0`` for the next step.

    Launches: 1, ``amp_update``, one thread: grid (1, 1, 1), block (1, 1, 1).
    """
    func = "amp_update"
    _xp(scale=scale, steps=steps)
    _state(func, scale, steps)
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, (int, np.integer)) \
            or growth_interval < 1:
        raise ValueError(f"{func}: growth_interval must be an int >= 1, got {growth_interval!r}")
    loader.launch(func, (scale, steps, int(growth_interval), float(min_scale), float(max_scale)), grid=1, block=1)
