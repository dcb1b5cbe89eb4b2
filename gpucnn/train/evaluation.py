"""Evaluation: loss and accuracy in eval mode, in batches, and the confusion matrix."""
from __future__ import annotations

import numpy as np

from .. import backend, losses
from ..nvtx import nvtx_range

__all__ = ["evaluate", "evaluate_sums", "confusion_matrix", "loss_targets"]


def loss_targets(loss, labels, num_classes: int, dtype):
    """What ``loss.forward`` compares against: the labels, or one-hot rows for :class:`~gpucnn.losses.MSE`."""
    if isinstance(loss, losses.MSE):
        return losses.one_hot(labels, num_classes, dtype=dtype)
    return labels


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = number of examples of class i predicted as j (int64, NumPy)."""
    t = np.asarray(backend.asnumpy(y_true), dtype=np.int64)
    p = np.asarray(backend.asnumpy(y_pred), dtype=np.int64)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def evaluate_sums(model, x, y, loss=None, batch_size: int = 1000, num_classes: int = 10,
                  predictions: list | None = None) -> tuple[float, int, int]:
    """``(sum of per-example losses, correct predictions, n)`` in eval mode, in batches.

    The loss sum adds ``batch mean * batch size`` batch by batch (0.0 without
    ``loss``); predictions are appended to ``predictions`` when given.  The
    model's train/eval mode is restored afterwards.
    """
    was_training = getattr(model, "training", True)
    model.eval()
    n = int(x.shape[0])
    total_loss, correct = 0.0, 0
    try:
        for start in range(0, n, batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            with nvtx_range("eval_step"):
                out = model.forward(xb)
                pred = out.argmax(axis=1)
                if loss is not None:
                    L = loss.forward(out, loss_targets(loss, yb, num_classes, out.dtype))
                    total_loss += float(L) * int(xb.shape[0])
                correct += int((pred == yb).sum())
            if predictions is not None:
                predictions.append(pred)
    finally:
        model.train(was_training)
    return total_loss, correct, n


def evaluate(model, x, y, loss=None, batch_size: int = 1000, num_classes: int = 10,
             return_predictions: bool = False) -> dict:
    """Evaluate in eval mode, in batches: ``{"loss", "accuracy", "n"[, "predictions"]}``.

    ``x``/``y`` live on the model's device; ``loss`` (optional) is a gpucnn
    loss object (its mean over the examples is reported).  The model's
    train/eval mode is restored afterwards.
    """
    xp = backend.get_array_module(x)
    preds = [] if return_predictions else None
    total_loss, correct, n = evaluate_sums(model, x, y, loss, batch_size, num_classes, preds)
    result = {"loss": total_loss / n if (n and loss is not None) else float("nan"),
              "accuracy": correct / n if n else float("nan"), "n": n}
    if return_predictions:
        result["predictions"] = backend.asnumpy(xp.concatenate(preds)) if preds else np.zeros(0, np.int64)
    return result
