"""The three places a functional op can run, as one pytest fixture (test-only helper).

* ``numpy`` -- the NumPy path, on NumPy arrays (no kernels);
* ``cudasim`` (marker ``cudasim``) -- the unchanged ``kernels/*.cu`` on the CPU
  emulator in tests/cudasim: NumPy arrays, routed to the kernels by patching
  the ONE dispatch seam, :func:`gpucnn.functional._dispatch.use_kernels`;
* ``cupy`` (marker ``gpu``) -- the same kernels compiled by CuPy (NVRTC) on a
  real GPU, on CuPy arrays; skipped, with the reason, without one.  Launches
  synchronize after each kernel (``GPUCNN_CUDA_SYNC_CHECK=1``) so a fault
  names the launch that caused it.

A test module uses it as::

    from backends import BACKENDS, backend_fixture
    backend = backend_fixture()          # the fixture, named "backend"

    def test_op(backend):
        y = F.some_op(backend.put(x)) ...
        np.testing.assert_allclose(backend.get(y), reference, **backend.tol(dtype))

``backend.get`` also checks that the result still lives on the backend's device.
tests/ is on sys.path (tests/conftest.py), so this is imported as ``backends``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
from typing import Any, Callable

import numpy as np
import pytest

from gpucnn.cuda import loader
from gpucnn.functional import _dispatch

try:
    import cudasim
except Exception as exc:  # pragma: no cover - depends on the checkout
    cudasim = None
    CUDASIM_ERROR = f"tests/cudasim is not importable: {exc!r}"
else:
    CUDASIM_ERROR = None

#: float tolerances of a kernel against a float64 reference (summation order differs).
TOL = {np.dtype(np.float32): dict(rtol=2e-5, atol=2e-5), np.dtype(np.float64): dict(rtol=1e-12, atol=1e-12)}


@dataclasses.dataclass(frozen=True)
class Backend:
    """Where the ops run: ``put`` moves a NumPy array there, ``get`` brings a result back."""

    name: str
    xp: Any
    put: Callable[[np.ndarray], Any]
    get: Callable[[Any], np.ndarray]

    @property
    def kernels(self) -> bool:
        """True when the ops take the CUDA-kernel path here."""
        return self.name != "numpy"

    @staticmethod
    def tol(dtype) -> dict:
        return TOL[np.dtype(dtype)]


def _checked_get(array_type, to_numpy):
    def get(a):
        assert isinstance(a, array_type), (
            f"expected the result as {array_type.__module__}.{array_type.__name__}, "
            f"got {type(a).__module__}.{type(a).__name__}")
        return to_numpy(a)
    return get


BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("cudasim", marks=pytest.mark.cudasim, id="cudasim"),
    pytest.param("cupy", marks=pytest.mark.gpu, id="cupy"),
]
KERNEL_BACKENDS = BACKENDS[1:]


def emulator_builder(code, name, options):
    return cudasim.load_module(code=code, name=name, options=options)


def skip_without_emulator():
    if cudasim is None:
        pytest.skip(CUDASIM_ERROR)
    if shutil.which("g++") is None:
        pytest.skip("cudasim needs g++")


@contextlib.contextmanager
def use_backend(name, request, monkeypatch):
    """Install backend ``name`` for one test and yield its :class:`Backend`."""
    numpy_get = _checked_get(np.ndarray, np.asarray)
    if name == "numpy":
        monkeypatch.setattr(_dispatch, "use_kernels", lambda *arrays: False)
        yield Backend("numpy", np, np.asarray, numpy_get)
        return
    if name == "cudasim":
        skip_without_emulator()
        monkeypatch.setattr(_dispatch, "use_kernels", lambda *arrays: True)
        with loader.use_module_builder(emulator_builder):
            yield Backend("cudasim", np, np.asarray, numpy_get)
        return
    cp = request.getfixturevalue("cupy_xp")        # skips, with the reason, without a GPU
    monkeypatch.setenv(loader.SYNC_CHECK_ENV, "1")
    with loader.use_module_builder(loader.cupy_module_builder):
        yield Backend("cupy", cp, cp.asarray, _checked_get(cp.ndarray, cp.asnumpy))
        cp.cuda.Device().synchronize()


def backend_fixture(params=BACKENDS):
    """A ``backend`` fixture over ``params`` for a test module."""

    @pytest.fixture(params=params)
    def backend(request, monkeypatch):
        with use_backend(request.param, request, monkeypatch) as b:
            yield b

    return backend


class RecordingBuilder:
    """A kernel-loader module builder whose kernels run nothing and record each launch.

    ``launches`` holds ``(kernel, grid, block, args)`` tuples -- with
    ``shared_mem`` appended when made with ``shared_mem=True`` -- and
    ``builds`` every ``(file name, options, source)`` compiled.
    """

    def __init__(self, shared_mem: bool = False):
        self.launches, self.builds, self._smem = [], [], shared_mem

    def __call__(self, code, name, options):
        self.builds.append((name, options, code))
        recorder = self

        class Module:
            def get_function(self, kernel):
                def fn(grid, block, args, shared_mem=0):
                    entry = (kernel, tuple(grid), tuple(block), args)
                    recorder.launches.append(entry + (shared_mem,) if recorder._smem else entry)
                return fn
        return Module()

    def take(self):
        """``(kernel, grid, block)`` of the launches so far, which are forgotten."""
        out, self.launches = [(k, g, b) for k, g, b, *_ in self.launches], []
        return out


def recording_fixture(shared_mem: bool = False):
    """A ``fake`` fixture: the loader builds :class:`RecordingBuilder` modules inside the test."""

    @pytest.fixture
    def fake():
        rec = RecordingBuilder(shared_mem)
        with loader.use_module_builder(rec):
            yield rec

    return fake


def replay_net(pool=None):
    """The small network of the replayed-step tests (test_cuda_graph.py):
    conv 2->3 (3x3, pad 1) + ReLU + 2x2 pooling (max unless ``pool``), dense 36 -> 4; seeded."""
    import gpucnn as gc
    from gpucnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential

    gc.seed(5)
    return Sequential(Conv2D(2, 3, 3, padding=1), ReLU(), (pool or MaxPool2D)(2), Flatten(), Dense(3 * 4 * 3, 4))


def replay_data(n=23):
    """``(x (n, 2, 8, 6) float32, y (n,) int64 in 0..3, two epoch orders)`` for :func:`replay_net`."""
    rng = np.random.default_rng(9)
    return (rng.standard_normal((n, 2, 8, 6)).astype(np.float32), rng.integers(0, 4, n).astype(np.int64),
            [rng.permutation(n) for _ in range(2)])
