"""Inverted dropout; the maths is in :mod:`gpucnn.functional.dropout`."""
from __future__ import annotations

from .._utils import check_array
from ..functional import dropout as F
from .base import Layer, builtin_pass

__all__ = ["Dropout"]


class Dropout(Layer):
    """Inverted dropout: while training each element is zeroed with probability ``p`` and the rest
    scaled by ``1 / (1 - p)``; the identity in eval mode.

    The masks come from gpucnn's counter stream (:func:`gpucnn.random.uniform`):
    fixed by ``gpucnn.seed``, the same on NumPy and CuPy, saved in checkpoints
    and continued exactly on resume.  Keeps the scale mask.
    """

    def __init__(self, p=0.5):
        super().__init__()
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1):
            raise ValueError(f"p must be in [0, 1), got p={p!r}")
        self.p = float(p)
        self._scale = None

    def extra_repr(self):
        return f"p={self.p}"

    @builtin_pass
    def forward(self, x, mask=None):
        """Apply dropout to a public ``x``; ``mask`` (0/1, the shape of x) replaces the random draw
        (for tests)."""
        return self._forward_fixing(x, mask, "mask")

    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        check_array(x, "x", None, "Dropout", internal=True)
        y, self._scale = F.dropout_forward(x, self.p, self.training, self._fixed)
        return self._expect(y)

    def _backward(self, dy, input_grad=True):
        self._check_dy(dy)
        return F.dropout_backward(dy, self._scale)
