"""Losses as function pairs on batch-last predictions, with fused, hand-derived gradients.

* softmax cross-entropy — seed 001 eq. 13/14 and seed 003:
  ``L = -(1/N) sum_n log softmax(z_n)[y_n]``, ``dL/dz = (p - onehot(y)) / N``,
  over logits ``(K, N)`` (classes x batch).  Forward also counts the samples
  whose first-max prediction equals the label (a row holding a NaN counts as
  wrong): the train loop's accuracy for free.  On CuPy arrays it runs the
  fused kernels of ``kernels/loss.cu`` (:mod:`gpucnn.cuda.loss`: one launch
  forward up to 1024 samples, two above, one backward, no host sync);
  :func:`softmax_cross_entropy_forward_backward`, the train step's, writes the
  gradient in the forward's launch (the same bits as the two passes).
* squared error — the seeds' Euclidean loss ``1/2 ||y - a||^2`` summed over
  outputs, averaged over the batch: ``dL/da = (a - y) / N`` (one ``xp`` path,
  any layout: ``batch_size`` says N).

``*_forward`` returns ``(loss, saved)`` with the loss a 0-d array on the
inputs' device; ``*_backward(saved, scale)`` returns the gradient with respect
to the first forward argument, times ``scale``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend
from . import _dispatch
from .workspace import get

__all__ = ["SoftmaxXentSaved", "softmax_cross_entropy_forward", "softmax_cross_entropy_backward",
           "softmax_cross_entropy_forward_backward",
           "mse_forward", "mse_backward", "LABEL_DTYPES"]

#: Label dtypes the kernels read directly (int64 as pairs of int32 words).
LABEL_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


class SoftmaxXentSaved(NamedTuple):
    """Probabilities (K, N), the labels (N,), and the count of correct predictions (a 0-d array)."""

    probs: object
    labels: object
    correct: object


def softmax_cross_entropy_forward(logits, labels, *, ws=None, loss_out=None, correct_out=None):
    """Mean cross-entropy of softmax over axis 0 of ``logits (K, N)``; returns ``(loss, saved)``.

    Labels are not range-checked here (the loss class does that, where it
    knows whether a host sync is acceptable); on the kernel path an invalid
    label makes the loss NaN.  Labels of another integer dtype than int32 or
    int64 are converted (a copy) on the kernel path.  On the kernel path the
    probabilities and per-sample scratch come from ``ws``, and ``loss_out`` /
    ``correct_out`` ((1,) arrays of the logits' dtype and int32) receive the
    loss and the count when given (else they are new arrays).
    """
    K, N = logits.shape
    if N and K and _dispatch.use_kernels(logits):
        from ..cuda import loss as kloss

        if labels.dtype not in LABEL_DTYPES:
            labels = labels.astype(np.int64)
        xp = backend.get_array_module(logits)
        loss, probs, correct = kloss.xent_forward(
            logits, labels, loss_out=loss_out, correct_out=correct_out,
            probs_out=get(ws, "k.probs", (K, N), logits.dtype, xp),
            row_loss_out=get(ws, "k.row_loss", (N,), logits.dtype, xp),
            row_correct_out=get(ws, "k.row_correct", (N,), np.int32, xp))
        return loss.reshape(()), SoftmaxXentSaved(probs, labels, correct.reshape(()))
    xp = backend.get_array_module(logits)
    z = logits - logits.max(axis=0, keepdims=True)
    log_p = z - xp.log(xp.exp(z).sum(axis=0, keepdims=True))
    cols = xp.arange(N)
    loss = xp.asarray(-log_p[labels, cols].mean())  # a 0-d array on every backend
    valid = ~xp.isnan(logits).any(axis=0)
    correct = ((logits.argmax(axis=0) == labels) & valid).sum()
    return loss, SoftmaxXentSaved(xp.exp(log_p), labels, xp.asarray(correct))


def softmax_cross_entropy_forward_backward(logits, labels, scale=1.0, *, ws=None, loss_out=None,
                                           correct_out=None):
    """:func:`softmax_cross_entropy_forward` then :func:`softmax_cross_entropy_backward` (``scale``):
    ``(loss, saved, dlogits)``, the same values and bits.  On the kernel path, with a host
    ``scale``, one pass (``xent_forward_backward``: the launches of the forward alone)."""
    K, N = logits.shape
    if N and K and _host_number(scale) and _dispatch.use_kernels(logits):
        from ..cuda import loss as kloss

        if labels.dtype not in LABEL_DTYPES:
            labels = labels.astype(np.int64)
        xp = backend.get_array_module(logits)
        loss, probs, correct, dlogits = kloss.xent_forward_backward(
            logits, labels, scale, loss_out=loss_out, correct_out=correct_out,
            dlogits_out=get(ws, "k.dlogits", (K, N), logits.dtype, xp),
            probs_out=get(ws, "k.probs", (K, N), logits.dtype, xp),
            row_loss_out=get(ws, "k.row_loss", (N,), logits.dtype, xp),
            row_correct_out=get(ws, "k.row_correct", (N,), np.int32, xp))
        return loss.reshape(()), SoftmaxXentSaved(probs, labels, correct.reshape(())), dlogits
    loss, saved = softmax_cross_entropy_forward(logits, labels, ws=ws, loss_out=loss_out, correct_out=correct_out)
    return loss, saved, softmax_cross_entropy_backward(saved, scale, ws=ws)


def _host_number(scale) -> bool:
    return not isinstance(scale, bool) and isinstance(scale, (int, float, np.integer, np.floating))


def softmax_cross_entropy_backward(saved: SoftmaxXentSaved, scale=1.0, *, ws=None):
    """``(p - onehot(y)) * scale / N`` as (K, N)."""
    probs, labels = saved.probs, saved.labels
    if probs.size and _host_number(scale) and _dispatch.use_kernels(probs):
        from ..cuda import loss as kloss

        return kloss.xent_backward(probs, labels, scale,
                                   out=get(ws, "k.dlogits", probs.shape, probs.dtype,
                                           backend.get_array_module(probs)))
    xp = backend.get_array_module(probs)
    N = probs.shape[1]
    g = probs.copy()
    g[labels, xp.arange(N)] -= 1
    g *= g.dtype.type(scale / N)
    return g


def mse_forward(pred, target, batch_size: int):
    """``(1/N) sum 1/2 (pred - target)^2`` with ``N = batch_size``; keeps ``pred - target``."""
    xp = backend.get_array_module(pred)
    diff = pred - target
    return xp.asarray((diff * diff).sum() * pred.dtype.type(0.5 / batch_size)), diff


def mse_backward(diff, batch_size: int, scale=1.0):
    return diff * diff.dtype.type(scale / batch_size)
