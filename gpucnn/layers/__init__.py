"""Layers: one module per family, one ``xp`` code path each.

* :mod:`.conv` — Conv2D
* :mod:`.pooling` — MaxPool2D, AvgPool2D, GlobalAvgPool2D
* :mod:`.dense` — Dense, Flatten
* :mod:`.activation` — Sigmoid, Tanh, ScaledTanh, ReLU, LeakyReLU, PReLU, RReLU, Softmax
* :mod:`.normalization` — BatchNorm2d, BatchNorm1d
* :mod:`.dropout` — Dropout
* :mod:`.residual` — Residual (and :func:`~gpucnn.layers.residual.basic_block`)
* :mod:`.container` — Sequential, and :mod:`.fusion`, how it fuses its layers
* :mod:`.base` — Layer, the contract: override ``forward(x)`` / ``backward(dy)``
"""
from .activation import LeakyReLU, PReLU, ReLU, RReLU, ScaledTanh, Sigmoid, Softmax, Tanh
from .base import Layer
from .container import Sequential
from .conv import Conv2D
from .dense import Dense, Flatten
from .dropout import Dropout
from .normalization import BatchNorm1d, BatchNorm2d
from .pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from .residual import Residual

__all__ = [
    "Layer", "Sequential", "Conv2D", "MaxPool2D", "AvgPool2D", "Dense", "Flatten",
    "Sigmoid", "Tanh", "ScaledTanh", "ReLU", "LeakyReLU", "PReLU", "RReLU", "Softmax",
    "BatchNorm2d", "BatchNorm1d", "Dropout", "GlobalAvgPool2D", "Residual",
]
