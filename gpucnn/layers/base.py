"""The :class:`Layer` protocol every layer, and :class:`Sequential`, follows.

A layer owns two dicts with the same keys: ``params`` (arrays, writable in
place) and ``grads`` (filled by ``backward``).  ``forward(x)`` keeps only what
``backward`` needs; ``backward(dy)`` returns dL/dx and **overwrites**
``grads`` in place (gradients never accumulate across calls: one forward, one
backward, one optimizer step).  ``training`` switches train/eval behaviour
(RReLU).  Every subclass's ``forward``/``backward`` is wrapped in an NVTX range
named ``<Class>.forward`` / ``<Class>.backward`` (a no-op unless enabled).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..nvtx import ranged


class Layer:
    """Base class: parameters, gradients, the training flag and device/dtype moves."""

    def __init__(self):
        self.params: dict = {}
        self.grads: dict = {}
        self.training = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for method in ("forward", "backward"):
            fn = cls.__dict__.get(method)
            if fn is not None and not getattr(fn, "_nvtx_wrapped", False):
                wrapped = ranged(f"{cls.__name__}.{method}")(fn)
                wrapped._nvtx_wrapped = True
                setattr(cls, method, wrapped)

    # -- the protocol ------------------------------------------------------
    def forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    # -- parameters --------------------------------------------------------
    def _add_param(self, name: str, value) -> None:
        self.params[name] = value
        xp = backend.get_array_module(value)
        self.grads[name] = xp.zeros_like(value)

    def _set_grad(self, name: str, value) -> None:
        """Overwrite the stored gradient in place (keeps array identity for optimizers)."""
        self.grads[name][...] = value

    def named_parameters(self, prefix: str = ""):
        """List of ``(name, layer, key)``; ``layer.params[key]`` is the array."""
        return [(f"{prefix}{k}", self, k) for k in self.params]

    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def dtype(self):
        for p in self.params.values():
            return p.dtype
        return None

    def astype(self, dtype):
        """Convert parameters (and gradients) to ``dtype`` (float32 or float64)."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got dtype={dtype}")
        for k in list(self.params):
            self.params[k] = self.params[k].astype(dtype)
            self.grads[k] = self.grads[k].astype(dtype)
        return self

    def to(self, device: str):
        """Move parameters and gradients to ``"cpu"`` or ``"cuda"`` (explicit copy)."""
        for k in list(self.params):
            self.params[k] = backend.to_device(self.params[k], device)
            self.grads[k] = backend.to_device(self.grads[k], device)
        return self

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def _check_forward_called(self, *cached):
        if any(c is None for c in cached):
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
