"""Evaluation: loss and accuracy in eval mode, in batches, and the confusion matrix."""
from __future__ import annotations

import numpy as np

from .. import backend, losses
from ..nvtx import nvtx_range

__all__ = ["evaluate", "confusion_matrix", "loss_targets"]


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


def evaluate(model, x, y, loss=None, batch_size: int = 1000, num_classes: int = 10,
             return_predictions: bool = False) -> dict:
    """Evaluate in eval mode, in batches: ``{"loss", "accuracy", "n"[, "predictions"]}``.

    ``x``/``y`` live on the model's device; ``loss`` (optional) is a gpucnn
    loss object (its mean over the examples is reported).  The model's
    train/eval mode is restored afterwards.
    """
    was_training = getattr(model, "training", True)
    model.eval()
    xp = backend.get_array_module(x)
    n = int(x.shape[0])
    total_loss, correct, preds = 0.0, 0, []
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
            if return_predictions:
                preds.append(pred)
    finally:
        model.train(was_training)
    result = {"loss": total_loss / n if (n and loss is not None) else float("nan"),
              "accuracy": correct / n if n else float("nan"), "n": n}
    if return_predictions:
        result["predictions"] = backend.asnumpy(xp.concatenate(preds)) if preds else np.zeros(0, np.int64)
    return result
