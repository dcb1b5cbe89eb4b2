"""Optimizer steps on flat parameter buffers, one launch per buffer (kernels/optim.cu).

The arithmetic is exactly gpucnn/optim.py's NumPy arithmetic, operation by
operation and in the same order, each operation rounded to the buffer's dtype
(the kernels use the non-contracting ``_rn`` intrinsics: no FMA), so on a GPU a
float64 step gives the NumPy step's bits (float32 too, up to CuPy's -ftz=true
flushing of denormal intermediate results).

Hyper-parameters that change between steps are read by the kernel from a small
DEVICE array ``hyper`` (so a CUDA graph that captured the step can be replayed
with a new learning rate); the host writes it before each step with
:func:`write_hyper` (a host-to-device copy, no kernel):

* SGD  (:data:`SGD_HYPER_SIZE` = 1):  ``hyper[0] = lr``
* Adam (:data:`ADAM_HYPER_SIZE` = 2): ``hyper[0] = lr / (1 - b1**t)``,
  ``hyper[1] = 1 / (1 - b2**t)`` at step ``t >= 1`` (``step_count`` after its
  increment), computed in double (:func:`adam_hyper`) and rounded to the dtype.

The other hyper-parameters (momentum, Nesterov, weight decay, betas, eps) are
kernel scalars, rounded to the dtype as NumPy's ``t(...)`` does.

``skip=`` (float32 only): the loss scaler's device flag (:mod:`gpucnn.cuda.amp`);
the ``*_skip`` entry points leave every element as it is when ``skip[0] != 0``.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from . import loader
from .elementwise import _contiguous, _dtype, _kernel, _same_shape, _xp

__all__ = ["SGD_HYPER_SIZE", "ADAM_HYPER_SIZE", "sgd_hyper", "adam_hyper", "new_hyper", "write_hyper",
           "sgd_update", "adam_update"]

SGD_HYPER_SIZE = 1
ADAM_HYPER_SIZE = 2


def _number(func, name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{func}: {name} must be a host number, got {type(value).__name__} {value!r}")
    return float(value)


def sgd_hyper(lr) -> tuple[float]:
    """The values of SGD's ``hyper`` array: ``(lr,)``."""
    return (_number("sgd_hyper", "lr", lr),)


def adam_hyper(lr, betas, step) -> tuple[float, float]:
    """The values of Adam's ``hyper`` array at step ``step`` (>= 1), in double as gpucnn/optim.py:
    ``(lr / (1 - b1**step), 1 / (1 - b2**step))``."""
    lr = _number("adam_hyper", "lr", lr)
    b1, b2 = (_number("adam_hyper", "betas", b) for b in betas)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"adam_hyper: step must be an int >= 1 (the step count after its increment), got {step!r}")
    return lr / (1 - b1 ** int(step)), 1 / (1 - b2 ** int(step))


def new_hyper(like, size: int):
    """An uninitialised ``hyper`` array of ``size`` elements on ``like``'s device, of its dtype."""
    xp = backend.get_array_module(like=like)
    return xp.empty((int(size),), dtype=like.dtype)


def write_hyper(hyper, values) -> None:
    """Copy host ``values`` into the device array ``hyper`` (rounded to its dtype; no kernel)."""
    host = np.asarray(values, dtype=hyper.dtype).reshape(hyper.shape)
    if backend.is_cupy(hyper):
        hyper.set(host)
    else:
        hyper[...] = host


def _check_common(func, p, g, hyper, size, slots):
    dtype = _dtype(func, p=p, g=g, hyper=hyper, **slots)
    _contiguous(func, p=p, g=g, hyper=hyper, **slots)
    _same_shape(func, "g", g, p.shape, "the shape of p")
    for name, a in slots.items():
        if a is not None:
            _same_shape(func, name, a, p.shape, "the shape of p")
    if hyper.ndim != 1 or hyper.shape[0] < size:
        raise ValueError(f"{func}: hyper must be 1-D with at least {size} element(s), got shape {tuple(hyper.shape)}")
    if p.size < 1:
        raise ValueError(f"{func}: p is empty (shape {tuple(p.shape)})")
    if isinstance(p, np.ndarray) and not p.flags.writeable:
        raise ValueError(f"{func}: p is read-only")
    return dtype


def _skip_flag(func, skip, dtype):
    """``skip`` checked: an int32 array of at least one element, with float32 buffers."""
    if getattr(skip, "dtype", None) != np.int32 or skip.ndim != 1 or skip.shape[0] < 1:
        raise TypeError(f"{func}: skip must be a 1-D int32 device array (the loss scaler's flag), got "
                        f"{getattr(skip, 'dtype', type(skip).__name__)} {tuple(getattr(skip, 'shape', ()))}")
    if dtype != np.float32:
        raise TypeError(f"{func}: skip= runs on float32 buffers only (fp16 mode's master weights), got {dtype}")


def sgd_update(p, g, v, hyper, momentum, weight_decay, nesterov, skip=None):
    """One SGD step in place: ``p`` (and the momentum buffer ``v``) updated.

    Args:
        p: flat (any shape) float32 or float64 parameter buffer, C-contiguous.
        g: its gradient, same shape and dtype.
        v: the momentum buffer (same shape and dtype), or None / anything unused
            when ``momentum == 0``.
        hyper: device array of p's dtype, ``hyper[0] = lr`` (:func:`write_hyper`).
        momentum: mu in [0, 1); weight_decay: >= 0; nesterov: bool (needs mu > 0).
        skip: None, or an int32 device array whose element 0, when nonzero, makes the step
            change nothing (float32 only; the loss scaler's overflow flag).
    Returns:
        p.
    Launches: 1, ``sgd_update[_f64]`` (``sgd_update_skip`` with ``skip``), one thread per element:
        grid (ceil(p.size / 256), 1, 1), block (256, 1, 1).
    """
    func = "sgd_update"
    mu = _number(func, "momentum", momentum)
    wd = _number(func, "weight_decay", weight_decay)
    if nesterov and mu == 0:
        raise ValueError(f"{func}: nesterov=True needs momentum > 0")
    slot = v if mu != 0 else None
    if mu != 0 and v is None:
        raise ValueError(f"{func}: momentum={momentum!r} needs the momentum buffer v")
    _xp(p=p, g=g, v=slot, hyper=hyper, skip=skip)
    dtype = _check_common(func, p, g, hyper, SGD_HYPER_SIZE, {"v": slot})
    args = (p, g, slot if slot is not None else p, hyper, p.size, mu, wd, int(bool(nesterov)))
    if skip is None:
        loader.launch(_kernel(func, dtype), args, n_threads=p.size)
    else:
        _skip_flag(func, skip, dtype)
        loader.launch("sgd_update_skip", args + (skip,), n_threads=p.size)
    return p


def adam_update(p, g, m, v, hyper, betas, eps, weight_decay, skip=None):
    """One Adam step in place: ``p``, ``m`` and ``v`` updated.

    Args:
        p: flat float32 or float64 parameter buffer, C-contiguous.
        g, m, v: gradient, first and second moment buffers, same shape and dtype.
        hyper: device array of p's dtype, ``(lr / (1 - b1**t), 1 / (1 - b2**t))``
            (:func:`adam_hyper` + :func:`write_hyper`).
        betas: (b1, b2); eps > 0; weight_decay >= 0 (L2 added to the gradient).
        skip: as for :func:`sgd_update`.
    Returns:
        p.
    Launches: 1, ``adam_update[_f64]`` (``adam_update_skip`` with ``skip``), one thread per element:
        grid (ceil(p.size / 256), 1, 1), block (256, 1, 1).
    """
    func = "adam_update"
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{func}: betas must be a pair (b1, b2), got {betas!r}") from None
    b1, b2 = _number(func, "betas[0]", b1), _number(func, "betas[1]", b2)
    eps = _number(func, "eps", eps)
    wd = _number(func, "weight_decay", weight_decay)
    if m is None or v is None:
        raise ValueError(f"{func}: needs both moment buffers m and v")
    _xp(p=p, g=g, m=m, v=v, hyper=hyper, skip=skip)
    dtype = _check_common(func, p, g, hyper, ADAM_HYPER_SIZE, {"m": m, "v": v})
    if len({id(p), id(g), id(m), id(v)}) < 4:
        raise ValueError(f"{func}: p, g, m and v must be four distinct buffers")
    args = (p, g, m, v, hyper, p.size, b1, 1 - b1, b2, 1 - b2, eps, wd)
    if skip is None:
        loader.launch(_kernel(func, dtype), args, n_threads=p.size)
    else:
        _skip_flag(func, skip, dtype)
        loader.launch("adam_update_skip", args + (skip,), n_threads=p.size)
    return p
