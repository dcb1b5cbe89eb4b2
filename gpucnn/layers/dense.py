"""Fully connected layer and the flatten that feeds it.

Dense (PyTorch layout, ``W`` is (out, in)): ``y = x W^T + b``; the gradients
are derived in :mod:`gpucnn.functional.linear`.
"""
from __future__ import annotations

import numpy as np

from .. import init as _init
from .._utils import check_array, check_param_match, positive_int
from ..functional import linear as F
from .base import Layer


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1*d2*...), row-major (C, H, W order for NCHW).

    Keeps only the input shape; ``backward`` reshapes dy back.
    """

    def __init__(self):
        super().__init__()
        self._x_shape = None

    def forward(self, x):
        check_array(x, "x", None, "Flatten")
        if x.ndim < 2:
            raise ValueError(f"Flatten: x must have rank >= 2 (batch first), got shape {tuple(x.shape)}")
        self._x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        self._check_forward_called(self._x_shape)
        expected = (self._x_shape[0], int(np.prod(self._x_shape[1:])))
        if tuple(dy.shape) != expected:
            raise ValueError(f"Flatten.backward: dy has shape {tuple(dy.shape)}, expected {expected}")
        return dy.reshape(self._x_shape)


class Dense(Layer):
    """Affine layer ``y = x @ W.T + b`` with ``W`` of shape (out_features, in_features).

    Args:
        in_features, out_features: sizes (>= 1).
        bias: learn a bias (default True).
        weight_init: initialiser name or callable (default ``"he_uniform"``).
        dtype: float32 (default) or float64.

    Shape:
        x: (N, in_features) -> y: (N, out_features).

    ``backward`` returns dL/dx and *overwrites* ``grads["W"]``, ``grads["b"]``.
    Forward keeps x (needed for dL/dW).
    """

    def __init__(self, in_features, out_features, bias=True, weight_init="he_uniform",
                 dtype=np.float32):
        super().__init__()
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        self.needs_input_grad = True
        shape = (self.out_features, self.in_features)
        self._add_param("W", _init.initialize(weight_init, shape, self.in_features,
                                              self.out_features, dtype))
        if bias:
            self._add_param("b", np.zeros(self.out_features, dtype=dtype))
        self._saved = None  # forward keeps functional.linear.LinearSaved (x)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={'b' in self.params}"

    def forward(self, x):
        check_array(x, "x", 2, "Dense")
        W = self.params["W"]
        check_param_match(x, W, "x", "Dense")
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"Dense: x has {x.shape[1]} features (shape {tuple(x.shape)}) but the layer "
                f"expects in_features={self.in_features}"
            )
        y, self._saved = F.linear_forward(x, W, self.params.get("b"))
        return y

    def backward(self, dy):
        self._check_forward_called(self._saved)
        check_array(dy, "dy", 2, "Dense.backward")
        check_param_match(dy, self.params["W"], "dy", "Dense")
        expected = (self._saved.x.shape[0], self.out_features)
        if tuple(dy.shape) != expected:
            raise ValueError(f"Dense.backward: dy has shape {tuple(dy.shape)}, expected {expected}")
        dx, _, _ = F.linear_backward(dy, self._saved, need_input_grad=self.needs_input_grad,
                                     dW_out=self.grads["W"], db_out=self.grads.get("b"))
        return dx
