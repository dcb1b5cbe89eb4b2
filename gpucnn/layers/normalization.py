"""Batch normalisation and dropout layers; global average pooling.

The maths, with the batch-norm backward derived in closed form, is in
:mod:`gpucnn.functional.normalization`.  Running statistics are *buffers*
(``layer.buffers``): saved in checkpoints and state dicts, moved with the
layer, never touched by an optimizer.
"""
from __future__ import annotations

import numpy as np

from .._utils import check_array, check_param_match, positive_int, shown_shape
from ..functional import normalization as F
from .base import InternalLayer


class _BatchNorm(InternalLayer):
    RANKS: tuple = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, dtype=np.float32):
        super().__init__()
        self.num_features = positive_int(num_features, "num_features")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be > 0, got eps={eps!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"momentum must be in [0, 1], got momentum={momentum!r}")
        self.eps, self.momentum, self.affine = float(eps), float(momentum), bool(affine)
        if affine:
            self._add_param("gamma", np.ones(self.num_features, dtype=dtype))
            self._add_param("beta", np.zeros(self.num_features, dtype=dtype))
        self.buffers["running_mean"] = np.zeros(self.num_features, dtype=dtype)
        self.buffers["running_var"] = np.ones(self.num_features, dtype=dtype)
        self.buffers["num_batches_tracked"] = np.zeros((), dtype=np.int64)
        self._saved = None

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"

    def _check_public_input(self, x):
        name = type(self).__name__
        check_array(x, "x", None, name)
        if x.ndim not in self.RANKS:
            raise ValueError(f"{name}: x must have rank {' or '.join(map(str, self.RANKS))}, "
                             f"got shape {tuple(x.shape)}")

    def forward_internal(self, x):
        name = type(self).__name__
        check_array(x, "x", None, name, internal=True)
        if x.ndim not in self.RANKS:
            raise ValueError(f"{name}: x must have rank {' or '.join(map(str, self.RANKS))}, "
                             f"got shape {shown_shape(x, True)}")
        check_param_match(x, self.buffers["running_mean"], "x", name)
        if x.shape[0] != self.num_features:
            raise ValueError(f"{name}: x has {x.shape[0]} channels (shape {shown_shape(x, True)}) but the "
                             f"layer expects num_features={self.num_features}")
        y, self._saved = F.batch_norm_forward(
            x, self.params.get("gamma"), self.params.get("beta"), self.buffers["running_mean"],
            self.buffers["running_var"], training=self.training, momentum=self.momentum, eps=self.eps,
            ws=self.workspace)
        self._x_shape = tuple(x.shape)
        if self.training:
            self.buffers["num_batches_tracked"] += 1
        return y

    def backward_internal(self, dy, need_input_grad=True):
        self._check_forward_called(self._saved)
        name = type(self).__name__
        check_array(dy, "dy", None, f"{name}.backward", internal=True)
        if tuple(dy.shape) != self._x_shape:
            raise ValueError(f"{name}.backward: dy has shape {shown_shape(dy, True)}, expected "
                             f"{shown_shape(self._x_shape, True)}")
        dx, dgamma, dbeta = F.batch_norm_backward(dy, self._saved, ws=self.workspace)
        if self.affine:
            self._set_grad("gamma", dgamma)
            self._set_grad("beta", dbeta)
        return dx


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over (N, C, H, W): statistics per channel over N, H and W.

    Args:
        num_features: C.  eps: added to the variance (1e-5).  momentum: of the
            running estimates (0.1, PyTorch's convention: ``new = (1 - m) old + m batch``).
        affine: learn a scale ``gamma`` (params ``"gamma"``, init 1) and shift
            ``beta`` (``"beta"``, init 0).  dtype: of parameters and buffers.

    While training: normalises with the batch's statistics (biased variance)
    and moves the running mean and the running *unbiased* variance; in eval
    mode normalises with the running ones.  Buffers ``running_mean``,
    ``running_var`` (C,) and ``num_batches_tracked`` (an int64 count), named as
    in PyTorch.  ``backward`` returns dL/dx and overwrites the gradients.
    """

    RANKS = (4,)


class BatchNorm1d(_BatchNorm):
    """Batch normalisation over (N, C) or (N, C, L): per feature over the other axes.  As :class:`BatchNorm2d`."""

    RANKS = (2, 3)


class Dropout(InternalLayer):
    """Inverted dropout: while training each element is zeroed with probability ``p`` and the rest
    scaled by ``1 / (1 - p)``; the identity in eval mode.

    The masks come from gpucnn's counter stream (:func:`gpucnn.random.uniform`):
    fixed by ``gpucnn.seed``, the same on NumPy and CuPy, saved in checkpoints
    and continued exactly on resume.  Keeps the scale mask.
    """

    def __init__(self, p=0.5):
        super().__init__()
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1):
            raise ValueError(f"p must be in [0, 1), got p={p!r}")
        self.p = float(p)
        self._scale = None
        self._shape = None

    def extra_repr(self):
        return f"p={self.p}"

    def _check_public_input(self, x):
        check_array(x, "x", None, "Dropout")

    def forward_internal(self, x, mask=None):
        """Apply dropout; ``mask`` (0/1, the shape of x) overrides the random draw (for tests)."""
        check_array(x, "x", None, "Dropout", internal=True)
        self._shape = tuple(x.shape)
        y, self._scale = F.dropout_forward(x, self.p, self.training, mask)
        return y

    def backward_internal(self, dy, need_input_grad=True):
        self._check_forward_called(self._shape)
        if tuple(dy.shape) != self._shape:
            raise ValueError(f"Dropout.backward: dy has shape {shown_shape(dy, True)}, expected "
                             f"{shown_shape(self._shape, True)}")
        return F.dropout_backward(dy, self._scale)


class GlobalAvgPool2D(InternalLayer):
    """(N, C, H, W) -> (N, C): the mean of each channel's plane.  Keeps only the input shape."""

    batch_independent = True

    def __init__(self):
        super().__init__()
        self._x_shape = None

    def _check_public_input(self, x):
        check_array(x, "x", 4, "GlobalAvgPool2D")

    def forward_internal(self, x):
        check_array(x, "x", 4, "GlobalAvgPool2D", internal=True)
        y, self._x_shape = F.global_avg_pool_forward(x)
        return y

    def backward_internal(self, dy, need_input_grad=True):
        self._check_forward_called(self._x_shape)
        expected = (self._x_shape[0], self._x_shape[3])
        if tuple(dy.shape) != expected:
            raise ValueError(f"GlobalAvgPool2D.backward: dy has shape {shown_shape(dy, True)}, expected "
                             f"{shown_shape(expected, True)}")
        return F.global_avg_pool_backward(dy, self._x_shape)
