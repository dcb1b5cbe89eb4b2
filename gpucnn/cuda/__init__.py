"""gpucnn's hand-written CUDA kernels and their host-side wrappers.

* :mod:`gpucnn.cuda.loader` finds ``kernels/*.cu``, compiles them (CuPy
  RawModule / NVRTC, or an injected builder such as the test emulator), caches
  the modules and launches every kernel through one checked launcher.
* :mod:`gpucnn.cuda.ops` holds the functions the layers call on CuPy arrays:
  ``conv2d_forward``, ``conv2d_backward_input``, ``conv2d_backward_weight``,
  ``maxpool2d_forward``, ``maxpool2d_backward``.

Importing this package needs no CuPy; calling a kernel with the default
builder and no CuPy raises :class:`~gpucnn.cuda.loader.CudaUnavailableError`.
"""
from . import loader, ops
from .loader import (
    CudaUnavailableError,
    KernelLaunchError,
    set_module_builder,
    use_module_builder,
    warmup,
)
from .ops import (
    conv2d_backward_input,
    conv2d_backward_weight,
    conv2d_forward,
    maxpool2d_backward,
    maxpool2d_forward,
)

__all__ = [
    "loader",
    "ops",
    "CudaUnavailableError",
    "KernelLaunchError",
    "set_module_builder",
    "use_module_builder",
    "warmup",
    "conv2d_forward",
    "conv2d_backward_input",
    "conv2d_backward_weight",
    "maxpool2d_forward",
    "maxpool2d_backward",
]
