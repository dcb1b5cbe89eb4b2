"""hypothesis settings and shape strategies for the property-based tests.

Imported as ``from strategies import ...`` by modules that first call
``pytest.importorskip("hypothesis")``: on a box without hypothesis (the bare
GPU box of tests/gpu/run_on_device.sh) those modules are skipped with the
reason instead of stopping the whole collection.
"""
from __future__ import annotations

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
