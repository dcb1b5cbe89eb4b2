"""The one seam where gpucnn decides between the NumPy path and the CUDA kernels.

Every functional op that has a hand-written kernel asks :func:`use_kernels`
with its input arrays and takes the kernel path when it says yes.  By default
that is exactly "the arrays are CuPy arrays".  Tests patch this single
function (``monkeypatch.setattr(gpucnn.functional._dispatch, "use_kernels",
...)``) to route NumPy arrays through the unchanged kernels running on the
CPU emulator (tests/cudasim); nothing else in the package decides.
"""
from __future__ import annotations

from .. import backend


def use_kernels(*arrays) -> bool:
    """True when the op should launch gpucnn's CUDA kernels on ``arrays``: some are CuPy arrays
    and none is empty.  An empty one (a batch of 0 samples) takes the xp path, whose CuPy
    operations give the empty results a kernel would need a grid of no blocks for."""
    present = [a for a in arrays if a is not None]
    return any(backend.is_cupy(a) for a in present) and all(a.size for a in present)
