"""gpucnn: convolutional networks from hand-derived forward/backward passes.

The same layer code runs on NumPy (CPU, and float64 gradient checks) and on
CuPy (NVIDIA GPUs, with hand-written CUDA kernels at the hot spots).

>>> import numpy as np, gpucnn as gc
>>> gc.seed(0)
>>> model = gc.models.build("lenet5")
>>> logits = model.forward(np.zeros((2, 1, 28, 28), np.float32))
>>> logits.shape
(2, 10)
"""
from . import backend, data, debug, functional, init, layers, losses, models, nvtx, optim, testing, train
from .backend import DeviceMismatchError, asnumpy, get_array_module, to_device
from .inference import load, predict
from .layers import Sequential
from .random import seed

__version__ = "0.1.0"

__all__ = [
    "backend", "data", "debug", "functional", "init", "layers", "losses", "models", "nvtx", "optim",
    "testing", "train",
    "DeviceMismatchError", "asnumpy", "get_array_module", "to_device", "Sequential", "seed", "load", "predict",
]
