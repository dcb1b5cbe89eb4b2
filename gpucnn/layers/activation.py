"""Activation layers: Sigmoid, Tanh, ScaledTanh, ReLU, LeakyReLU, PReLU, RReLU, Softmax.

Each is a thin layer around one function pair of
:mod:`gpucnn.functional.activation` (which has the table of f and f'); the
layer keeps what the pair returns as ``saved`` and checks ``dy`` against the
forward's shape, dtype and device.  Like every built-in layer they compute on
the batch-last layout; PReLU and Softmax map their channel axis (public axis
1 is batch-last axis 0).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from .._utils import check_array, check_param_match, positive_int, shown_shape
from ..functional import activation as F
from ..functional.activation import sigmoid
from ..random import uniform
from .base import Layer, builtin_pass


def _remember(layer, x) -> None:
    """Check a batch-last input (its output has its shape, dtype and device: what backward accepts)."""
    check_array(x, "x", None, type(layer).__name__, internal=True)
    layer._expect(x)


class Sigmoid(Layer):
    """Logistic sigmoid; keeps its output y, dL/dx = dy * y * (1 - y)."""


    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        _remember(self, x)
        y, self._saved = F.sigmoid_forward(x)
        return y

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        return F.sigmoid_backward(dy, self._saved)


class Tanh(Layer):
    """Hyperbolic tangent; keeps y, dL/dx = dy * (1 - y^2)."""


    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        _remember(self, x)
        y, self._saved = F.tanh_forward(x)
        return y

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        return F.tanh_backward(dy, self._saved)


class ScaledTanh(Layer):
    """LeCun's scaled tanh ``A * tanh(B * x)``, A=1.7159, B=0.6666 (seed 002).

    Keeps t = tanh(B x); dL/dx = dy * A * B * (1 - t^2).
    """


    def __init__(self, A=1.7159, B=0.6666):
        super().__init__()
        self.A, self.B = float(A), float(B)

    def extra_repr(self):
        return f"A={self.A}, B={self.B}"

    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        _remember(self, x)
        y, self._saved = F.scaled_tanh_forward(x, self.A, self.B)
        return y

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        return F.scaled_tanh_backward(dy, self._saved, self.A, self.B)


class ReLU(Layer):
    """max(0, x); subgradient 1/2 at exactly 0, as seed 001 (eq. 10) takes it.

    Keeps x; its derivative ``heaviside(x, 1/2)`` (0, 1/2 or 1) is taken in backward.
    """


    def _forward(self, x, epilogue=None):
        """The output in a reused buffer (no allocation inside a network)."""
        self._no_epilogue(epilogue)
        _remember(self, x)
        xp = backend.get_array_module(x)
        y, self._saved = F.relu_forward(x, self.workspace.get("y", x.shape, x.dtype, xp))
        return y

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        xp = backend.get_array_module(dy)
        return F.relu_backward(dy, self._saved, self.workspace.get("dx", dy.shape, dy.dtype, xp))


class LeakyReLU(Layer):
    """x for x >= 0, ``negative_slope * x`` below (seed 002's z/a with a = 1/negative_slope).

    Keeps the per-element slope (1 or negative_slope).
    """


    def __init__(self, negative_slope=0.01):
        super().__init__()
        if not 0 <= negative_slope < 1:
            raise ValueError(f"negative_slope must be in [0, 1), got negative_slope={negative_slope!r}")
        self.negative_slope = float(negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"

    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        _remember(self, x)
        y, self._saved = F.slope_forward(x, self.negative_slope)
        return y

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        return F.slope_backward(dy, self._saved)


class PReLU(Layer):
    """Parametric ReLU: x for x > 0, ``a * x`` otherwise, with ``a`` learned.

    Args:
        num_parameters: 1 (one shared a) or the channel count C (one a per
            channel, axis 1).
        init: initial value of a (default 0.25).
        dtype: parameter dtype.

    ``params["a"]`` has shape (num_parameters,); ``backward`` overwrites
    ``grads["a"] = sum over all but the channel axis of dy * x * [x <= 0]``.
    Keeps x.
    """


    def __init__(self, num_parameters=1, init=0.25, dtype=np.float32):
        super().__init__()
        self.num_parameters = positive_int(num_parameters, "num_parameters")
        self._add_param("a", np.full(self.num_parameters, init, dtype=dtype))

    def extra_repr(self):
        return f"num_parameters={self.num_parameters}"

    def _a(self, x):
        """``a`` broadcast against the batch-last ``x`` (channel axis 0)."""
        a = self.params["a"]
        if self.num_parameters == 1:
            return a.reshape((1,) * x.ndim)
        return a.reshape((-1,) + (1,) * (x.ndim - 1))

    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        _remember(self, x)
        check_param_match(x, self.params["a"], "x", "PReLU")
        if self.num_parameters > 1 and (x.ndim < 2 or x.shape[0] != self.num_parameters):
            raise ValueError(
                f"PReLU: num_parameters={self.num_parameters} needs x with that many channels "
                f"on axis 1, got shape {shown_shape(x, True)}"
            )
        y, self._saved = F.prelu_forward(x, self._a(x))
        return y

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        x = self._saved
        axes = None if self.num_parameters == 1 else tuple(range(1, x.ndim))
        dx, da = F.prelu_backward(dy, x, self._a(x), axes)
        self._set_grad("a", da.reshape(self.num_parameters))
        return dx


class RReLU(Layer):
    """Randomized leaky ReLU (seed 002): x >= 0 -> x, else r * x.

    While training, ``r ~ U(lower, upper)`` is drawn per element from gpucnn's
    counter stream (:func:`gpucnn.random.uniform`: the same draws on NumPy and
    CuPy, fixed by ``gpucnn.seed``, saved in checkpoints); at evaluation
    ``r = (lower + upper) / 2``.  Keeps the slopes used.

    Args:
        lower, upper: 0 <= lower <= upper < 1 (defaults 1/8 and 1/3, as PyTorch).
    """

    def __init__(self, lower=1.0 / 8, upper=1.0 / 3):
        super().__init__()
        if not 0 <= lower <= upper < 1:
            raise ValueError(f"need 0 <= lower <= upper < 1, got lower={lower!r}, upper={upper!r}")
        self.lower, self.upper = float(lower), float(upper)

    def extra_repr(self):
        return f"lower={self.lower}, upper={self.upper}"

    @builtin_pass
    def forward(self, x, slopes=None):
        """Apply RReLU to a public ``x``; ``slopes`` (the shape of x) replaces the random draw (for tests)."""
        return self._forward_fixing(x, slopes, "slopes")

    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        _remember(self, x)
        if self._fixed is not None:
            r = self._fixed.astype(x.dtype, copy=False)
        elif self.training:
            r = uniform(x.shape, backend.get_array_module(x), x.dtype, self.lower, self.upper)
        else:
            r = (self.lower + self.upper) / 2
        y, self._saved = F.slope_forward(x, r)
        return y

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        return F.slope_backward(dy, self._saved)


class Softmax(Layer):
    """Softmax over ``axis`` (default 1, the class axis); keeps y.

    dL/dx = y * (dy - sum(dy * y, axis)).  For training use
    :class:`gpucnn.losses.SoftmaxCrossEntropy`, which fuses the gradient p - y.
    """

    def __init__(self, axis=1):
        super().__init__()
        self.axis = int(axis)

    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        _remember(self, x)
        y, self._saved = F.softmax_forward(x, self._axis(x.ndim))
        return y

    def _axis(self, ndim):
        """The class axis on the batch-last array: public axis a is batch-last axis a - 1 (0 -> last)."""
        a = self.axis % ndim
        return ndim - 1 if a == 0 else a - 1

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        return F.softmax_backward(dy, self._saved, self._axis(dy.ndim))


__all__ = ["Sigmoid", "Tanh", "ScaledTanh", "ReLU", "LeakyReLU", "PReLU", "RReLU", "Softmax", "sigmoid"]
