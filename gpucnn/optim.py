"""Optimizers: SGD (momentum, Nesterov, weight decay) and Adam.

An optimizer takes ``(name, layer, key)`` triples from
``model.named_parameters()``, moves those parameters and their gradients into
flat buffers (one per dtype and device; the layers keep views) and updates the
whole buffer in place each step, so it works for any device.  Conventions follow PyTorch
(weight decay is L2 added to the gradient; momentum buffer ``v = mu v + g``;
Nesterov uses ``g + mu v``), so runs are comparable.

``lr`` is a plain attribute: schedules assign it between steps.

On CuPy buffers a step is one kernel per buffer (``kernels/optim.cu``,
:mod:`gpucnn.cuda.optim`, chosen at the one dispatch seam
:func:`gpucnn.functional._dispatch.use_kernels`).  The hyper-parameters that
change between steps (the learning rate; Adam's bias corrections) are read by
the kernel from a small device array, so a captured CUDA graph replays with a
new learning rate: :meth:`Optimizer.step` writes it from ``lr`` (a tiny
host-to-device copy), or takes ``hyper=`` rows the caller uploaded for many
steps at once (:meth:`Optimizer.hyper_table`; :class:`~gpucnn.train.Trainer`
does this once per epoch, so its steps never wait on the host).

A step can be skipped by a flag on the device (``step(skip=...)``, what
:class:`~gpucnn.train.LossScaler` passes when fp16 gradients overflowed): the
kernels read it and change nothing, so the host never has to look.  A
skipped step still counts in ``step_count`` -- it numbers the train steps,
whose hyper rows the trainer uploads before it knows which were skipped -- so
Adam's bias correction counts skipped steps too (unlike PyTorch, whose
``GradScaler`` does not call a skipped ``optimizer.step()``).
"""
from __future__ import annotations

import numpy as np

from . import backend, threads
from .functional import _dispatch
from .layers.flat import flatten
from .nvtx import ranged


class Optimizer:
    """Base class: parameters in flat buffers (:mod:`gpucnn.layers.flat`), slots alike.

    Creating an optimizer moves the parameters and gradients it is given into
    one buffer per dtype and device (the layers keep views of it), so a step
    is a few whole-buffer operations on NumPy and one kernel per buffer on a
    GPU.  Slots (momentum, Adam's moments) are flat buffers too;
    :meth:`state_dict` names them per parameter, as ``"<name>/<slot>"``.
    Where worker processes can be forked, a CPU group's parameters live in
    shared memory (:func:`gpucnn.threads.shared_empty`) from the start, so the
    micro-batch workers of :mod:`gpucnn.train.workers` read every update and
    no array handed out is ever swapped for a shared one later.
    """

    SLOTS: tuple = ()
    #: values of the device ``hyper`` array the kernels read (see :meth:`hyper_values`)
    HYPER_SIZE: int = 1

    def __init__(self, model_or_params, lr):
        params = model_or_params.named_parameters() if hasattr(model_or_params, "named_parameters") else list(model_or_params)
        if not params:
            raise ValueError("optimizer got no parameters")
        self.params = params
        self.groups = flatten(params, alloc=threads.shared_empty if threads.can_fork() else None)
        self.lr = float(lr)
        self.step_count = 0
        self.slots: list[dict] = [{} for _ in self.groups]   # per group: slot -> flat buffer
        self._hyper: list = [None] * len(self.groups)          # per kernel group: its device hyper array

    def _slot(self, gi: int, key: str):
        slots = self.slots[gi]
        if key not in slots:
            xp = backend.get_array_module(self.groups[gi].params)
            slots[key] = xp.zeros_like(self.groups[gi].params)
        return slots[key]

    def step(self, hyper=None, skip=None):
        """One update of every parameter with the gradients in ``grads``.

        Args:
            hyper: only for groups on the kernel path: ``{dtype: device row}``
                holding :meth:`hyper_values` for this step (rows of an uploaded
                :meth:`hyper_table`); None writes them from ``lr`` now.
            skip: None, or an int32 array on the groups' device (a
                :class:`~gpucnn.train.LossScaler`'s flag): when its element 0
                is nonzero, every parameter and slot stays as it is, bit for
                bit (the kernels read the flag themselves; nothing waits for
                the device).  ``step_count`` advances either way.
        """
        self.step_count += 1
        for gi, group in enumerate(self.groups):
            group.check(type(self).__name__)
            if _dispatch.use_kernels(group.params):
                row = None if hyper is None else hyper.get(group.dtype)
                if row is None:
                    row = self._hyper_array(gi)
                    from .cuda.optim import write_hyper

                    write_hyper(row, self.hyper_values(self.lr, self.step_count))
                if skip is None:
                    self._update_kernel(gi, group.params, group.grads, row)
                else:
                    self._update_kernel(gi, group.params, group.grads, row, skip=skip)
            elif skip is not None and skip[0]:         # a NumPy flag: read for free
                for key in self._slot_keys():           # the slots the kernel path makes before it skips
                    self._slot(gi, key)
            else:
                self._update(gi, group.params, group.grads)

    def _slot_keys(self) -> tuple:
        """The slots an update uses (made, as zeros, at the first step: skipped or not)."""
        return self.SLOTS

    def _hyper_array(self, gi):
        if self._hyper[gi] is None:
            from .cuda.optim import new_hyper

            self._hyper[gi] = new_hyper(self.groups[gi].params, self.HYPER_SIZE)
        return self._hyper[gi]

    def hyper_values(self, lr: float, step: int) -> tuple:
        """What the kernels read from ``hyper`` at step ``step`` (>= 1) with learning rate ``lr``."""
        return (float(lr),)

    def hyper_table(self, lrs, first_step: int, dtype) -> np.ndarray:
        """Host array ``(len(lrs), HYPER_SIZE)`` of :meth:`hyper_values` for steps
        ``first_step, first_step + 1, ...`` with learning rates ``lrs``, rounded to ``dtype``."""
        rows = [self.hyper_values(lr, first_step + i) for i, lr in enumerate(lrs)]
        return np.asarray(rows, dtype=dtype).reshape(len(rows), self.HYPER_SIZE)

    def _update(self, gi, p, g):  # pragma: no cover - abstract
        raise NotImplementedError

    def _update_kernel(self, gi, p, g, hyper, skip=None):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def state(self) -> dict:
        """``{parameter name: {slot: view}}`` (views of the flat slot buffers)."""
        out: dict = {}
        for group, slots in zip(self.groups, self.slots):
            for key, flat in slots.items():
                for name, view in group.views(flat).items():
                    out.setdefault(name, {})[key] = view
        return out

    def state_dict(self) -> dict:
        """Hyper-parameters, step count and NumPy copies of every slot, per parameter."""
        return {
            "type": type(self).__name__,
            "hyper": self.hyper(),
            "step_count": self.step_count,
            "slots": {f"{n}/{k}": backend.asnumpy(v).copy() for n, s in self.state.items() for k, v in s.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("type") != type(self).__name__:
            raise ValueError(f"optimizer state is for {state.get('type')!r}, this is {type(self).__name__}")
        names = {n: layer.params[k] for n, layer, k in self.params}
        hyper = dict(state["hyper"])
        if set(hyper) != set(self.hyper()):
            raise ValueError(f"optimizer hyper-parameters {sorted(hyper)} do not match "
                             f"{type(self).__name__}'s {sorted(self.hyper())}")
        self._check_hyper(**hyper)
        loaded = {}
        for full, value in state["slots"].items():
            n, k = full.rsplit("/", 1)
            if n not in names:
                raise ValueError(f"optimizer state names unknown parameter {n!r}")
            if k not in self.SLOTS:
                raise ValueError(f"optimizer slot {full}: {type(self).__name__} has no slot {k!r} "
                                 f"(expected one of {list(self.SLOTS)})")
            p = names[n]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"optimizer slot {full}: shape {tuple(value.shape)} != parameter {tuple(p.shape)}")
            if value.dtype != p.dtype:
                raise TypeError(f"optimizer slot {full}: dtype {value.dtype} != parameter dtype {p.dtype}")
            loaded[(n, k)] = value
        step_count = state["step_count"]
        if isinstance(step_count, bool) or not isinstance(step_count, (int, np.integer)) or step_count < 0:
            raise ValueError(f"optimizer step_count must be a non-negative int, got {step_count!r}")
        keys = {k for _, k in loaded}
        self.slots = [{} for _ in self.groups]
        for gi, group in enumerate(self.groups):
            for k in sorted(keys):
                views = group.views(self._slot(gi, k))
                for name, view in views.items():
                    if (name, k) in loaded:
                        view[...] = backend.to_device(np.array(loaded[(name, k)], copy=True), group.device)
        self.step_count = int(step_count)
        for k, v in hyper.items():
            setattr(self, k, tuple(v) if isinstance(v, list) else v)

    def hyper(self) -> dict:
        return {"lr": self.lr}

    @staticmethod
    def _check_lr(lr):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or lr == float("inf"):
            raise ValueError(f"lr must be > 0, got lr={lr!r}")

    def _check_hyper(self, **hyper):  # pragma: no cover - overridden
        self._check_lr(hyper["lr"])


class SGD(Optimizer):
    """Stochastic gradient descent, seed 001's ``w <- w - eta dL/dw``, plus momentum.

    Args:
        params: a model (anything with ``named_parameters()``) or that list.
        lr: learning rate eta > 0.  momentum: mu in [0, 1).  nesterov: needs mu > 0.
        weight_decay: L2 coefficient >= 0 (added to the gradient).
    """

    SLOTS = ("momentum",)

    def __init__(self, params, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0):
        self._check_hyper(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, lr)
        self.momentum, self.nesterov, self.weight_decay = float(momentum), bool(nesterov), float(weight_decay)

    def hyper(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    def _check_hyper(self, lr, momentum, nesterov, weight_decay):
        self._check_lr(lr)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got momentum={momentum!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        if not 0 <= weight_decay < float("inf"):
            raise ValueError(f"weight_decay must be >= 0, got weight_decay={weight_decay!r}")

    @ranged("SGD.step")
    def step(self, hyper=None, skip=None):
        super().step(hyper, skip)

    def _slot_keys(self):
        return ("momentum",) if self.momentum else ()

    def _update_kernel(self, gi, p, g, hyper, skip=None):
        from .cuda.optim import sgd_update

        v = self._slot(gi, "momentum") if self.momentum else None
        sgd_update(p, g, v, hyper, self.momentum, self.weight_decay, self.nesterov, skip=skip)

    def _update(self, gi, p, g):
        t = p.dtype.type
        if self.weight_decay:
            g = g + t(self.weight_decay) * p
        if self.momentum:
            v = self._slot(gi, "momentum")
            v *= t(self.momentum)
            v += g
            g = g + t(self.momentum) * v if self.nesterov else v
        p -= t(self.lr) * g


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; weight_decay is L2 on the gradient.

    Args:
        lr > 0; betas in [0, 1); eps > 0; weight_decay >= 0.
    """

    SLOTS = ("m", "v")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self._check_hyper(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, lr)
        b1, b2 = betas
        self.betas, self.eps, self.weight_decay = (float(b1), float(b2)), float(eps), float(weight_decay)

    def hyper(self):
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}

    def _check_hyper(self, lr, betas, eps, weight_decay):
        self._check_lr(lr)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got betas={betas!r}")
        if not 0 < eps < float("inf"):
            raise ValueError(f"eps must be > 0, got eps={eps!r}")
        if not 0 <= weight_decay < float("inf"):
            raise ValueError(f"weight_decay must be >= 0, got weight_decay={weight_decay!r}")

    HYPER_SIZE = 2

    @ranged("Adam.step")
    def step(self, hyper=None, skip=None):
        super().step(hyper, skip)

    def hyper_values(self, lr, step):
        from .cuda.optim import adam_hyper

        return adam_hyper(lr, self.betas, step)

    def _update_kernel(self, gi, p, g, hyper, skip=None):
        from .cuda.optim import adam_update

        adam_update(p, g, self._slot(gi, "m"), self._slot(gi, "v"), hyper, self.betas, self.eps,
                    self.weight_decay, skip=skip)

    def _update(self, gi, p, g):
        t = p.dtype.type
        b1, b2 = self.betas
        if self.weight_decay:
            g = g + t(self.weight_decay) * p
        m = self._slot(gi, "m")
        v = self._slot(gi, "v")
        m *= t(b1)
        m += t(1 - b1) * g
        v *= t(b2)
        v += t(1 - b2) * (g * g)
        k = self.step_count
        step = self.lr / (1 - b1**k)
        denom = (v * t(1 / (1 - b2**k))) ** 0.5 + t(self.eps)
        p -= t(step) * m / denom


OPTIMIZERS = {"sgd": SGD, "adam": Adam}
