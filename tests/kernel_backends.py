"""The two kernel backends shared by tests/test_kernels_sim.py and
tests/test_softmax_xent_sim.py (test-only helper, not a test module):

* ``cudasim`` (marker ``cudasim``): the unchanged ``.cu`` sources on the CPU
  emulator in tests/cudasim, on NumPy arrays;
* ``cupy`` (marker ``gpu``): the same kernels compiled by CuPy (NVRTC) on a
  real CUDA GPU, on CuPy arrays; skipped, with the reason (the ``cupy_xp``
  fixture of tests/conftest.py), without one.  Launches synchronize after each
  kernel (``GPUCNN_CUDA_SYNC_CHECK=1``) so a fault names the launch that caused it.

A test module defines its own ``device`` fixture on top of this::

    @pytest.fixture(params=BACKENDS)
    def device(request, monkeypatch):
        with kernel_backend(request, monkeypatch) as dev:
            yield dev

tests/ is on sys.path through tests/conftest.py (and the sanitizer
subprocesses' PYTHONPATH), so this is imported as ``kernel_backends``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
from typing import Any, Callable

import numpy as np
import pytest

from gpucnn.cuda import loader

try:
    import cudasim
except Exception as exc:  # pragma: no cover - depends on the checkout
    cudasim = None
    CUDASIM_ERROR = f"tests/cudasim is not importable: {exc!r}"
else:
    CUDASIM_ERROR = None


@dataclasses.dataclass(frozen=True)
class KernelBackend:
    """Where the kernels run: ``put`` moves a NumPy array there, ``get`` brings a result back."""

    name: str
    xp: Any                                   # numpy (cudasim) or cupy
    put: Callable[[np.ndarray], Any]
    get: Callable[[Any], np.ndarray]
    #: context manager inside which SoftmaxCrossEntropy dispatches this
    #: backend's arrays to the kernels; a no-op unless a test module replaces
    #: it (tests/test_softmax_xent_sim.py does, for the emulator)
    kernel_losses: Callable[[], Any] = contextlib.nullcontext


def _checked_get(array_type, to_numpy):
    """``get`` that first checks the result is still on the backend's device."""
    def get(a):
        assert isinstance(a, array_type), (
            f"expected the result as {array_type.__module__}.{array_type.__name__}, "
            f"got {type(a).__module__}.{type(a).__name__}")
        return to_numpy(a)
    return get


BACKENDS = [
    pytest.param("cudasim", marks=pytest.mark.cudasim, id="cudasim"),
    pytest.param("cupy", marks=pytest.mark.gpu, id="cupy"),
]


@contextlib.contextmanager
def kernel_backend(request, monkeypatch):
    """Install the kernel module builder for ``request.param`` and yield its KernelBackend.

    Skips the test (with the reason) when the backend is not usable here.
    """
    if request.param == "cudasim":
        if cudasim is None:
            pytest.skip(CUDASIM_ERROR)
        if shutil.which("g++") is None:
            pytest.skip("cudasim needs g++")

        def build(code, name, options):
            return cudasim.load_module(code=code, name=name, options=options)

        with loader.use_module_builder(build):
            yield KernelBackend("cudasim", np, np.asarray, _checked_get(np.ndarray, np.asarray))
        return

    cp = request.getfixturevalue("cupy_xp")        # skips, with the reason, without a GPU
    monkeypatch.setenv(loader.SYNC_CHECK_ENV, "1")
    with loader.use_module_builder(loader.cupy_module_builder):
        yield KernelBackend("cupy", cp, cp.asarray, _checked_get(cp.ndarray, cp.asnumpy))
        cp.cuda.Device().synchronize()
