"""Softmax cross-entropy on batch-last logits (K, N) (kernels/loss.cu).

The numerics, NaN and invalid-label rules are those of the first-generation
softmax kernel it replaced (kernels/softmax_xent.cu): per sample, ``logsumexp`` after subtracting
the (NaN-propagating) maximum; labels int32 or int64 (read as int32 words, no
copy); a label outside [0, K) gives that sample a NaN loss (so a NaN mean), a
NaN gradient column and counts as wrong -- nothing raises and nothing syncs.

The forward pass also counts ``correct``, the samples whose first-max argmax
equals the label (a NaN logit counts as wrong): the train loop's accuracy with
no extra launch.  The mean and the count are reduced in an order fixed by N
alone, so the one-launch and two-launch forward paths give the same bits.

:func:`xent_forward_backward` is the train step's pass: the forward that also
writes the gradient (the bits of :func:`xent_forward` then
:func:`xent_backward`), one launch fewer.
"""
from __future__ import annotations

import numpy as np

from . import loader
from .elementwise import _contiguous, _dtype, _kernel, _ndim, _out, _positive, _same_shape, _words, _xp

__all__ = ["XENT_BLOCK", "XENT_FUSED_MAX_ROWS", "xent_forward", "xent_forward_backward", "xent_backward"]

#: Threads per block of the multi-block forward and of the backward.
XENT_BLOCK = 256
#: Up to this many samples the forward pass is ONE launch (one block of up to
#: 1024 threads, one thread per sample, then warp 0 reduces); above it the row
#: kernel on ceil(N / 256) blocks, then the one-warp mean kernel (2 launches).
XENT_FUSED_MAX_ROWS = 1024
#: Largest class count (the backward grid's y dimension).
XENT_MAX_CLASSES = 65535


def _check(func, name, logits, labels):
    dtype = _dtype(func, **{name: logits})
    _ndim(func, name, logits, 2, "(K, N) (batch-last)")
    _positive(func, name, logits.shape)
    _contiguous(func, **{name: logits})
    K, N = (int(s) for s in logits.shape)
    if K > XENT_MAX_CLASSES:
        raise ValueError(f"{func}: {K} classes; the kernels handle at most {XENT_MAX_CLASSES}")
    if N > 1 << 30:
        raise OverflowError(f"{func}: {N} samples; the kernels handle at most 2**30")
    words, nwords = _words(func, "labels", labels)
    _same_shape(func, "labels", labels, (N,), f"one per column of {name} of shape {(K, N)}")
    return dtype, K, N, words, nwords


def xent_forward(logits, labels, *, loss_out=None, probs_out=None, correct_out=None,
                 row_loss_out=None, row_correct_out=None, fused_max_rows=None, block=None):
    """Softmax cross-entropy (batch mean), probabilities and the correct count.

    Args:
        logits: (K, N) float32 or float64, C-contiguous (classes x batch).
        labels: (N,) int32 or int64 on the same device; not range-checked (an
            invalid label makes its sample's loss NaN and counts it wrong).
        loss_out, probs_out, correct_out: optional outputs (1,) of the logits'
            dtype, (K, N), and (1,) int32.
        row_loss_out, row_correct_out: optional per-sample workspaces (N,) of the
            logits' dtype and (N,) int32 (allocated per call when not given).
        fused_max_rows: samples up to which the pass is one launch (default
            :data:`XENT_FUSED_MAX_ROWS`); block: threads per block of the
            multi-block path, a multiple of 32 in [32, 1024] (default 256).
            Neither changes a bit of the results.
    Returns:
        (loss, probs, correct): loss (1,), probs (K, N), correct (1,) int32, all on
        the device (reading them syncs).
    Launches: N <= fused_max_rows: 1, ``xent_forward[_f64]`` with grid (1,1,1),
        block (min(1024, ceil(N/32)*32), 1, 1); else 2: ``xent_forward[_f64]``
        grid (max(2, ceil(N/block)), 1, 1), block (block, 1, 1), then ``xent_mean[_f64]``
        grid (1,1,1), block (32,1,1).
    """
    loss, probs, correct, _ = _forward("xent_forward", logits, labels, None, None, loss_out, probs_out,
                                       correct_out, row_loss_out, row_correct_out, fused_max_rows, block)
    return loss, probs, correct


def xent_forward_backward(logits, labels, scale=1.0, *, dlogits_out=None, loss_out=None, probs_out=None,
                          correct_out=None, row_loss_out=None, row_correct_out=None, fused_max_rows=None,
                          block=None):
    """:func:`xent_forward` and :func:`xent_backward` (``scale``) in one pass: the train step's.

    Args:
        as :func:`xent_forward`, plus ``scale`` (a host number, as :func:`xent_backward`'s) and
        ``dlogits_out``: optional output (K, N) of the logits' dtype (not probs).
    Returns:
        (loss, probs, correct, dlogits): the bits of :func:`xent_forward` then
        :func:`xent_backward` on its probs.
    Launches: as :func:`xent_forward`, with ``xent_forward_backward[_f64]`` in place of
        ``xent_forward[_f64]``: 1 up to ``fused_max_rows`` samples, else 2 (+ ``xent_mean``).
    """
    return _forward("xent_forward_backward", logits, labels, scale, dlogits_out, loss_out, probs_out,
                    correct_out, row_loss_out, row_correct_out, fused_max_rows, block)


def _host_scale(func, scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"{func}: scale must be a host number, got {type(scale).__name__}")
    return float(scale)


def _forward(func, logits, labels, scale, dlogits_out, loss_out, probs_out, correct_out, row_loss_out,
             row_correct_out, fused_max_rows, block):
    """The launches of xent_forward (``scale`` None) or xent_forward_backward."""
    xp = _xp(logits=logits, labels=labels, loss_out=loss_out, probs_out=probs_out, correct_out=correct_out,
             row_loss_out=row_loss_out, row_correct_out=row_correct_out, dlogits_out=dlogits_out)
    dtype, K, N, words, nwords = _check(func, "logits", logits, labels)
    grad = scale is not None
    if grad:
        scale = _host_scale(func, scale)
    fused_max_rows = XENT_FUSED_MAX_ROWS if fused_max_rows is None else int(fused_max_rows)
    block = XENT_BLOCK if block is None else int(block)
    if block % 32 or not 32 <= block <= 1024:
        raise ValueError(f"{func}: block must be a multiple of 32 in [32, 1024], got {block}")
    probs = _out(func, "probs_out", probs_out, xp, (K, N), dtype)
    loss = _out(func, "loss_out", loss_out, xp, (1,), dtype)
    correct = _out(func, "correct_out", correct_out, xp, (1,), np.int32)
    row_loss = _out(func, "row_loss_out", row_loss_out, xp, (N,), dtype)
    row_correct = _out(func, "row_correct_out", row_correct_out, xp, (N,), np.int32)
    args = (logits, words, nwords, probs, row_loss, row_correct, loss, correct)
    dlogits = None
    if grad:
        dlogits = _out(func, "dlogits_out", dlogits_out, xp, (K, N), dtype)
        if dlogits is probs or dlogits is logits:
            raise ValueError(f"{func}: dlogits_out may not alias probs_out or logits")
        args += (dlogits, K, N, scale / N)
    else:
        args += (K, N)
    if N <= fused_max_rows:
        loader.launch(_kernel(func, dtype), args, n_blocks=1, block=min(1024, loader.ceil_div(N, 32) * 32))
    else:
        n_blocks = max(2, loader.ceil_div(N, block))   # > 1 block: the kernel leaves the mean alone
        loader.launch(_kernel(func, dtype), args, n_blocks=n_blocks, block=block)
        loader.launch(_kernel("xent_mean", dtype), (row_loss, row_correct, loss, correct, N),
                      n_blocks=1, block=32)
    return loss, probs, correct, dlogits


def xent_backward(probs, labels, scale=1.0, *, out=None, block=None):
    """``dlogits = (probs - onehot(labels)) * (scale / N)``.

    Args:
        probs: (K, N) float32 or float64, from :func:`xent_forward`.
        labels: (N,) int32 or int64, the forward labels (invalid: NaN column).
        scale: a host number; ``scale / N`` is computed in double and rounded to
            the probs' dtype (as the NumPy path does).
        out: optional output (K, N) of the probs' dtype (may be probs itself).
        block: threads per block (default 256).
    Returns:
        dlogits (K, N).
    Launches: 1, ``xent_backward[_f64]``, grid (ceil(N/block), K, 1), block (block, 1, 1).
    """
    func = "xent_backward"
    xp = _xp(probs=probs, labels=labels, out=out)
    dtype, K, N, words, nwords = _check(func, "probs", probs, labels)
    scale = _host_scale(func, scale)
    block = XENT_BLOCK if block is None else int(block)
    if not 1 <= block <= 1024:
        raise ValueError(f"{func}: block must be in [1, 1024], got {block}")
    dlogits = _out(func, "out", out, xp, (K, N), dtype)
    loader.launch(_kernel(func, dtype), (probs, words, nwords, dlogits, K, N, scale / N),
                  grid=(loader.ceil_div(N, block), K, 1), block=block)
    return dlogits
