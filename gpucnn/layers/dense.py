"""Fully connected layer and the flatten that feeds it.

Dense (PyTorch layout, ``W`` is (out, in)): ``y = x W^T + b`` in public
``(N, F)`` terms, ``W x + b`` on the batch-last ``(F, N)`` arrays a network
passes between its layers; the gradients are derived in
:mod:`gpucnn.functional.dense`.
"""
from __future__ import annotations

import numpy as np

from .. import init as _init
from .._utils import check_array, check_param_match, positive_int, shown_shape
from ..functional import dense as F
from .base import Epilogue, Layer


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1*d2*...), row-major (C, H, W order for NCHW).

    Keeps only the input shape; ``backward`` reshapes dy back.  On batch-last
    arrays it is a free reshape, ``(C, H, W, N) -> (C*H*W, N)``.
    """


    def __init__(self):
        super().__init__()
        self._x_shape = None   # batch-last

    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        check_array(x, "x", None, "Flatten", internal=True)
        if x.ndim < 2:
            raise ValueError(f"Flatten: x must have rank >= 2 (batch first), got shape {shown_shape(x, True)}")
        self._x_shape = tuple(x.shape)
        # not -1: a batch of 0 has no size to infer from
        return self._expect(x.reshape(int(np.prod(x.shape[:-1])), x.shape[-1]))

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
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
    Forward keeps x (needed for dL/dW).  Inside a
    :class:`~gpucnn.layers.Sequential` a following ReLU / Sigmoid / Tanh runs
    in this layer's call (its ``_forward`` with an :class:`~gpucnn.layers.base.Epilogue`).
    """


    def __init__(self, in_features, out_features, bias=True, weight_init="he_uniform",
                 dtype=np.float32):
        super().__init__()
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        shape = (self.out_features, self.in_features)
        self._add_param("W", _init.initialize(weight_init, shape, self.in_features,
                                              self.out_features, dtype))
        if bias:
            self._add_param("b", np.zeros(self.out_features, dtype=dtype))
        self._saved = None  # forward keeps functional.dense.DenseSaved (x)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={'b' in self.params}"

    def _forward(self, x, epilogue: Epilogue | None = None):
        if epilogue is not None and epilogue.pool is not None:
            raise ValueError(f"Dense fuses an activation, not a pooling, got {epilogue!r}")
        check_array(x, "x", 2, "Dense", internal=True)
        W = self.params["W"]
        check_param_match(x, W, "x", "Dense")
        if x.shape[0] != self.in_features:
            raise ValueError(
                f"Dense: x has {x.shape[0]} features (shape {shown_shape(x, True)}) but the layer "
                f"expects in_features={self.in_features}"
            )
        act = None if epilogue is None else epilogue.act
        y, self._saved = F.dense_forward(x, W, self.params.get("b"), act=act, ws=self.workspace)
        return self._expect(y)

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        dx, _, _ = F.dense_backward(dy, self._saved, input_grad=input_grad,
                                     dW_out=self.grads["W"], db_out=self.grads.get("b"), ws=self.workspace)
        return dx
