"""ONNX export of a gpucnn :class:`~gpucnn.layers.Sequential` (no PyTorch involved).

The graph is built with ``onnx.helper`` (``make_node``, ``make_graph``,
``make_model``) and ``onnx.numpy_helper.from_array``.  It is float32
throughout, has one input ``"input"`` of shape ``(N, *input_shape)`` — the
normalised NCHW images that ``model.forward`` takes — and one output
``"output"`` of shape ``(N, ...)`` — what ``model.forward`` returns (logits, or
the Sigmoid/Softmax outputs when the network ends in one).  ``N`` is symbolic.

==============  =================================================================
gpucnn layer    ONNX
==============  =================================================================
Conv2D          Conv (pads [ph, pw, ph, pw], strides, kernel_shape, group 1)
MaxPool2D       MaxPool (no padding, floor: ceil_mode 0)
AvgPool2D       AveragePool (no padding, floor)
Flatten         Flatten (axis 1)
Dense           Gemm (transB 1: W is (out, in))
ReLU, Sigmoid,  Relu, Sigmoid, Tanh
Tanh
ScaledTanh      Mul(B) -> Tanh -> Mul(A)
LeakyReLU       LeakyRelu (alpha = negative_slope)
PReLU           PRelu; slope (C, 1, 1) on 4-D input, (C,) on 2-D, (1,) if shared
RReLU           LeakyRelu with its evaluation slope (lower + upper) / 2
Softmax         Softmax (axis)
==============  =================================================================

The export is of the network in evaluation mode (RReLU's fixed slope), whatever
its ``training`` flag.  Weights are stored as float32 initializers named like
PyTorch's state dict (``"0.weight"``, ``"0.bias"``).  A layer class with no
converter raises :class:`~gpucnn.export.ExportError` naming the class and its
index; add one with :func:`register`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import backend
from .. import layers as L
from .._io import atomic_open
from .._utils import output_size
from . import ExportError

__all__ = ["DEFAULT_OPSET", "IR_VERSION_FOR_OPSET", "INSTALL_HINT", "register", "build_onnx", "to_onnx"]

DEFAULT_OPSET = 17
#: The IR version released with each opset (``onnx.helper.VERSION_TABLE``); opset 17
#: pairs with IR 8, so runtimes from ONNX 1.12 on load the default export.
IR_VERSION_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}
INSTALL_HINT = "pip install 'gpucnn[onnx]'"
INPUT_NAME, OUTPUT_NAME = "input", "output"

_CONVERTERS: dict = {}


def register(layer_class):
    """Decorator: register ``fn(graph, step) -> output shape`` as the converter of ``layer_class``.

    Args:
        layer_class: the exact gpucnn layer class (subclasses need their own entry).

    Returns:
        The decorator; it returns the function unchanged, so it can be stacked.

    The converter reads ``step.layer``, adds nodes through ``graph.node`` and
    weights through ``graph.weight``, writes its result to ``step.out`` and
    returns the per-sample output shape (no batch axis) given ``step.shape``.
    """
    def decorate(fn):
        _CONVERTERS[layer_class] = fn
        return fn
    return decorate


def _require_onnx():
    """The ``onnx`` module, or ImportError with the install hint."""
    try:
        import onnx
        import onnx.checker  # noqa: F401
        import onnx.helper  # noqa: F401
        import onnx.numpy_helper  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the 'onnx' package ({exc}); install it with: {INSTALL_HINT}") from None
    return onnx


@dataclass
class _Step:
    """One layer to convert: ``prefix`` names its tensors ("3" -> "3.weight")."""

    layer: object
    prefix: str
    x: str
    out: str
    shape: tuple


class _Graph:
    """Nodes and float32 initializers of the graph under construction."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes = []
        self.initializers = []

    def weight(self, name: str, value) -> str:
        """Add ``value`` as a float32 initializer called ``name`` (float64 is cast explicitly)."""
        arr = np.ascontiguousarray(backend.asnumpy(value))
        if arr.dtype not in (np.float32, np.float64):
            raise ExportError(f"initializer {name!r}: expected float32 or float64 values, got dtype {arr.dtype}")
        self.initializers.append(self.onnx.numpy_helper.from_array(arr.astype(np.float32), name=name))
        return name

    def node(self, op: str, inputs, output: str, name: str, **attrs) -> str:
        """Append one node; returns its output name."""
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [output], name=name, **attrs))
        return output


def _fail(step: _Step, problem: str) -> ExportError:
    return ExportError(f"layer {step.prefix} ({type(step.layer).__name__}): {problem}")


def _expect_rank(step: _Step, rank: int) -> None:
    if len(step.shape) != rank:
        raise _fail(step, f"expects {rank + 1}-D input (batch first), but its input is (N, "
                          f"{', '.join(map(str, step.shape))})")


# -- converters, one per layer class ------------------------------------------------


@register(L.Conv2D)
def _conv(g: _Graph, s: _Step) -> tuple:
    layer = s.layer
    _expect_rank(s, 3)
    if s.shape[0] != layer.in_channels:
        raise _fail(s, f"in_channels={layer.in_channels} but its input has {s.shape[0]} channels")
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    ho, wo = output_size(s.shape[1], kh, sh, ph), output_size(s.shape[2], kw, sw, pw)
    if ho < 1 or wo < 1:
        raise _fail(s, f"kernel {layer.kernel_size} with padding {layer.padding} does not fit input {s.shape[1:]}")
    inputs = [s.x, g.weight(f"{s.prefix}.weight", layer.params["W"])]
    if "b" in layer.params:
        inputs.append(g.weight(f"{s.prefix}.bias", layer.params["b"]))
    g.node("Conv", inputs, s.out, f"{s.prefix}_Conv", kernel_shape=[kh, kw], strides=[sh, sw],
           pads=[ph, pw, ph, pw], dilations=[1, 1], group=1)
    return (layer.out_channels, ho, wo)


def _pool(op: str, g: _Graph, s: _Step) -> tuple:
    _expect_rank(s, 3)
    (kh, kw), (sh, sw) = s.layer.kernel_size, s.layer.stride
    ho, wo = output_size(s.shape[1], kh, sh), output_size(s.shape[2], kw, sw)
    if ho < 1 or wo < 1:
        raise _fail(s, f"kernel {s.layer.kernel_size} does not fit input {s.shape[1:]}")
    g.node(op, [s.x], s.out, f"{s.prefix}_{op}", kernel_shape=[kh, kw], strides=[sh, sw],
           pads=[0, 0, 0, 0], ceil_mode=0)
    return (s.shape[0], ho, wo)


@register(L.MaxPool2D)
def _maxpool(g: _Graph, s: _Step) -> tuple:
    return _pool("MaxPool", g, s)


@register(L.AvgPool2D)
def _avgpool(g: _Graph, s: _Step) -> tuple:
    return _pool("AveragePool", g, s)


@register(L.Flatten)
def _flatten(g: _Graph, s: _Step) -> tuple:
    g.node("Flatten", [s.x], s.out, f"{s.prefix}_Flatten", axis=1)
    return (math.prod(s.shape),)


@register(L.Dense)
def _dense(g: _Graph, s: _Step) -> tuple:
    layer = s.layer
    if s.shape != (layer.in_features,):
        raise _fail(s, f"expects input (N, {layer.in_features}), but its input is (N, "
                       f"{', '.join(map(str, s.shape))}); put a Flatten before it")
    inputs = [s.x, g.weight(f"{s.prefix}.weight", layer.params["W"])]
    if "b" in layer.params:
        inputs.append(g.weight(f"{s.prefix}.bias", layer.params["b"]))
    g.node("Gemm", inputs, s.out, f"{s.prefix}_Gemm", alpha=1.0, beta=1.0, transA=0, transB=1)
    return (layer.out_features,)


def _simple(op: str):
    def convert(g: _Graph, s: _Step) -> tuple:
        g.node(op, [s.x], s.out, f"{s.prefix}_{op}")
        return s.shape
    convert.__name__ = f"_{op.lower()}"
    return convert


register(L.ReLU)(_simple("Relu"))
register(L.Sigmoid)(_simple("Sigmoid"))
register(L.Tanh)(_simple("Tanh"))


@register(L.ScaledTanh)
def _scaled_tanh(g: _Graph, s: _Step) -> tuple:
    p = s.prefix
    bx = g.node("Mul", [s.x, g.weight(f"{p}.B", np.array(s.layer.B, np.float32))], f"{p}_Bx", f"{p}_MulB")
    t = g.node("Tanh", [bx], f"{p}_tanh", f"{p}_Tanh")
    g.node("Mul", [t, g.weight(f"{p}.A", np.array(s.layer.A, np.float32))], s.out, f"{p}_MulA")
    return s.shape


def _leaky(g: _Graph, s: _Step, alpha: float) -> tuple:
    g.node("LeakyRelu", [s.x], s.out, f"{s.prefix}_LeakyRelu", alpha=float(alpha))
    return s.shape


@register(L.LeakyReLU)
def _leaky_relu(g: _Graph, s: _Step) -> tuple:
    return _leaky(g, s, s.layer.negative_slope)


@register(L.RReLU)
def _rrelu(g: _Graph, s: _Step) -> tuple:
    return _leaky(g, s, (s.layer.lower + s.layer.upper) / 2)


@register(L.PReLU)
def _prelu(g: _Graph, s: _Step) -> tuple:
    a = np.asarray(backend.asnumpy(s.layer.params["a"]))
    n = s.layer.num_parameters
    if n == 1:
        slope = a.reshape(1)
    else:
        if not s.shape or s.shape[0] != n:
            raise _fail(s, f"num_parameters={n} needs {n} channels on axis 1, but its input is (N, "
                           f"{', '.join(map(str, s.shape))})")
        slope = a.reshape((n,) + (1,) * (len(s.shape) - 1))  # (C, 1, 1) for NCHW, (C,) for (N, C)
    g.node("PRelu", [s.x, g.weight(f"{s.prefix}.weight", slope)], s.out, f"{s.prefix}_PRelu")
    return s.shape


@register(L.Softmax)
def _softmax(g: _Graph, s: _Step) -> tuple:
    rank = len(s.shape) + 1
    if not -rank <= s.layer.axis < rank:
        raise _fail(s, f"axis={s.layer.axis} is out of range for {rank}-D input")
    g.node("Softmax", [s.x], s.out, f"{s.prefix}_Softmax", axis=int(s.layer.axis))
    return s.shape


@register(L.BatchNorm2d)
@register(L.BatchNorm1d)
def _batch_norm(g: _Graph, s: _Step) -> tuple:
    """Evaluation mode: normalised with the running statistics (as model.forward in eval mode)."""
    layer = s.layer
    if not s.shape or s.shape[0] != layer.num_features:
        raise _fail(s, f"num_features={layer.num_features} but its input is (N, {', '.join(map(str, s.shape))})")
    C = layer.num_features
    gamma = layer.params["gamma"] if layer.affine else np.ones(C, np.float32)
    beta = layer.params["beta"] if layer.affine else np.zeros(C, np.float32)
    inputs = [s.x, g.weight(f"{s.prefix}.weight", gamma), g.weight(f"{s.prefix}.bias", beta),
              g.weight(f"{s.prefix}.running_mean", layer.buffers["running_mean"]),
              g.weight(f"{s.prefix}.running_var", layer.buffers["running_var"])]
    g.node("BatchNormalization", inputs, s.out, f"{s.prefix}_BatchNormalization", epsilon=float(layer.eps),
           momentum=float(1 - layer.momentum))
    return s.shape


@register(L.Dropout)
def _dropout(g: _Graph, s: _Step) -> tuple:
    g.node("Identity", [s.x], s.out, f"{s.prefix}_Identity")   # evaluation mode: the identity
    return s.shape


@register(L.GlobalAvgPool2D)
def _global_avg_pool(g: _Graph, s: _Step) -> tuple:
    _expect_rank(s, 3)
    pooled = g.node("GlobalAveragePool", [s.x], f"{s.prefix}_pooled", f"{s.prefix}_GlobalAveragePool")
    g.node("Flatten", [pooled], s.out, f"{s.prefix}_Flatten", axis=1)
    return (s.shape[0],)


@register(L.Sequential)
def _sequential(g: _Graph, s: _Step) -> tuple:
    return _convert_sequence(g, s.layer.layers, s.prefix, s.x, s.out, s.shape)


@register(L.Residual)
def _residual(g: _Graph, s: _Step) -> tuple:
    block = _convert_sequence(g, [s.layer.block], f"{s.prefix}.block", s.x, f"{s.prefix}_block", s.shape,
                              flatten_prefix=True)
    short, short_shape = s.x, s.shape
    if s.layer.shortcut is not None:
        short = f"{s.prefix}_shortcut"
        short_shape = _convert_sequence(g, [s.layer.shortcut], f"{s.prefix}.shortcut", s.x, short, s.shape,
                                        flatten_prefix=True)
    if tuple(block) != tuple(short_shape):
        raise _fail(s, f"the block gives (N, {', '.join(map(str, block))}) but the shortcut "
                       f"(N, {', '.join(map(str, short_shape))})")
    g.node("Add", [f"{s.prefix}_block", short], s.out, f"{s.prefix}_Add")
    return tuple(block)


# -- the model ----------------------------------------------------------------------------


def _check_args(model, opset, input_shape) -> tuple:
    if not isinstance(model, L.Sequential):
        raise TypeError(f"model must be a gpucnn.layers.Sequential, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in IR_VERSION_FOR_OPSET:
        raise ValueError(f"opset must be an int in {min(IR_VERSION_FOR_OPSET)}..{max(IR_VERSION_FOR_OPSET)}, "
                         f"got opset={opset!r}")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"input_shape must be positive ints without the batch axis, e.g. (1, 28, 28); "
                         f"got input_shape={input_shape!r}")
    return tuple(int(d) for d in shape)


def _convert_sequence(g: _Graph, layers, prefix: str, x: str, out_name: str, shape: tuple,
                      flatten_prefix: bool = False) -> tuple:
    """Add the nodes of ``layers`` (named ``<prefix>.<i>``, or ``<prefix>`` itself for a single
    wrapped layer when ``flatten_prefix``) from input ``x`` to output ``out_name``; returns the shape."""
    n = len(layers)
    if n == 0:
        g.node("Identity", [x], out_name, f"{prefix or 'model'}_Identity")
    for i, layer in enumerate(layers):
        name = prefix if flatten_prefix else (f"{prefix}.{i}" if prefix else str(i))
        fn = _CONVERTERS.get(type(layer))
        if fn is None:
            raise ExportError(
                f"layer {name} ({type(layer).__name__}) has no ONNX mapping; supported layers: "
                f"{', '.join(sorted(c.__name__ for c in _CONVERTERS))}")
        out = out_name if i == n - 1 else f"{name}_out"
        shape = tuple(fn(g, _Step(layer, name, x, out, shape)))
        x = out
    return shape


def _convert_layers(g: _Graph, model, shape: tuple) -> tuple:
    """Add every layer's nodes; returns the per-sample output shape."""
    return _convert_sequence(g, model.layers, "", INPUT_NAME, OUTPUT_NAME, shape)


def build_onnx(model, *, opset: int = DEFAULT_OPSET, input_shape=None, model_name: str | None = None):
    """Build (and check) the ONNX model of a gpucnn network, without writing it.

    Args:
        model: a :class:`~gpucnn.layers.Sequential` on any device.  float64
            parameters are cast to float32 explicitly (the graph is float32
            throughout); float32 ones are copied unchanged.
        opset: ONNX opset, 13..21 (default 17); the IR version is the one
            released with it (:data:`IR_VERSION_FOR_OPSET`: 8 for opset 17).
        input_shape: one sample's shape ``(C, H, W)``, without the batch axis, static in the
            graph (the batch axis is symbolic); default: the model's ``in_shape`` (set by
            :func:`gpucnn.models.build` and restored from checkpoints), else (1, 28, 28).
        model_name: the graph's name and the ``gpucnn_model`` metadata entry
            (default ``model.name``, or ``"gpucnn"``).

    Returns:
        The ``onnx.ModelProto``, already passed through
        ``onnx.checker.check_model(..., full_check=True)``.

    Raises:
        ImportError: ``onnx`` is missing (with the install hint).
        ExportError: a layer has no mapping (named with its index) or does not fit its input.
        TypeError, ValueError: bad arguments.
    """
    onnx = _require_onnx()
    if input_shape is None:
        input_shape = getattr(model, "in_shape", None) or (1, 28, 28)
    shape = _check_args(model, opset, input_shape)
    name = model_name if model_name is not None else (getattr(model, "name", None) or "gpucnn")
    g = _Graph(onnx)
    out_shape = _convert_layers(g, model, shape)
    h, tp = onnx.helper, onnx.TensorProto
    graph = h.make_graph(
        g.nodes, str(name),
        [h.make_tensor_value_info(INPUT_NAME, tp.FLOAT, ["N", *shape])],
        [h.make_tensor_value_info(OUTPUT_NAME, tp.FLOAT, ["N", *out_shape])],
        initializer=g.initializers,
        doc_string=f"input: normalised NCHW float32 (N, {', '.join(map(str, shape))}); "
                   f"output: what gpucnn's model.forward returns (evaluation mode)")
    from .. import __version__

    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=IR_VERSION_FOR_OPSET[opset],
                         producer_name="gpucnn", producer_version=__version__)
    h.set_model_props(proto, {"gpucnn_model": str(name)})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def to_onnx(model, path, *, opset: int = DEFAULT_OPSET, input_shape=None, model_name: str | None = None):
    """Export ``model`` to the ONNX file ``path`` (written atomically).

    Args:
        model: a :class:`~gpucnn.layers.Sequential`; float64 parameters are
            cast to float32 explicitly (see :func:`build_onnx`).
        path: destination file (replaced atomically; nothing is written on error).
        opset, input_shape, model_name: as in :func:`build_onnx`.

    Returns:
        The ``onnx.ModelProto`` that was written.

    Raises:
        ImportError, ExportError, TypeError, ValueError: as :func:`build_onnx`;
        OSError: the file cannot be written.
    """
    proto = build_onnx(model, opset=opset, input_shape=input_shape, model_name=model_name)
    data = proto.SerializeToString()
    with atomic_open(Path(path), "wb") as f:
        f.write(data)
    return proto
