"""The registry of layer cases: one row per layer configuration (test-only helper).

The cross-cutting tests iterate over :data:`CASES`: the float64 gradient checks
(tests/test_gradients.py), PyTorch parity (tests/test_torch_parity.py), the
error checks (tests/test_errors.py), ONNX and safetensors export
(tests/test_export.py), the NumPy path against the kernel backends
(tests/test_network_backends.py), and batch independence and the registry's
own completeness (tests/test_layer_registry.py: every public class in
``gpucnn.layers.__all__`` has a row).  A new layer is its module plus one
:class:`LayerCase` here (and its PyTorch twin in :data:`TWINS`).

A row says: how to build the layer (float64), the input shapes it is fed, how
its inputs are drawn (away from kinks, distinct for max pooling), the
check_backward options and parity tolerances, the fixed-draw hook of a
stochastic layer (``RReLU.forward(x, slopes=...)``, ``Dropout.forward(x,
mask=...)``), whether the micro-batch split may assume it batch-independent,
whether it exports to ONNX and safetensors, and the bad inputs it must reject
with their exact messages.  The shape sweeps of tests/cases.py (the table
kernels are tested on) stay there.

Imported as ``from layer_cases import ...`` (tests/ is on sys.path); torch is
imported lazily, only by :func:`torch_twin`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest

import gpucnn
from gpucnn import layers as L
from gpucnn.layers.residual import basic_block
from helpers import TORCH_ATOL, TORCH_RTOL, away_from_kinks, shuffled_arange

F64 = np.float64
F32 = np.float32


# --------------------------------------------------------------------------- #
# what a row holds
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Reject:
    """A bad input the layer must refuse with ``error`` and a message containing ``message`` (exact text).

    ``call(layer)`` makes the bad call on the row's float64 layer (``bad_x`` feeds a wrong shape,
    ``bad_args`` calls a constructor and ignores the layer)."""

    id: str
    call: Callable[[Any], Any]
    error: type
    message: str


def bad_x(id, shape, error, message, dtype=F64, **forward_kwargs):
    """Reject: ``layer.forward(zeros(shape))`` (plus ``forward_kwargs``, e.g. wrong slopes)."""
    return Reject(id, lambda layer: layer.forward(np.zeros(shape, dtype), **forward_kwargs), error, message)


def bad_args(id, make, error, message):
    """Reject: the constructor call ``make()``."""
    return Reject(id, lambda layer: make(), error, message)


def normal(rng, shape, scale=1.0):
    return scale * rng.standard_normal(shape)


def kinkless(rng, shape, scale=1.0):
    """ReLU family: nothing within 0.1 of the kink at 0."""
    return away_from_kinks(scale * rng.standard_normal(shape))


def distinct(rng, shape, scale=1.0):
    """Max pooling: distinct, well-separated values (no ties, no near-ties)."""
    return shuffled_arange(shape, rng)


@dataclass(frozen=True)
class LayerCase:
    """One layer configuration and what every cross-cutting test needs to know about it."""

    id: str
    make: Callable[[], Any]               # -> the layer, float64 parameters, in its train/eval mode
    shapes: tuple                         # input shapes (NCHW or (N, F)); all must work with one layer
    draw: Callable = normal               # (rng, shape, scale) -> float64 input
    scale: float = 1.0
    grad: dict = field(default_factory=dict)        # check_backward options (max_elements, n_directions, ...)
    parity_tol: tuple = (TORCH_RTOL, TORCH_ATOL)    # (rtol, atol) of outputs and gradients vs PyTorch float64
    torch: bool = True                    # has a PyTorch twin in TWINS
    fixed: Callable | None = None         # (rng, shape) -> forward kwargs replacing a random draw
    batch_independent: bool = True        # the micro-batch split may cut its batch
    onnx: bool = True                     # to_onnx maps it
    safetensors: bool = True              # to_safetensors names its tensors
    rejects: tuple = ()                   # Reject rows: bad inputs and their messages

    def x(self, shape, seed=0):
        return self.draw(np.random.default_rng(seed), shape, self.scale)

    def forward_kwargs(self, shape, seed=0):
        return {} if self.fixed is None else self.fixed(np.random.default_rng(seed + 1000), shape)


def params(cases=None, *, where=lambda case: True):
    """``pytest.param`` per row (id = the row's id), optionally filtered."""
    return [pytest.param(c, id=c.id) for c in (CASES if cases is None else cases) if where(c)]


def shape_params(cases=None, *, where=lambda case: True):
    """``pytest.param((row, shape))`` for every input shape of every row."""
    return [pytest.param(c, s, id=f"{c.id}-{'x'.join(map(str, s))}")
            for c in (CASES if cases is None else cases) if where(c) for s in c.shapes]


def walk(layer):
    """``layer`` and every layer it holds."""
    yield layer
    for child in layer.children():
        yield from walk(child)


def randomize(layer, rng):
    """Every parameter N(0, 1), running means N(0, 1), running variances U(0.5, 2): nothing at a default."""
    for _, owner, key in layer.named_parameters():
        owner.params[key][...] = rng.standard_normal(owner.params[key].shape)
    for _, owner, key in layer.named_buffers():
        buf = owner.buffers[key]
        if key == "running_var":
            buf[...] = rng.uniform(0.5, 2.0, buf.shape)
        elif buf.dtype.kind == "f":
            buf[...] = rng.standard_normal(buf.shape)
    return layer


# --------------------------------------------------------------------------- #
# PyTorch twins: class -> builder(layer, fixed kwargs, build) -> torch.nn.Module
# --------------------------------------------------------------------------- #

#: gpucnn parameter key -> PyTorch's name for it (buffers keep their names).
TORCH_KEY = {"W": "weight", "b": "bias", "a": "weight", "gamma": "weight", "beta": "bias"}


def torch_name(name: str) -> str:
    """``"0.W"`` -> ``"0.weight"``: gpucnn's parameter name as the twin (and the safetensors export) names it."""
    head, _, key = name.rpartition(".")
    return f"{head}.{TORCH_KEY[key]}" if head else TORCH_KEY[key]


def _twins():
    import torch
    from torch import nn

    class Fn(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x)

    class Residual(nn.Module):
        def __init__(self, block, shortcut):
            super().__init__()
            self.block = block
            self.shortcut = shortcut

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    def rrelu(l, kw, build):
        if "slopes" in kw:
            s = torch.from_numpy(np.asarray(kw["slopes"]))
            return Fn(lambda x: torch.where(x >= 0, x, x * s.to(x.dtype)))
        return nn.RReLU(l.lower, l.upper)

    def dropout(l, kw, build):
        if "mask" in kw:
            m = torch.from_numpy(np.asarray(kw["mask"]))
            return Fn(lambda x: x * m.to(x.dtype) / (1 - l.p))
        return nn.Dropout(l.p)

    def bn(cls):
        return lambda l, kw, build: cls(l.num_features, l.eps, l.momentum, l.affine)

    return {
        L.Conv2D: lambda l, kw, build: nn.Conv2d(l.in_channels, l.out_channels, l.kernel_size, l.stride,
                                                 l.padding, bias="b" in l.params),
        L.Dense: lambda l, kw, build: nn.Linear(l.in_features, l.out_features, bias="b" in l.params),
        L.MaxPool2D: lambda l, kw, build: nn.MaxPool2d(l.kernel_size, l.stride),
        L.AvgPool2D: lambda l, kw, build: nn.AvgPool2d(l.kernel_size, l.stride),
        L.GlobalAvgPool2D: lambda l, kw, build: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        L.Flatten: lambda l, kw, build: nn.Flatten(),
        L.ReLU: lambda l, kw, build: nn.ReLU(),
        L.Sigmoid: lambda l, kw, build: nn.Sigmoid(),
        L.Tanh: lambda l, kw, build: nn.Tanh(),
        L.ScaledTanh: lambda l, kw, build: Fn(lambda x, A=l.A, B=l.B: A * torch.tanh(B * x)),
        L.LeakyReLU: lambda l, kw, build: nn.LeakyReLU(l.negative_slope),
        L.PReLU: lambda l, kw, build: nn.PReLU(l.num_parameters),
        L.RReLU: rrelu,
        L.Softmax: lambda l, kw, build: nn.Softmax(dim=l.axis),
        L.BatchNorm2d: bn(nn.BatchNorm2d),
        L.BatchNorm1d: bn(nn.BatchNorm1d),
        L.Dropout: dropout,
        L.Sequential: lambda l, kw, build: nn.Sequential(*[build(m) for m in l.layers]),
        L.Residual: lambda l, kw, build: Residual(build(l.block),
                                                  None if l.shortcut is None else build(l.shortcut)),
    }


_TWINS_CACHE: dict = {}


def twins() -> dict:
    """The builders (torch imported on first use)."""
    if not _TWINS_CACHE:
        _TWINS_CACHE.update(_twins())
    return _TWINS_CACHE


def torch_twin(layer, *, dtype=None, copy=True, **fixed):
    """The ``torch.nn.Module`` computing what ``layer`` computes, in its train/eval mode.

    ``dtype``: torch dtype (default: float32 when the layer holds float32 arrays, else float64).  ``copy``:
    copy the layer's parameters and buffers into it (names: :func:`torch_name`).  ``fixed``:
    a stochastic layer's fixed draw (``slopes=`` / ``mask=``), used for ``layer`` itself.
    """
    import torch

    builders = twins()

    def build(lay, kw=None):
        return builders[type(lay)](lay, kw or {}, build)

    if dtype is None:
        arrays = [o.params[k] for _, o, k in layer.named_parameters()] + \
                 [o.buffers[k] for _, o, k in layer.named_buffers()]
        dtype = torch.float32 if any(a.dtype == np.float32 for a in arrays) else torch.float64
    twin = build(layer, fixed).to(dtype).train(layer.training)
    if copy:
        with torch.no_grad():
            for name, owner, key in layer.named_parameters():
                twin.get_parameter(torch_name(name)).copy_(torch.from_numpy(np.array(owner.params[key])))
            for name, owner, key in layer.named_buffers():
                twin.get_buffer(name).copy_(torch.from_numpy(np.array(owner.buffers[key])))
    return twin


# --------------------------------------------------------------------------- #
# the rows
# --------------------------------------------------------------------------- #


def _with(layer, **arrays):
    """``layer`` with its params / buffers set to ``arrays`` (by key)."""
    for key, value in arrays.items():
        store = layer.params if key in layer.params else layer.buffers
        store[key][...] = value
    return layer


def _seeded(make, seed=1):
    def built():
        gpucnn.seed(seed)
        return make()
    return built


def _slopes(lower, upper):
    return lambda rng, shape: {"slopes": rng.uniform(lower, upper, shape)}


def _mask(p):
    return lambda rng, shape: {"mask": (rng.uniform(size=shape) > p).astype(F64)}


def _bn(cls, C, affine=True, training=True):
    def make():
        bn = cls(C, affine=affine, dtype=F64)
        rng = np.random.default_rng(C)
        if affine:
            _with(bn, gamma=rng.uniform(0.5, 2.0, C), beta=rng.standard_normal(C))
        if not training:
            _with(bn, running_mean=rng.standard_normal(C), running_var=rng.uniform(0.5, 2.0, C)).eval()
        return bn
    return make


def _rank(name, shape, want):
    rank = f"rank {want}" if isinstance(want, int) else want
    return bad_x(f"rank{len(shape)}", shape, ValueError,
                 f"{name}: x must have {rank}, got shape {tuple(shape)}" + (f" (rank {len(shape)})"
                                                                           if isinstance(want, int) else ""))


_CONV_ARGS = (
    bad_args("kernel0", lambda: L.Conv2D(1, 1, 0), ValueError, "kernel_size must be >= 1, got kernel_size=0"),
    bad_args("kernel-neg", lambda: L.Conv2D(1, 1, (3, -1)), ValueError,
             "kernel_size must be >= 1, got kernel_size=(3, -1)"),
    bad_args("stride0", lambda: L.Conv2D(1, 1, 3, stride=0), ValueError, "stride must be >= 1, got stride=0"),
    bad_args("stride-pair", lambda: L.Conv2D(1, 1, 3, stride=(1, 0)), ValueError,
             "stride must be >= 1, got stride=(1, 0)"),
    bad_args("pad-neg", lambda: L.Conv2D(1, 1, 3, padding=-1), ValueError, "padding must be >= 0, got padding=-1"),
    bad_args("pad-pair", lambda: L.Conv2D(1, 1, 3, padding=(0, -2)), ValueError,
             "padding must be >= 0, got padding=(0, -2)"),
    bad_args("in0", lambda: L.Conv2D(0, 1, 3), ValueError, "in_channels must be a positive int, got in_channels=0"),
    bad_args("out-neg", lambda: L.Conv2D(1, -4, 3), ValueError,
             "out_channels must be a positive int, got out_channels=-4"),
    bad_args("kernel-float", lambda: L.Conv2D(1, 1, 2.5), TypeError,
             "kernel_size must be an int or a pair of ints (h, w), got kernel_size=2.5"),
    bad_args("stride-bool", lambda: L.Conv2D(1, 1, 3, stride=True), TypeError,
             "stride must be an int or a pair of ints (h, w), got stride=True"),
)

_ACT_SHAPES = ((3, 4), (2, 3, 4, 5), (1, 1), (2, 4, 1, 3), (1, 10))
# batch normalisation: parity to 1e-9/1e-11 (a variance's square root in the chain, as in
# tests/test_beyond_lenet.py); couples the samples; its backward does not check dy's dtype (yet)
_BN = dict(parity_tol=(1e-9, 1e-11), batch_independent=False)

CASES = [
    # -- convolution ---------------------------------------------------------
    LayerCase("Conv2D-3x3-same", _seeded(lambda: _with(L.Conv2D(2, 3, 3, padding=1, dtype=F64),
                                                       b=np.linspace(-0.5, 0.5, 3))),
              shapes=((2, 2, 5, 6), (1, 2, 3, 3)),
              rejects=(_rank("Conv2D", (1, 5, 5), 4),
                       bad_x("channels", (1, 1, 5, 5), ValueError,
                             "x has 1 channels (shape (1, 1, 5, 5)) but the layer expects in_channels=2"),
                       Reject("H-too-small", lambda layer: L.Conv2D(1, 1, 5).forward(np.zeros((1, 1, 3, 8), F32)),
                              ValueError, "output H would be <= 0: input H=3 with padding=0 is smaller than kernel=5"),
                       *_CONV_ARGS)),
    LayerCase("Conv2D-nonsquare-strided-nobias",
              _seeded(lambda: L.Conv2D(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), bias=False, dtype=F64)),
              shapes=((2, 2, 7, 6),),
              rejects=(bad_x("W-too-small", (1, 2, 4, 1), ValueError,
                             "output W would be <= 0: input W=1 with padding=0 is smaller than kernel=2"),)),
    # -- pooling ---------------------------------------------------------------
    LayerCase("MaxPool2D-2x2", lambda: L.MaxPool2D(2), shapes=((2, 3, 6, 6), (1, 1, 7, 7)), draw=distinct,
              rejects=(_rank("MaxPool2D", (4, 4), 4),
                       bad_x("H-too-small", (1, 1, 1, 9), ValueError,
                             "output H would be <= 0: input H=1 with padding=0 is smaller than kernel=2"),
                       bad_args("kernel0", lambda: L.MaxPool2D(0), ValueError,
                                "kernel_size must be >= 1, got kernel_size=0"),
                       bad_args("stride0", lambda: L.MaxPool2D(2, stride=0), ValueError,
                                "stride must be >= 1, got stride=0"),
                       bad_args("kernel-triple", lambda: L.MaxPool2D((2, 2, 2)), TypeError,
                                "kernel_size must be an int or a pair of ints (h, w), got kernel_size=(2, 2, 2)"))),
    LayerCase("MaxPool2D-overlapping-nonsquare", lambda: L.MaxPool2D((3, 2), stride=(2, 1)),
              shapes=((2, 2, 7, 7),), draw=distinct),
    LayerCase("AvgPool2D-2x2", lambda: L.AvgPool2D(2), shapes=((2, 3, 6, 6), (1, 1, 7, 7)),
              rejects=(_rank("AvgPool2D", (1, 1, 1, 4, 4), 4),
                       bad_x("W-too-small", (1, 1, 4, 1), ValueError,
                             "output W would be <= 0: input W=1 with padding=0 is smaller than kernel=2"),
                       bad_args("kernel-neg", lambda: L.AvgPool2D(-2), ValueError,
                                "kernel_size must be >= 1, got kernel_size=-2"),
                       bad_args("stride0", lambda: L.AvgPool2D(2, stride=(0, 1)), ValueError,
                                "stride must be >= 1, got stride=(0, 1)"))),
    LayerCase("AvgPool2D-overlapping-nonsquare", lambda: L.AvgPool2D((2, 3), stride=(1, 2)),
              shapes=((2, 2, 5, 8),)),
    LayerCase("GlobalAvgPool2D", L.GlobalAvgPool2D, shapes=((3, 4, 5, 2), (2, 1, 1, 1))),
    # -- dense, flatten ----------------------------------------------------------
    LayerCase("Dense-7to3", _seeded(lambda: L.Dense(7, 3, dtype=F64)), shapes=((4, 7), (1, 7)),
              rejects=(_rank("Dense", (1, 1, 2, 2), 2),
                       bad_x("features", (2, 5), ValueError,
                             "x has 5 features (shape (2, 5)) but the layer expects in_features=7"),
                       bad_args("in0", lambda: L.Dense(0, 3), ValueError,
                                "in_features must be a positive int, got in_features=0"))),
    *[LayerCase(f"Dense-{fin}to{fout}{'' if bias else '-nobias'}",
                _seeded(lambda fin=fin, fout=fout, bias=bias: L.Dense(fin, fout, bias=bias, dtype=F64)),
                shapes=((N, fin),))
      for N, fin, fout, bias in ((4, 7, 3, False), (3, 5, 11, True), (3, 5, 11, False),
                                 (1, 1, 1, True), (1, 1, 1, False))],
    LayerCase("Flatten", L.Flatten, shapes=((2, 3, 4, 5), (3, 4), (1, 2, 3)),
              rejects=(bad_x("rank1", (3,), ValueError,
                             "Flatten: x must have rank >= 2 (batch first), got shape (3,)"),)),
    # -- activations -------------------------------------------------------------
    LayerCase("Sigmoid", L.Sigmoid, shapes=_ACT_SHAPES, scale=2.0),
    LayerCase("Tanh", L.Tanh, shapes=_ACT_SHAPES, scale=2.0),
    LayerCase("ScaledTanh", L.ScaledTanh, shapes=_ACT_SHAPES, scale=2.0),
    LayerCase("Softmax", lambda: L.Softmax(axis=1), shapes=_ACT_SHAPES, scale=2.0, batch_independent=False),
    LayerCase("Softmax-last-axis", lambda: L.Softmax(axis=-1), shapes=((2, 3, 5),), batch_independent=False),
    LayerCase("ReLU", L.ReLU, shapes=_ACT_SHAPES, draw=kinkless, scale=3.0),
    LayerCase("LeakyReLU-0.01", lambda: L.LeakyReLU(0.01), shapes=_ACT_SHAPES, draw=kinkless, scale=3.0,
              rejects=(bad_args("slope", lambda: L.LeakyReLU(1.5), ValueError,
                                "negative_slope must be in [0, 1), got negative_slope=1.5"),)),
    LayerCase("LeakyReLU-0.2", lambda: L.LeakyReLU(0.2), shapes=_ACT_SHAPES, draw=kinkless, scale=3.0),
    LayerCase("LeakyReLU-0.3", lambda: L.LeakyReLU(0.3), shapes=_ACT_SHAPES, draw=kinkless, scale=3.0),
    LayerCase("PReLU-shared", lambda: L.PReLU(1, init=0.25, dtype=F64), shapes=((3, 4), (2, 4, 3, 3), (1, 4, 1, 2)),
              draw=kinkless,
              rejects=(bad_args("num0", lambda: L.PReLU(0), ValueError,
                                "num_parameters must be a positive int, got num_parameters=0"),)),
    LayerCase("PReLU-per-channel", lambda: _with(L.PReLU(3, init=0.25, dtype=F64), a=[0.1, -0.2, 0.4]),
              shapes=((4, 3), (2, 3, 4, 4), (1, 3, 1, 2)), draw=kinkless,
              rejects=(bad_x("channels", (2, 4), ValueError,
                             "num_parameters=3 needs x with that many channels on axis 1, got shape (2, 4)"),)),
    LayerCase("RReLU-fixed-slopes", lambda: L.RReLU(0.1, 0.4), shapes=_ACT_SHAPES, draw=kinkless,
              fixed=_slopes(0.1, 0.4), batch_independent=False,
              rejects=(bad_x("slopes-shape", (2, 3), ValueError, "RReLU: slopes shape (3,) != x shape (2, 3)",
                             slopes=np.full(3, 0.2)),
                       bad_args("bounds", lambda: L.RReLU(0.5, 0.2), ValueError,
                                "need 0 <= lower <= upper < 1, got lower=0.5, upper=0.2"))),
    LayerCase("RReLU-eval", lambda: L.RReLU(0.1, 0.3).eval(), shapes=_ACT_SHAPES, draw=kinkless, scale=3.0,
              batch_independent=False),
    # -- normalisation, dropout ---------------------------------------------------
    LayerCase("BatchNorm2d-affine-train", _bn(L.BatchNorm2d, 3), shapes=((2, 3, 4, 5), (6, 3, 3, 3), (2, 3, 1, 1)),
              **_BN, rejects=(
                  bad_x("channels", (2, 2, 4, 4), ValueError,
                        "BatchNorm2d: x has 2 channels (shape (2, 2, 4, 4)) but the layer expects num_features=3"),
                  bad_x("rank2", (2, 3), ValueError, "BatchNorm2d: x must have rank 4, got shape (2, 3)"),
                  bad_args("momentum", lambda: L.BatchNorm2d(3, momentum=1.5), ValueError,
                           "momentum must be in [0, 1], got momentum=1.5"))),
    LayerCase("BatchNorm2d-plain-train", _bn(L.BatchNorm2d, 2, affine=False), shapes=((3, 2, 3, 3),), **_BN),
    LayerCase("BatchNorm2d-affine-eval", _bn(L.BatchNorm2d, 3, training=False), shapes=((2, 3, 4, 5),), **_BN),
    LayerCase("BatchNorm1d-train", _bn(L.BatchNorm1d, 4), shapes=((2, 4), (5, 4), (3, 4, 6)), **_BN,
              rejects=(bad_x("one-value", (1, 4), ValueError, "more than 1 value per channel"),
                       _rank("BatchNorm1d", (2, 4, 1, 1), "rank 2 or 3"))),
    LayerCase("BatchNorm1d-eval", _bn(L.BatchNorm1d, 4, training=False), shapes=((2, 4), (3, 4, 6)), **_BN),
    LayerCase("Dropout-fixed-mask", lambda: L.Dropout(0.4), shapes=((3, 2, 4, 4), (5, 6)), fixed=_mask(0.4),
              batch_independent=False,
              rejects=(bad_x("mask-shape", (2, 3), ValueError, "Dropout: mask shape (3,) != x shape (2, 3)",
                             mask=np.ones(3)),
                       bad_args("p1", lambda: L.Dropout(1.0), ValueError, "p must be in [0, 1), got p=1.0"))),
    LayerCase("Dropout-eval", lambda: L.Dropout(0.4).eval(), shapes=((3, 5),), batch_independent=False),
    # -- containers ---------------------------------------------------------------
    LayerCase("Sequential-fused-conv-relu-maxpool",
              _seeded(lambda: L.Sequential(L.Conv2D(2, 3, 3, padding=1, dtype=F64), L.ReLU(), L.MaxPool2D(2))),
              shapes=((2, 2, 6, 6),), grad=dict(max_elements=300, n_directions=12),
              rejects=(bad_args("item", lambda: L.Sequential(L.ReLU(), 3), TypeError,
                                "Sequential: item 1 is int, not a gpucnn Layer"),)),
    LayerCase("Sequential-unfused-dense-sigmoid",
              _seeded(lambda: L.Sequential(L.Flatten(), L.Dense(12, 4, dtype=F64), L.Sigmoid(), fuse=False)),
              shapes=((3, 3, 2, 2),)),
    LayerCase("Residual-identity-tanh",
              _seeded(lambda: L.Residual(L.Sequential(L.Conv2D(2, 2, 3, padding=1, dtype=F64), L.Tanh()))),
              shapes=((2, 2, 5, 5),),
              rejects=(bad_args("block", lambda: L.Residual(3), TypeError, "Residual: block is int"),)),
    LayerCase("Residual-projection-bn", _seeded(lambda: basic_block(3, 4, 2, dtype=F64), seed=4),
              shapes=((2, 3, 6, 6),), grad=dict(max_elements=300, n_directions=12),
              parity_tol=(1e-9, 1e-11), batch_independent=False,
              rejects=(Reject("shortcut-shape", lambda layer: L.Residual(L.Conv2D(2, 3, 3, padding=1, dtype=F64))
                              .forward(np.zeros((1, 2, 5, 5))), ValueError, "the block gives shape "),)),
]

BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "two rows share an id"
