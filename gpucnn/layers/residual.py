"""Residual connections: ``y = block(x) + shortcut(x)``, nestable in a Sequential.

Backward is the sum rule: ``dL/dx = block.backward(dy) + shortcut.backward(dy)``
(the identity shortcut passes ``dy`` straight through).  Parameters are named
``block.<...>`` and ``shortcut.<...>`` under the Residual's own prefix
(``"3.block.0.W"``), state dicts and checkpoints follow, and NVTX ranges nest:
``Residual.forward`` holds the block's stage ranges.

:func:`basic_block` builds the ResNet "basic block" (3x3 conv - BN - ReLU -
3x3 conv - BN, plus a shortcut) with the projection shortcut -- a 1x1 strided
conv and a BatchNorm -- when the shape changes.
"""
from __future__ import annotations

from .. import backend
from .._utils import check_array, shown_shape
from ..functional.workspace import get
from .base import Layer, indent_repr, run_backward, run_forward
from .container import Sequential

__all__ = ["Residual", "basic_block"]


class Residual(Layer):
    """``y = block(x) + shortcut(x)``; ``shortcut=None`` is the identity.

    Args:
        block: a layer (usually a :class:`~gpucnn.layers.Sequential`).
        shortcut: a layer mapping x to block(x)'s shape, or None.
    """

    def __init__(self, block: Layer, shortcut: Layer | None = None):
        super().__init__()
        for what, layer in (("block", block), ("shortcut", shortcut)):
            if layer is not None and not isinstance(layer, Layer):
                raise TypeError(f"Residual: {what} is {type(layer).__name__}, not a gpucnn Layer")
        self.block, self.shortcut = block, shortcut

    def __repr__(self):
        return f"Residual(\n  block={indent_repr(self.block)},\n  shortcut={indent_repr(self.shortcut)}\n)"

    def children(self):
        return [self.block] + ([self.shortcut] if self.shortcut is not None else [])

    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        check_array(x, "x", None, "Residual", internal=True)
        y = run_forward(self.block, x)
        s = x if self.shortcut is None else run_forward(self.shortcut, x)
        if tuple(y.shape) != tuple(s.shape):
            raise ValueError(f"Residual: the block gives shape {shown_shape(y, True)} but the shortcut "
                             f"{shown_shape(s, True)}; give a shortcut that changes the shape too "
                             f"(gpucnn.layers.residual.basic_block does)")
        xp = backend.get_array_module(y)
        out = get(self.workspace, "sum", y.shape, y.dtype, xp)
        xp.add(y, s, out=out)
        return self._expect(out)

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        dx = run_backward(self.block, dy)
        ds = dy if self.shortcut is None else run_backward(self.shortcut, dy)
        xp = backend.get_array_module(dx)
        return xp.add(dx, ds, out=get(self.workspace, "dsum", dx.shape, dx.dtype, xp))

    # -- the sub-layers' state ------------------------------------------------
    def named_parameters(self, prefix: str = ""):
        out = self.block.named_parameters(f"{prefix}block.")
        if self.shortcut is not None:
            out += self.shortcut.named_parameters(f"{prefix}shortcut.")
        return out

    def named_buffers(self, prefix: str = ""):
        out = self.block.named_buffers(f"{prefix}block.")
        if self.shortcut is not None:
            out += self.shortcut.named_buffers(f"{prefix}shortcut.")
        return out

    def train(self, mode: bool = True):
        self.training = bool(mode)
        for child in self.children():
            child.train(mode)
        return self

    def astype(self, dtype):
        for child in self.children():
            child.astype(dtype)
        return self

    def to(self, device: str):
        for child in self.children():
            child.to(device)
        self.workspace.clear()
        return self

    @property
    def dtype(self):
        return self.block.dtype


def basic_block(in_channels: int, out_channels: int, stride: int = 1, dtype=None) -> Residual:
    """ResNet's basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the identity or a
    1x1-conv(stride)-BN projection when the shape changes.  Follow it with a ReLU."""
    import numpy as np

    from .activation import ReLU
    from .conv import Conv2D
    from .normalization import BatchNorm2d

    dtype = np.float32 if dtype is None else dtype
    block = Sequential(
        Conv2D(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, dtype=dtype),
        BatchNorm2d(out_channels, dtype=dtype), ReLU(),
        Conv2D(out_channels, out_channels, 3, padding=1, bias=False, dtype=dtype),
        BatchNorm2d(out_channels, dtype=dtype),
    )
    shortcut = None
    if stride != 1 or in_channels != out_channels:
        shortcut = Sequential(Conv2D(in_channels, out_channels, 1, stride=stride, bias=False, dtype=dtype),
                              BatchNorm2d(out_channels, dtype=dtype))
    return Residual(block, shortcut)
