"""Losses with fused, hand-derived gradients.

* :class:`SoftmaxCrossEntropy` — seed 001 eq. 13/14 and seed 003:
  ``L = -(1/N) sum_n log softmax(z_n)[y_n]``, ``dL/dz = (p - onehot(y)) / N``.
* :class:`MSE` — the seeds' Euclidean loss ``1/2 ||y - a||^2`` summed over
  outputs, averaged over the batch: ``dL/da = (a - y) / N``.

``forward`` returns the loss as a 0-d array on the inputs' device (call
``float(L)`` to read it; on the GPU that synchronises).  ``backward(scale=1)``
returns the gradient with respect to the first forward argument.
"""
from __future__ import annotations


import numpy as np

from . import backend
from ._utils import check_array, check_integer_labels, shown_shape
from .functional import loss as F
from .functional.layout import from_internal, to_internal
from .functional.workspace import Workspace
from .layers.base import builtin_pass
from .nvtx import ranged


def one_hot(labels, num_classes: int, dtype=np.float32):
    """(N,) integer labels -> (N, num_classes) one-hot array on the labels' device (``TypeError`` for others)."""
    check_integer_labels(labels, "labels", "one_hot: ")
    xp = backend.get_array_module(labels)
    out = xp.zeros((labels.shape[0], num_classes), dtype=dtype)
    out[xp.arange(labels.shape[0]), labels] = 1
    return out


def one_hot_internal(labels, num_classes: int, dtype=np.float32):
    """(N,) integer labels -> batch-last (num_classes, N) one-hot array on the labels' device (``TypeError`` for others)."""
    check_integer_labels(labels, "labels", "one_hot_internal: ")
    xp = backend.get_array_module(labels)
    out = xp.zeros((num_classes, labels.shape[0]), dtype=dtype)
    out[labels, xp.arange(labels.shape[0])] = 1
    return out


class SoftmaxCrossEntropy:
    """Numerically stable softmax + cross-entropy over integer labels, batch mean.

    Args:
        check_labels: verify labels are within ``[0, K)`` on the GPU, where
            it costs a device sync (default True).  NumPy labels are always
            checked.  Training loops on the GPU turn it off to keep the step
            free of host syncs; then an out-of-range label is not an error: it
            makes the loss NaN (and that sample's gradient NaN).

    ``forward(logits (N, K), labels (N,))`` is the public pass;
    ``_forward`` takes the batch-last logits ``(K, N)`` a network
    produces inside (no transpose).  On CuPy the passes run the fused kernels
    of ``kernels/loss.cu``; labels of an integer dtype other than int32/int64
    are converted to int64 on the device.  ``correct`` (after a forward) is the
    number of samples predicted right, a 0-d array on the device.

    Shape:
        logits (N, K) float; labels (N,) any integer dtype -> scalar.
    """

    def __init__(self, check_labels: bool = True):
        self.check_labels = check_labels
        self._saved = None  # forward keeps functional.loss.SoftmaxXentSaved (probs, labels, correct)
        self.workspace = Workspace()  # the kernel path's probabilities and scratch, reused

    def _check(self, logits, labels, N, K, shown):
        backend.check_same_device(logits=logits, labels=labels)
        if labels.ndim != 1:
            raise ValueError(f"SoftmaxCrossEntropy: labels must have shape (N,), got shape {tuple(labels.shape)}")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"SoftmaxCrossEntropy: labels must be integers, got dtype {labels.dtype}")
        if labels.shape[0] != N:
            raise ValueError(f"SoftmaxCrossEntropy: batch mismatch: logits have N={N} rows (shape {shown}), "
                             f"labels have {labels.shape[0]}")
        # On NumPy the check is free, and without it a negative label would
        # silently index from the end; on CuPy it costs a host sync.
        if N and (self.check_labels or not backend.is_cupy(logits)):
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= K:
                bad = lo if lo < 0 else hi
                raise ValueError(f"SoftmaxCrossEntropy: label {bad} out of range [0, {K}) for {K} classes")

    @builtin_pass
    @ranged("SoftmaxCrossEntropy.forward")
    def forward(self, logits, labels):
        """The mean loss of ``logits (N, K)`` against ``labels (N,)``, a 0-d array."""
        check_array(logits, "logits", 2, "SoftmaxCrossEntropy")
        return self._forward(to_internal(logits), labels)

    def _forward(self, logits, labels, *, loss_out=None, correct_out=None):
        """As :meth:`forward`, on batch-last ``logits (K, N)``.

        On a GPU, ``loss_out`` / ``correct_out`` ((1,) arrays of the logits' dtype
        and int32) receive the loss and the correct count, so a training loop can
        keep each step's in its own slot without a copy.
        """
        check_array(logits, "logits", 2, "SoftmaxCrossEntropy", internal=True)
        K, N = logits.shape
        self._check(logits, labels, N, K, f"{(N, K)}")
        loss, self._saved = F.softmax_cross_entropy_forward(logits, labels, ws=self.workspace,
                                                            loss_out=loss_out, correct_out=correct_out)
        return loss

    def _forward_backward(self, logits, labels, scale=1.0, *, loss_out=None, correct_out=None):
        """:meth:`_forward` then :meth:`_backward` (``scale``): ``(loss, dlogits (K, N))``, the train
        step's pass.  On a GPU one kernel pass writes both (the same bits as the two); a subclass
        that redefines ``_forward`` or ``_backward`` gets its own two, in that order."""
        cls = type(self)
        if (cls._forward, cls._backward) != _XENT_OWN_PASSES:   # redefined, in a subclass or on the class
            outs = {k: v for k, v in (("loss_out", loss_out), ("correct_out", correct_out)) if v is not None}
            return self._forward(logits, labels, **outs), self._backward(scale)
        check_array(logits, "logits", 2, "SoftmaxCrossEntropy", internal=True)
        K, N = logits.shape
        self._check(logits, labels, N, K, f"{(N, K)}")
        loss, self._saved, dlogits = F.softmax_cross_entropy_forward_backward(
            logits, labels, scale, ws=self.workspace, loss_out=loss_out, correct_out=correct_out)
        return loss, dlogits

    @property
    def probs(self):
        """Softmax probabilities (N, K) of the last forward (None before one)."""
        return None if self._saved is None else from_internal(self._saved.probs)

    @property
    def correct(self):
        """How many samples of the last forward were predicted right (a 0-d array)."""
        return None if self._saved is None else self._saved.correct

    @builtin_pass
    @ranged("SoftmaxCrossEntropy.backward")
    def backward(self, scale=1.0):
        """dL/dlogits (N, K) of the last forward, times ``scale``."""
        return from_internal(self._backward(scale))

    def _backward(self, scale=1.0):
        """dL/dlogits as batch-last (K, N)."""
        if self._saved is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward called before forward")
        return F.softmax_cross_entropy_backward(self._saved, scale, ws=self.workspace)


#: SoftmaxCrossEntropy's own two passes, as defined: anything else in their place (a subclass's, or one
#: patched onto the class) runs instead of the fused pass.
_XENT_OWN_PASSES = (SoftmaxCrossEntropy._forward, SoftmaxCrossEntropy._backward)


class MSE:
    """Euclidean loss ``(1/N) sum_n 1/2 ||pred_n - target_n||^2``.

    ``forward(pred, target)`` on public arrays (batch first);
    ``_forward`` on batch-last ones (the same element-wise maths, N
    read from the last axis).

    Shape:
        pred and target of identical shape (N, ...) and dtype -> scalar.
    """

    def __init__(self):
        self._diff = None  # forward keeps pred - target
        self._n = None
        self._internal = False

    def _check(self, pred, target, internal):
        check_array(pred, "pred", None, "MSE", internal=internal)
        check_array(target, "target", None, "MSE", internal=internal)
        backend.check_same_device(pred=pred, target=target)
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(f"MSE: pred has shape {shown_shape(pred, internal)} but target has shape "
                             f"{shown_shape(target, internal)}")
        if pred.dtype != target.dtype:
            raise TypeError(f"MSE: pred is {pred.dtype} but target is {target.dtype}; convert explicitly")

    @builtin_pass
    @ranged("MSE.forward")
    def forward(self, pred, target):
        self._check(pred, target, False)
        self._internal, self._n = False, pred.shape[0]
        loss, self._diff = F.mse_forward(pred, target, self._n)
        return loss

    def _forward(self, pred, target):
        self._check(pred, target, True)
        self._internal, self._n = True, pred.shape[-1]
        loss, self._diff = F.mse_forward(pred, target, self._n)
        return loss

    @builtin_pass
    @ranged("MSE.backward")
    def backward(self, scale=1.0):
        if self._diff is None:
            raise RuntimeError("MSE.backward called before forward")
        return F.mse_backward(self._diff, self._n, scale)

    def _backward(self, scale=1.0):
        return self.backward(scale)


LOSSES = {"softmax_cross_entropy": SoftmaxCrossEntropy, "mse": MSE}
