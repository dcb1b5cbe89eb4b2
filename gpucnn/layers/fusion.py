"""How a :class:`~gpucnn.layers.Sequential` runs its layers: stages, some of them fused.

A stage is one layer, or a layer with the ones it absorbs into its call:

* ``Conv2D`` -> [``ReLU`` | ``Sigmoid`` | ``Tanh``] -> [``MaxPool2D``]: one
  convolution call with the activation and the pooling in its epilogue
  (after a ReLU the pooling runs first and the ReLU on the pooled values: the
  same numbers, a quarter of the work; see :mod:`gpucnn.functional.pooling`);
* ``Dense`` -> [``ReLU`` | ``Sigmoid`` | ``Tanh``]: one dense call.

A layer fuses when it computes with exactly these classes' ``_forward`` and
``_backward`` (:func:`~gpucnn.layers.base.compute_class`): a subclass that
only adds to ``__init__`` or ``extra_repr`` fuses, one that overrides
``forward`` or ``backward`` runs through them, alone.  A fused stage is named
after its layers (``Conv2D+ReLU+MaxPool2D``): that is its NVTX range and what
the Sequential's ``repr`` shows.  ``Sequential(fuse=False)`` and anomaly
detection (:mod:`gpucnn.debug`, which names the first layer giving NaN/Inf)
fuse nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from .activation import ReLU, Sigmoid, Tanh
from .base import Epilogue, compute_class, run_backward, run_forward, runs_batch_last
from .conv import Conv2D
from .dense import Dense
from .pooling import MaxPool2D

__all__ = ["Stage", "stages_of"]

_FUSED_ACT = {ReLU: "relu", Sigmoid: "sigmoid", Tanh: "tanh"}


@dataclass(frozen=True)
class Stage:
    """Layers ``start .. start + len(layers) - 1`` of a Sequential, run as one call of the first."""

    start: int
    layers: tuple
    epilogue: Epilogue | None = None

    @property
    def name(self) -> str:
        return "+".join(type(layer).__name__ for layer in self.layers)

    @property
    def lead(self):
        return self.layers[0]

    @property
    def own_passes(self) -> bool:
        """Whether the layer runs through its own public forward/backward (converted at its boundary)."""
        return not runs_batch_last(self.lead)

    def forward(self, x):
        return run_forward(self.lead, x, self.epilogue)

    def backward(self, dy, input_grad: bool):
        return run_backward(self.lead, dy, input_grad)


def stages_of(layers, fuse: bool = True) -> list[Stage]:
    """The stages of ``layers``, fusing what the module docstring lists when ``fuse``."""
    stages, i = [], 0
    while i < len(layers):
        members, act, pool = [layers[i]], None, None
        lead = compute_class(layers[i]) if fuse else None
        if lead in (Conv2D, Dense) and i + 1 < len(layers):
            act = _FUSED_ACT.get(compute_class(layers[i + 1]))
            if act is not None:
                members.append(layers[i + 1])
        after = i + len(members)
        if lead is Conv2D and after < len(layers) and compute_class(layers[after]) is MaxPool2D:
            members.append(layers[after])
            pool = (layers[after].kernel_size, layers[after].stride)
        epilogue = Epilogue(act, pool) if act is not None or pool is not None else None
        stages.append(Stage(i, tuple(members), epilogue))
        i += len(members)
    return stages
