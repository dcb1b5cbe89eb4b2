"""The :class:`Layer` contract: what every layer, and :class:`Sequential`, follows.

A layer owns two dicts with the same keys: ``params`` (arrays, writable in
place) and ``grads`` (filled by ``backward``).  ``forward(x)`` keeps only what
``backward`` needs; ``backward(dy)`` returns dL/dx and **overwrites**
``grads`` in place (gradients never accumulate across calls: one forward, one
backward, one optimizer step).  ``training`` switches train/eval behaviour;
``input_grad = False`` (the first layer of a network) lets ``backward`` skip
dL/dx and return ``None``.

**What you override is what runs.**  ``forward(x)`` / ``backward(dy)`` on NCHW
images and ``(N, F)`` vectors are the only methods a layer of your own
defines, alone or inside a :class:`~gpucnn.layers.Sequential` or a
:class:`~gpucnn.layers.Residual`.  gpucnn's own layers compute on the
batch-last layout (:mod:`gpucnn.functional.layout`) in two private methods,

* ``_forward(x, epilogue=None)`` -- ``epilogue`` an :class:`Epilogue`: the
  activation and max pooling a container fuses into this call, or None;
* ``_backward(dy, input_grad=True)`` -- dL/dx (None when not ``input_grad``),

which the public methods here convert around and containers call directly, so
that nothing is transposed inside a network.  A layer whose ``forward`` or
``backward`` is not gpucnn's own -- one of yours, or a built-in's subclass
overriding them (``class DoubleReLU(ReLU): def forward(self, x): return
super().forward(x) * 2``) -- is run through its public methods: converted at
its boundary, neither fused nor split into micro-batches, and a Sequential's
``repr`` says so (:func:`runs_batch_last`).  Containers call their members through
:func:`run_forward` / :func:`run_backward`, the one place that choice is made.

Public calls return new arrays; ``_forward``/``_backward`` results may be the
layer's reused buffers (:class:`~gpucnn.functional.workspace.Workspace`),
valid until its next call.  Public ``forward``/``backward`` run in NVTX ranges
``<Class>.forward`` / ``<Class>.backward`` (free unless enabled).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .. import backend, nvtx
from .._utils import check_array, shown_shape
from ..functional.layout import from_internal, to_internal
from ..functional.workspace import Workspace

__all__ = ["Layer", "Epilogue", "builtin_pass", "runs_batch_last", "compute_class", "run_forward", "run_backward",
           "indent_repr"]


@dataclass(frozen=True)
class Epilogue:
    """What a container fuses into a layer's ``_forward``: an activation (``"relu"``, ``"sigmoid"``,
    ``"tanh"``) and a max pooling ``((kh, kw), (sh, sw))`` applied last, each optional."""

    act: str | None = None
    pool: tuple | None = None


def _ranged_method(fn, what: str):
    """Wrap a forward/backward in an NVTX range named after the concrete class (free when off)."""

    inside = f"_nvtx_in_{what}"

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if not nvtx._enabled or self.__dict__.get(inside):   # one range per call, not one per super()
            return fn(self, *args, **kwargs)
        self.__dict__[inside] = True
        try:
            with nvtx.nvtx_range(f"{type(self).__name__}.{what}"):
                return fn(self, *args, **kwargs)
        finally:
            self.__dict__[inside] = False

    wrapper._nvtx_wrapped = True
    return wrapper


def _owner(cls, name: str):
    """The class in ``cls``'s MRO that defines ``name`` (None: none does)."""
    return next((k for k in cls.__mro__ if name in vars(k)), None)


def builtin_pass(fn):
    """Mark a public ``forward``/``backward`` as gpucnn's own: it only checks, converts and calls the
    layer's batch-last ``_forward``/``_backward``, so a container may call those directly."""
    fn._gpucnn_pass = True
    return fn


@functools.lru_cache(maxsize=None)
def _class_runs_batch_last(cls, forward, backward) -> bool:
    if _owner(cls, "_forward") in (None, Layer) or _owner(cls, "_backward") in (None, Layer):
        return False
    return getattr(forward, "_gpucnn_pass", False) and getattr(backward, "_gpucnn_pass", False)


def runs_batch_last(layer) -> bool:
    """Whether containers may call ``layer``'s batch-last compute directly: True when the
    ``forward`` and ``backward`` it resolves to are gpucnn's own (:func:`builtin_pass`) -- its layers
    and subclasses that leave those two alone; False for anything else (a layer of yours, a
    built-in's subclass or instance with ``forward``/``backward`` replaced, at any depth), which
    then runs through its public methods, converted at its boundary, unfused and never split into
    micro-batches.  Names such as ``_forward`` in a layer of yours change nothing."""
    cls = type(layer)
    return (_class_runs_batch_last(cls, cls.forward, cls.backward)
            and "forward" not in layer.__dict__ and "backward" not in layer.__dict__)


def compute_class(layer):
    """The most derived class defining the ``_forward`` / ``_backward`` a batch-last ``layer`` runs
    (what fusion and the micro-batch split key on: a subclass redefining either is its own
    computation), or None when the layer runs through its public methods."""
    if not runs_batch_last(layer):
        return None
    cls = type(layer)
    fwd, bwd = _owner(cls, "_forward"), _owner(cls, "_backward")
    return fwd if issubclass(fwd, bwd) else bwd


def run_forward(layer, x, epilogue: Epilogue | None = None):
    """``layer``'s forward on the batch-last ``x``: its compute, or its public ``forward`` converted."""
    if runs_batch_last(layer):
        return layer._forward(x, epilogue)
    if epilogue is not None:
        raise ValueError(f"{type(layer).__name__} runs its own forward: nothing can be fused into it")
    layer.__dict__["_own_pass_input"] = shown_shape(x, True)   # what its backward must give back
    return to_internal(layer.forward(from_internal(x)))


def run_backward(layer, dy, input_grad: bool = True):
    """``layer``'s backward on the batch-last ``dy``; dL/dx batch-last, or None when not ``input_grad``."""
    if runs_batch_last(layer):
        return layer._backward(dy, input_grad)
    dx = layer.backward(from_internal(dy))
    if not input_grad:
        return None
    name, expected = type(layer).__name__, layer.__dict__.get("_own_pass_input")
    if dx is None or not hasattr(dx, "shape"):
        raise TypeError(f"{name}.backward returned {type(dx).__name__} instead of dL/dx, an array of shape "
                        f"{expected} (its forward's input)")
    if expected is not None and tuple(dx.shape) != expected:
        raise ValueError(f"{name}.backward returned dL/dx of shape {tuple(dx.shape)}, expected {expected} "
                         f"(its forward's input)")
    return to_internal(dx)


class Layer:
    """Base class of every layer: parameters, gradients, the training and input-gradient flags,
    device and dtype moves, and the public passes of gpucnn's batch-last layers."""

    def __init__(self):
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}     # state that is not trained (BatchNorm's running statistics)
        self.training = True
        self.input_grad = True      # False: backward skips dL/dx and returns None
        self.workspace = Workspace()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for method in ("forward", "backward"):
            fn = cls.__dict__.get(method)
            if fn is not None and not getattr(fn, "_nvtx_wrapped", False):
                setattr(cls, method, _ranged_method(fn, method))

    # -- the passes ----------------------------------------------------------
    @builtin_pass
    def forward(self, x):
        """``y`` for a public ``x`` (NCHW images or ``(N, F)`` vectors).  Override it (and
        :meth:`backward`) in a layer of your own; gpucnn's layers convert around ``_forward``."""
        self._require_compute("forward")
        self._check_public(x, "x")
        self._public_device = backend.device_of(x)
        return from_internal(self._forward(to_internal(x)))

    @builtin_pass
    def backward(self, dy, input_grad: bool | None = None):
        """dL/dx for the public ``dy`` of the last forward; overwrites ``grads``.  ``input_grad``
        (default: the layer's ``input_grad`` flag) False skips dL/dx and returns None."""
        self._require_compute("backward")
        self._check_public(dy, "dy")
        want = self.input_grad if input_grad is None else bool(input_grad)
        dx = self._backward(to_internal(dy), want)
        return None if dx is None or not want else from_internal(dx)

    #: A stochastic layer's draw fixed by a public ``forward(x, <name>=...)`` (tests), batch-last.
    _fixed = None

    def _forward_fixing(self, x, draw, name: str):
        """:meth:`forward` with ``draw`` (the shape of ``x``, on its device) in place of the random one."""
        self._check_public(x, "x")
        if draw is not None:
            backend.check_same_device(x=x, **{name: draw})
            if draw.shape != x.shape:
                raise ValueError(f"{type(self).__name__}: {name} shape {draw.shape} != x shape {x.shape}")
            draw = to_internal(draw)
        self._fixed = draw
        try:
            return Layer.forward(self, x)
        finally:
            self._fixed = None

    def _require_compute(self, what: str) -> None:
        if _owner(type(self), "_" + what) is Layer:
            raise NotImplementedError(f"{type(self).__name__} must define {what}(self, "
                                      f"{'x' if what == 'forward' else 'dy'}) (gpucnn.layers.Layer's contract)")

    def _check_public(self, a, name: str) -> None:
        """What a public array must pass before it is converted: an array with a batch axis, on the
        device of the layer's parameters (``dy``: of the forward).  Ranks, dtypes and shapes are the
        layer's ``_forward``/``_backward``'s to check, in its own terms, once per pass."""
        layer = type(self).__name__
        check_array(a, name, None, layer if name == "x" else f"{layer}.backward")
        if a.ndim == 0:
            raise ValueError(f"{layer}: {name} must have a batch axis first, got a 0-d array")
        ref = next(iter(self.params.values()), None)
        if ref is not None:
            backend.check_same_device(**{name: a, f"{layer} parameters": ref})
        elif name == "dy" and getattr(self, "_public_device", None) is not None:
            backend.check_devices(dy=backend.device_of(a), saved=self._public_device)

    def _forward(self, x, epilogue: Epilogue | None = None):  # pragma: no cover - gpucnn's layers define it
        raise NotImplementedError

    def _backward(self, dy, input_grad: bool = True):  # pragma: no cover - gpucnn's layers define it
        raise NotImplementedError

    def _no_epilogue(self, epilogue) -> None:
        if epilogue is not None:
            raise ValueError(f"{type(self).__name__} fuses nothing into its forward, got {epilogue!r}")

    def __call__(self, x):
        return self.forward(x)

    def children(self) -> list:
        """The layers this one runs (a container's members; none for a plain layer)."""
        return []

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

    # -- what backward accepts: the one check of dy, in the layer's terms ------
    _expected = None

    def _expect(self, y):
        """Record the forward's output ``y`` (shape, dtype, device): what :meth:`_check_dy` holds dy to."""
        self._expected = (tuple(y.shape), y.dtype, backend.device_of(y))
        return y

    def _check_dy(self, dy) -> None:
        """``dy`` must be an array of the last forward's output shape, dtype and device (batch-last;
        messages show shapes batch-first)."""
        if self._expected is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        shape, dtype, device = self._expected
        name = f"{type(self).__name__}.backward"
        check_array(dy, "dy", None, name, internal=True)
        backend.check_devices(dy=backend.device_of(dy), saved=device)
        if tuple(dy.shape) != shape:
            raise ValueError(f"{name}: dy has shape {shown_shape(dy, True)}, expected {shown_shape(shape, True)}")
        if dy.dtype != dtype:
            raise TypeError(f"{name}: dy has dtype {dy.dtype} but forward ran in {dtype}")


# the base class's own public passes get their NVTX ranges too (__init_subclass__ wraps subclasses')
Layer.forward = _ranged_method(Layer.forward, "forward")
Layer.backward = _ranged_method(Layer.backward, "backward")


def indent_repr(obj, by: str = "  ") -> str:
    """``repr(obj)`` with every line after the first indented, for nesting inside a container's repr."""
    return repr(obj).replace("\n", "\n" + by)
