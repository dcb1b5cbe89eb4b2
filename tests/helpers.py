"""Shared utilities for the core test suite (gradients, seeds, torch parity, errors, optim).

Imported as ``from helpers import ...``: pytest's default ``prepend`` import
mode puts this directory (``tests/``, which has no ``__init__.py``) on
``sys.path`` before collecting the test modules in it.

Nothing here is a fixture on purpose: ``tests/conftest.py`` belongs to another
part of the suite.
"""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# --------------------------------------------------------------------------- #
# hypothesis: small, reproducible runs (the machine is shared; CI must replay)
# --------------------------------------------------------------------------- #


def hyp(max_examples: int = 30):
    """``@hyp(n)``: hypothesis settings for this suite (derandomized, no database)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


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
# shape strategies (valid configurations only; errors are tested separately)
# --------------------------------------------------------------------------- #


@st.composite
def conv_configs(draw, max_kernel=5, max_stride=3, max_pad=2, max_extra=4, max_channels=3):
    """A valid Conv2D configuration: dict with N, C, O, H, W, kernel, stride, padding.

    ``H + 2*ph >= kh`` always holds (output >= 1); ``max_extra`` bounds how far
    the padded input exceeds the kernel, so (H + 2p - k) % stride takes every
    residue, including non-zero ones.
    """
    kh = draw(st.integers(1, max_kernel))
    kw = draw(st.integers(1, max_kernel))
    sh = draw(st.integers(1, max_stride))
    sw = draw(st.integers(1, max_stride))
    ph = draw(st.integers(0, max_pad))
    pw = draw(st.integers(0, max_pad))
    # H + 2*ph = kh + extra with extra >= 0 and H >= 1
    H = max(1, kh + draw(st.integers(0, max_extra)) - 2 * ph)
    W = max(1, kw + draw(st.integers(0, max_extra)) - 2 * pw)
    return dict(
        N=draw(st.integers(1, 2)),
        C=draw(st.integers(1, max_channels)),
        O=draw(st.integers(1, max_channels)),
        H=H, W=W, kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw),
        bias=draw(st.booleans()),
    )


@st.composite
def pool_configs(draw, max_kernel=4, max_stride=3, max_extra=5):
    """A valid pooling configuration: dict with N, C, H, W, kernel, stride."""
    kh = draw(st.integers(1, max_kernel))
    kw = draw(st.integers(1, max_kernel))
    sh = draw(st.integers(1, max_stride))
    sw = draw(st.integers(1, max_stride))
    return dict(
        N=draw(st.integers(1, 2)),
        C=draw(st.integers(1, 3)),
        H=kh + draw(st.integers(0, max_extra)),
        W=kw + draw(st.integers(0, max_extra)),
        kernel=(kh, kw), stride=(sh, sw),
    )


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
