"""Layers: one module per family, one ``xp`` code path each.

* :mod:`.conv` — Conv2D
* :mod:`.pooling` — MaxPool2D, AvgPool2D
* :mod:`.dense` — Dense, Flatten
* :mod:`.activations` — Sigmoid, Tanh, ScaledTanh, ReLU, LeakyReLU, PReLU, RReLU, Softmax
* :mod:`.container` — Sequential
"""
from .activations import LeakyReLU, PReLU, ReLU, RReLU, ScaledTanh, Sigmoid, Softmax, Tanh
from .base import Layer
from .container import Sequential
from .conv import Conv2D
from .dense import Dense, Flatten
from .pooling import AvgPool2D, MaxPool2D

__all__ = [
    "Layer", "Sequential", "Conv2D", "MaxPool2D", "AvgPool2D", "Dense", "Flatten",
    "Sigmoid", "Tanh", "ScaledTanh", "ReLU", "LeakyReLU", "PReLU", "RReLU", "Softmax",
]
