"""The functional tier: pure forward/backward function pairs, one per op.

``*_forward(...)`` returns ``(output, saved)``; ``*_backward(dy, saved, ...)``
returns the gradients.  ``saved`` has the same structure on every backend.
This is the one place where gpucnn decides between the NumPy path and its
CUDA kernels: each op that has a kernel asks
:func:`~gpucnn.functional._dispatch.use_kernels` with its arrays (CuPy arrays
-> kernels); element-wise ops are one ``xp`` code path.  Layers
(:mod:`gpucnn.layers`) hold parameters, gradients and flags and make one call
here per pass; the kernels (:mod:`gpucnn.cuda`) import nothing from here.

* :mod:`.conv` -- conv2d (im2col GEMM / the conv kernels), :mod:`.im2col`
* :mod:`.pooling` -- max_pool2d (argmax kernels), avg_pool2d, global average pooling
* :mod:`.dense` -- the dense layer's GEMMs
* :mod:`.normalization` -- batch normalisation; :mod:`.dropout` -- inverted dropout
* :mod:`.activation` -- sigmoid, tanh, scaled tanh, the ReLU family, softmax
* :mod:`.loss` -- softmax cross-entropy (fused kernels), squared error
"""
from . import activation, conv, dense, dropout, im2col, loss, normalization, pooling
from ._dispatch import use_kernels
from .conv import conv2d_backward, conv2d_forward
from .dense import dense_backward, dense_forward
from .loss import (mse_backward, mse_forward, softmax_cross_entropy_backward,
                   softmax_cross_entropy_forward)
from .pooling import (avg_pool2d_backward, avg_pool2d_forward, max_pool2d_backward,
                      max_pool2d_forward)

__all__ = [
    "activation", "conv", "dense", "dropout", "im2col", "loss", "normalization", "pooling", "use_kernels",
    "conv2d_forward", "conv2d_backward", "dense_forward", "dense_backward",
    "max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "mse_forward", "mse_backward",
]
