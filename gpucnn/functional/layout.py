"""The internal "batch-last" layout, and conversions at the public boundary.

Public arrays are NCHW images ``(N, C, H, W)`` and ``(N, F)`` vectors, as in
PyTorch.  Inside a network gpucnn keeps the batch as the *last* axis:
``(C, H, W, N)`` images and ``(F, N)`` vectors.  Then

* a convolution is one GEMM ``W (O, C*kh*kw) @ cols (C*kh*kw, Ho*Wo*N)``
  whose result already is the next layer's input, with no transpose;
* a dense layer is ``W @ x`` on ``(F, N)``, and flattening ``(C, H, W, N)``
  to ``(C*H*W, N)`` is a free reshape in the same (c, h, w) order as NCHW's;
* every window row of pooling and im2col is a contiguous run of N values,
  and the GPU kernels read consecutive images in one coalesced access.

:class:`~gpucnn.layers.Sequential` converts once at its boundaries; a layer
called on its own converts around its own op.  The functional ops whose names
end in the layout-neutral forms take and return batch-last arrays.
"""
from __future__ import annotations

from .. import backend

__all__ = ["to_internal", "from_internal", "public_shape", "internal_shape"]


def to_internal(x):
    """Public ``(N, ...)`` -> contiguous batch-last ``(..., N)`` (a copy)."""
    xp = backend.get_array_module(x)
    return xp.ascontiguousarray(xp.moveaxis(x, 0, -1))


def from_internal(y):
    """Batch-last ``(..., N)`` -> contiguous public ``(N, ...)`` (a copy, never a view of ``y``)."""
    xp = backend.get_array_module(y)
    out = xp.moveaxis(y, -1, 0)
    return out.copy() if out.flags.c_contiguous else xp.ascontiguousarray(out)


def public_shape(shape) -> tuple:
    """The public shape of a batch-last shape (for messages): ``(C, H, W, N) -> (N, C, H, W)``."""
    shape = tuple(int(s) for s in shape)
    return shape[-1:] + shape[:-1]


def internal_shape(shape) -> tuple:
    """The batch-last shape of a public shape: ``(N, C, H, W) -> (C, H, W, N)``."""
    shape = tuple(int(s) for s in shape)
    return shape[1:] + shape[:1]
