# ---- cudasim (test-only CUDA emulator, tests/cudasim) ------------------------
# Puts tests/ on sys.path so tests (and the sanitizer subprocesses) can
# `from cudasim import load_module` however pytest was started.
import os as _os
import sys as _sys

_TESTS_DIR = _os.path.dirname(_os.path.abspath(__file__))
if _TESTS_DIR not in _sys.path:
    _sys.path.insert(0, _TESTS_DIR)
# ---- end cudasim --------------------------------------------------------------


# ---- gpu (CuPy on a real CUDA device) -------------------------------------------
# Shared by tests/test_gpu.py and the "cupy" backend of tests/test_kernels_sim.py.
# `gpu_skip_reason()` is None when CuPy sees a CUDA device, else a sentence saying
# why GPU tests skip; the `cupy_xp` fixture returns the cupy module or skips with
# that sentence.  Tests that need a GPU are also marked `gpu` (pytest -m gpu).
import pytest as _pytest


def gpu_skip_reason():
    """None if CuPy sees a CUDA GPU, else why `gpu` tests are skipped."""
    from gpucnn import backend

    if backend.cupy is None:
        return "no GPU: CuPy is not installed (pip install 'gpucnn[cuda12]' or [cuda13])"
    if not backend.cuda_available():
        return "no GPU: CuPy is installed but sees no CUDA device"
    return None


@_pytest.fixture(scope="session")
def cupy_xp():
    """The cupy module, or skip the test with the reason there is no GPU."""
    reason = gpu_skip_reason()
    if reason is not None:
        _pytest.skip(reason)
    from gpucnn import backend

    return backend.cupy
# ---- end gpu --------------------------------------------------------------------


# ---- compute-sanitizer runs (tests/gpu/run_on_device.sh) -------------------------
# GPUCNN_TEST_NO_CUPY_POOL=1: CuPy's memory pool off, every array its own cudaMalloc,
# so that memcheck sees an out-of-bounds access instead of a read inside a pooled block.
if _os.environ.get("GPUCNN_TEST_NO_CUPY_POOL") == "1":
    try:
        import cupy as _cupy

        _cupy.cuda.set_allocator(None)
        _cupy.cuda.set_pinned_memory_allocator(None)
    except ImportError:
        pass
