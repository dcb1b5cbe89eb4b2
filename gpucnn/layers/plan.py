"""How a :class:`~gpucnn.layers.Sequential` runs its layers: stages, some of them fused.

A stage is one layer, or a layer with the ones it absorbs into its call:

* ``Conv2D`` -> [``ReLU`` | ``Sigmoid`` | ``Tanh``] -> [``MaxPool2D``]: one
  convolution call with the activation and the pooling in its epilogue
  (after a ReLU the pooling runs first and the ReLU on the pooled values: the
  same numbers, a quarter of the work; see :mod:`gpucnn.functional.pooling`);
* ``Dense`` -> [``ReLU`` | ``Sigmoid`` | ``Tanh``]: one dense call.

Only these exact classes fuse (a subclass may change the maths).  A fused
stage is named after its layers (``Conv2D+ReLU+MaxPool2D``): that is its NVTX
range.  With anomaly detection on (:mod:`gpucnn.debug`) nothing fuses, so the
first layer producing NaN/Inf is named.
"""
from __future__ import annotations

from dataclasses import dataclass

from .activations import ReLU, Sigmoid, Tanh
from .conv import Conv2D
from .dense import Dense
from .pooling import MaxPool2D

__all__ = ["Stage", "plan"]

_FUSED_ACT = {ReLU: "relu", Sigmoid: "sigmoid", Tanh: "tanh"}


@dataclass(frozen=True)
class Stage:
    """Layers ``start .. start + len(layers) - 1`` of a Sequential, run as one call of the first."""

    start: int
    layers: tuple
    act: str | None = None
    pool: tuple | None = None

    @property
    def name(self) -> str:
        return "+".join(type(layer).__name__ for layer in self.layers)

    @property
    def lead(self):
        return self.layers[0]

    def forward(self, x):
        if self.pool is not None:
            return self.lead.forward_internal(x, act=self.act, pool=self.pool)
        if self.act is not None:
            return self.lead.forward_internal(x, act=self.act)
        return self.lead.forward_internal(x)

    def backward(self, dy, need_input_grad: bool):
        return self.lead.backward_internal(dy, need_input_grad=need_input_grad)


def plan(layers, fuse: bool = True) -> list[Stage]:
    """The stages of ``layers``, fusing what :data:`Stage` describes when ``fuse``."""
    stages, i = [], 0
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        act = _FUSED_ACT.get(type(nxt)) if fuse and type(layer) in (Conv2D, Dense) else None
        members, pool = [layer], None
        if act is not None:
            members.append(nxt)
        if fuse and type(layer) is Conv2D:
            after = layers[i + len(members)] if i + len(members) < len(layers) else None
            if type(after) is MaxPool2D:
                members.append(after)
                pool = (after.kernel_size, after.stride)
        stages.append(Stage(i, tuple(members), act, pool))
        i += len(members)
    return stages
