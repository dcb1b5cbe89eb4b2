"""Batch normalisation layers: BatchNorm2d, BatchNorm1d.

The maths, with the batch-norm backward derived in closed form, is in
:mod:`gpucnn.functional.normalization`.  Running statistics are *buffers*
(``layer.buffers``): saved in checkpoints and state dicts, moved with the
layer, never touched by an optimizer.
"""
from __future__ import annotations

import numpy as np

from .._utils import check_array, check_param_match, positive_int, shown_shape
from ..functional import normalization as F
from .base import Layer


class _BatchNorm(Layer):
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

    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
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
        if self.training:
            self.buffers["num_batches_tracked"] += 1
        return self._expect(y)

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
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
