"""Fully connected layer as a function pair (PyTorch layout, ``W`` is (out, in))::

    y = x W^T + b,   dL/dW = dy^T x,   dL/db = sum_n dy,   dL/dx = dy W

(seed 001 eq. 8: dD_j/dw_ck = x_c delta_jk; seed 002: grad_W = a delta^T with
its W stored transposed).  One ``xp`` code path: the matrix products are
BLAS on NumPy and cuBLAS on CuPy.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["LinearSaved", "linear_forward", "linear_backward"]


class LinearSaved(NamedTuple):
    """The input x (needed for dL/dW) and the weights (a reference)."""

    x: object
    W: object
    has_bias: bool


def linear_forward(x, W, b):
    """``y = x @ W.T + b`` for x (N, in), W (out, in), b (out,) or None; returns ``(y, saved)``."""
    y = x @ W.T
    if b is not None:
        y += b
    return y, LinearSaved(x, W, b is not None)


def linear_backward(dy, saved: LinearSaved, *, need_input_grad=True, dW_out=None, db_out=None):
    """``(dx, dW, db)``; dW/db are written into ``dW_out``/``db_out`` when given (overwritten)."""
    dW = _store(dy.T @ saved.x, dW_out)
    db = _store(dy.sum(axis=0), db_out) if saved.has_bias else None
    dx = dy @ saved.W if need_input_grad else None
    return dx, dW, db


def _store(value, out):
    if out is None:
        return value
    out[...] = value
    return out
