"""gpucnn's hand-written CUDA kernels and their host-side wrappers.

* :mod:`gpucnn.cuda.loader` finds ``kernels/*.cu``, compiles them (CuPy
  RawModule / NVRTC, or an injected builder such as the test emulator), caches
  the compiled functions per device and launches every kernel through one
  checked launcher.
* One wrapper module per family, all on batch-last arrays, each function a
  fixed number of launches and nothing else: :mod:`.conv` (tiled forward,
  backward-input, split-K backward-weight), :mod:`.pool` (max pooling with
  uint8 taps, optionally fused with a ReLU), :mod:`.dense` (GEMMs with bias and
  activation epilogues), :mod:`.elementwise` (activation derivatives),
  :mod:`.loss` (fused softmax cross-entropy), :mod:`.optim` (SGD and Adam over
  flat buffers), :mod:`.batch` (the batch gather), :mod:`.gemm_tc` (the
  tensor-core GEMMs of the precision modes of :mod:`gpucnn.precision`),
  :mod:`.amp` (fp16's dynamic loss scaling, :class:`gpucnn.train.LossScaler`).
* :mod:`.sass` compiles a kernel file for sm_90 with NVRTC and reads the SASS
  of its inner loops (no GPU needed; ``gpucnn bench --static`` prints it).

gpucnn.functional calls these on CuPy arrays; nothing here imports from
gpucnn.layers or gpucnn.functional.  Importing this package needs no CuPy;
calling a kernel with the default builder and no CuPy raises
:class:`~gpucnn.cuda.loader.CudaUnavailableError`.
"""
from . import amp, batch, conv, dense, elementwise, gemm_tc, loader, loss, optim, pool
from .loader import (
    CudaUnavailableError,
    KernelLaunchError,
    set_module_builder,
    use_module_builder,
    warmup,
)

__all__ = [
    "amp", "batch", "conv", "dense", "elementwise", "gemm_tc", "loader", "loss", "optim", "pool",
    "CudaUnavailableError", "KernelLaunchError", "set_module_builder", "use_module_builder", "warmup",
]
