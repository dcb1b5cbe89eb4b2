"""The :class:`Layer` protocol every layer, and :class:`Sequential`, follows.

A layer owns two dicts with the same keys: ``params`` (arrays, writable in
place) and ``grads`` (filled by ``backward``).  ``forward(x)`` keeps only what
``backward`` needs; ``backward(dy)`` returns dL/dx and **overwrites**
``grads`` in place (gradients never accumulate across calls: one forward, one
backward, one optimizer step).  ``training`` switches train/eval behaviour
(RReLU).

Two entry points per pass:

* ``forward(x)`` / ``backward(dy)`` -- the public ones, NCHW images and
  ``(N, F)`` vectors in and out, each wrapped in an NVTX range named
  ``<Class>.forward`` / ``<Class>.backward`` (a no-op unless enabled);
* ``forward_internal(x)`` / ``backward_internal(dy)`` -- the same pass on the
  batch-last layout (:mod:`gpucnn.functional.layout`), which
  :class:`Sequential` uses between its layers so that nothing is transposed
  inside a network.

A layer of your own only needs ``forward`` and ``backward``: its internal
versions convert around them.  gpucnn's layers implement the internal pair
(:class:`InternalLayer`) and get the public one from it.  Whatever a public
call returns is a new array; internal results may be the layer's reused
buffers (:class:`~gpucnn.functional.workspace.Workspace`), valid until its
next call.
"""
from __future__ import annotations

import copy
import functools

import numpy as np

from .. import backend, nvtx
from ..functional.layout import from_internal, to_internal
from ..functional.workspace import Workspace


def _ranged_method(fn, what: str):
    """Wrap a forward/backward in an NVTX range named after the concrete class (free when off)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if not nvtx._enabled:
            return fn(self, *args, **kwargs)
        with nvtx.nvtx_range(f"{type(self).__name__}.{what}"):
            return fn(self, *args, **kwargs)

    wrapper._nvtx_wrapped = True
    return wrapper


class Layer:
    """Base class: parameters, gradients, the training flag and device/dtype moves."""

    #: Whether each sample's output and input gradient depend on that sample alone and the
    #: parameter gradients are sums over the samples, so that a train step may split its batch
    #: into micro-batches (:mod:`gpucnn.train.microbatch`).  Read from the layer's own class
    #: only (a subclass may couple the samples): a layer that does not say so is never split.
    batch_independent = False

    def __init__(self):
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}     # state that is not trained (BatchNorm's running statistics)
        self.training = True
        self.workspace = Workspace()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for method in ("forward", "backward"):
            fn = cls.__dict__.get(method)
            if fn is not None and not getattr(fn, "_nvtx_wrapped", False):
                setattr(cls, method, _ranged_method(fn, method))

    # -- the protocol ------------------------------------------------------
    def forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_internal(self, x):
        """``forward`` on the batch-last layout (converting around the public one)."""
        return to_internal(self.forward(from_internal(x)))

    def backward_internal(self, dy, need_input_grad: bool = True):
        """``backward`` on the batch-last layout; ``None`` when ``need_input_grad`` is False."""
        dx = self.backward(from_internal(dy))
        return None if dx is None or not need_input_grad else to_internal(dx)

    def __call__(self, x):
        return self.forward(x)

    def children(self) -> list:
        """The layers this one runs (a container's members; none for a plain layer)."""
        return []

    def replica(self):
        """A twin for another worker: the same parameter arrays (never written by a pass), its own
        gradient arrays, workspace and forward state; other attributes copied as they are now.  A
        layer holding layers must replicate them (Sequential and Residual do; the micro-batch split
        refuses a container whose own class does not define ``replica``).  Used by
        :mod:`gpucnn.train.microbatch`."""
        twin = copy.copy(self)
        twin.grads = {k: backend.get_array_module(g).zeros_like(g) for k, g in self.grads.items()}
        twin.workspace = Workspace()
        return twin

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

    def named_buffers(self, prefix: str = ""):
        """List of ``(name, layer, key)``; ``layer.buffers[key]`` is the array (saved, not trained)."""
        return [(f"{prefix}{k}", self, k) for k in self.buffers]

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
        for k, v in list(self.buffers.items()):
            if v.dtype.kind == "f":
                self.buffers[k] = v.astype(dtype)
        self.workspace.clear()
        return self

    def to(self, device: str):
        """Move parameters and gradients to ``"cpu"`` or ``"cuda"`` (explicit copy)."""
        for k in list(self.params):
            self.params[k] = backend.to_device(self.params[k], device)
            self.grads[k] = backend.to_device(self.grads[k], device)
        for k in list(self.buffers):
            self.buffers[k] = backend.to_device(self.buffers[k], device)
        self.workspace.clear()
        return self

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def _check_forward_called(self, *cached):
        if any(c is None for c in cached):
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")


class InternalLayer(Layer):
    """A layer written on the batch-last layout: the public passes convert around the internal ones."""

    def forward(self, x):
        self._check_public_input(x)
        return from_internal(self.forward_internal(to_internal(x)))

    def backward(self, dy):
        dx = self.backward_internal(to_internal(self._check_public_grad(dy)),
                                    need_input_grad=getattr(self, "needs_input_grad", True))
        return None if dx is None else from_internal(dx)

    def _check_public_input(self, x):
        """Checks a public input must pass before it is converted (rank, dtype)."""

    def _check_public_grad(self, dy):
        return dy

    def forward_internal(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward_internal(self, dy, need_input_grad: bool = True):  # pragma: no cover - abstract
        raise NotImplementedError


def indent_repr(obj, by: str = "  ") -> str:
    """``repr(obj)`` with every line after the first indented, for nesting inside a container's repr."""
    return repr(obj).replace("\n", "\n" + by)
