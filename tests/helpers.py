"""Shared utilities for the core test suite (gradients, seeds, torch parity, errors, optim).

Plain NumPy / PyTorch helpers only: hypothesis strategies live in ``strategies.py``, so a
box without hypothesis (the bare GPU box) still collects the tests that import this.

Imported as ``from helpers import ...``: pytest's default ``prepend`` import
mode puts this directory (``tests/``, which has no ``__init__.py``) on
``sys.path`` before collecting the test modules in it.

Nothing here is a fixture on purpose: ``tests/conftest.py`` belongs to another
part of the suite.
"""
from __future__ import annotations

import contextlib
import http.server
import threading

import numpy as np

# --------------------------------------------------------------------------- #
# inputs for gradient checks
# --------------------------------------------------------------------------- #


def away_from_kinks(x, margin: float = 0.1):
    """Move every entry with ``|x| < margin`` to ``+-margin`` (sign kept, 0 -> +margin).

    Central differences with eps ~ 1e-6 never straddle the ReLU-family kink at 0.
    """
    x = np.array(x, dtype=np.float64, copy=True)
    small = np.abs(x) < margin
    x[small] = np.where(x[small] < 0, -margin, margin)
    return x


def shuffled_arange(shape, rng, scale: float = 100.0):
    """Distinct values ``0, 1/scale, 2/scale, ...`` in random order (float64).

    Neighbouring values differ by ``1/scale`` (>> the checker's eps), so no max
    pool window has a tie or a near-tie; dividing keeps magnitudes O(1), which
    keeps central differences quiet.
    """
    size = int(np.prod(shape))
    return (rng.permutation(size).astype(np.float64) / scale).reshape(shape)


# --------------------------------------------------------------------------- #
# torch interop (imported lazily: only the parity / optimizer tests need torch)
# --------------------------------------------------------------------------- #


def to_torch(a, requires_grad: bool = False):
    """A float64/int64 torch tensor holding a copy of NumPy array ``a``."""
    import torch

    t = torch.from_numpy(np.array(a, copy=True))
    return t.requires_grad_(requires_grad) if requires_grad else t


def to_numpy(t):
    return t.detach().cpu().numpy()


# float64 parity with PyTorch: only summation order differs
TORCH_RTOL = 1e-10
TORCH_ATOL = 1e-12


def assert_torch_close(actual, expected, what: str, rtol: float = TORCH_RTOL, atol: float = TORCH_ATOL):
    """``assert_allclose`` of a gpucnn array against a torch tensor (or array)."""
    if not isinstance(expected, np.ndarray):
        expected = to_numpy(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol, err_msg=what)


def peak_bytes(fn) -> int:
    """The peak of Python/NumPy allocations (tracemalloc) while ``fn()`` runs (it may raise)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    except Exception:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def check_lenet5_on_a_batch_of_zero(cp, array_type):
    """lenet5 on ``cp`` (CuPy or the stand-in) maps a (0, 1, 28, 28) batch to empty ``array_type``
    results and zero gradients (an H200 run refused the first dense layer's (400, 0) input)."""
    import gpucnn
    from gpucnn import models

    gpucnn.seed(0)
    model = models.build("lenet5", device="cuda")
    y = model.forward(cp.zeros((0, 1, 28, 28), cp.float32))
    assert y.shape == (0, 10) and isinstance(y, array_type)
    dx = model.backward(cp.zeros((0, 10), cp.float32))
    assert dx.shape == (0, 1, 28, 28) and isinstance(dx, array_type)
    assert all(not bool(g.any()) for g in model.gradients())


# --------------------------------------------------------------------------- #
# dataset tests
# --------------------------------------------------------------------------- #
def isolate_data_env(tmp_path, monkeypatch) -> None:
    """No GPUCNN_DATA, a private cache dir under ``tmp_path``, and no proxies for 127.0.0.1 (the
    download tests' local servers): what every dataset test runs under."""
    monkeypatch.delenv("GPUCNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@contextlib.contextmanager
def local_http_server(handler):
    """A ``ThreadingHTTPServer`` on 127.0.0.1 (a free port) serving ``handler`` from a thread, for the
    download tests (never the internet): ``srv.base`` is its URL, ``srv.routes`` a dict and
    ``srv.requests`` a list for the handler to use; shut down and joined on exit."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    srv.routes, srv.requests = {}, []
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)
