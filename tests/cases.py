"""The one table of convolution and pooling cases every test draws from (test-only helper).

Gradient checks, PyTorch parity, kernel parity on the emulator and on a GPU,
and the sanitizer runs all take their shapes from here.  ``big`` cases are
too slow for the CPU emulator (threaded blocks cost ~100 us per CUDA thread)
and for central differences; they run on the NumPy path and on a GPU.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest


class ConvCase(NamedTuple):
    N: int
    C: int
    H: int
    W: int
    O: int
    kernel: tuple
    stride: tuple
    padding: tuple
    bias: bool
    why: str
    big: bool = False

    @property
    def out_hw(self):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        return (self.H + 2 * ph - kh) // sh + 1, (self.W + 2 * pw - kw) // sw + 1

    @property
    def id(self):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        return (f"N{self.N}C{self.C}H{self.H}W{self.W}-O{self.O}k{kh}x{kw}s{sh}x{sw}p{ph}x{pw}"
                f"{'' if self.bias else '-nobias'}")

    def arrays(self, dtype, seed=0):
        """``(x, W, b or None, dy)`` drawn from N(0, 1)."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((self.N, self.C, self.H, self.W)).astype(dtype)
        W = rng.standard_normal((self.O, self.C) + tuple(self.kernel)).astype(dtype)
        b = rng.standard_normal(self.O).astype(dtype) if self.bias else None
        dy = rng.standard_normal((self.N, self.O) + self.out_hw).astype(dtype)
        return x, W, b, dy


def _c(N, C, H, W, O, k, s, p, bias, why, big=False):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return ConvCase(N, C, H, W, O, pair(k), pair(s), pair(p), bias, why, big)


CONV_CASES = [
    _c(1, 1, 5, 5, 1, 3, 1, 0, True, "batch 1, smallest"),
    _c(2, 3, 7, 9, 3, 3, 1, 1, True, "'same' conv, more than one block of outputs"),
    _c(2, 2, 8, 7, 3, (3, 2), (2, 1), (1, 0), True, "non-square kernel, mixed stride"),
    _c(1, 3, 9, 8, 2, (2, 3), (3, 2), (2, 1), False, "stride 3, padding 2, no bias"),
    _c(2, 2, 6, 6, 2, 1, 3, 0, True, "1x1 kernel, stride > kernel: gaps"),
    _c(2, 1, 5, 6, 2, (5, 4), (1, 2), 2, True, "kernel as big as the image"),
    _c(1, 2, 7, 7, 3, 4, (2, 3), (1, 2), False, "even kernel, odd strides"),
    _c(2, 2, 8, 8, 2, 3, 2, 1, True, "(H + 2p - k) % s == 1: a row no window reaches"),
    _c(1, 2, 8, 9, 2, 7, 2, 2, True, "7x7 kernel, stride 2, padding 2"),
    _c(1, 2, 3, 3, 2, 5, 1, 1, True, "kernel = padded input: 1x1 output"),
    _c(2, 1, 4, 2, 2, (6, 4), 2, 1, True, "kernel = padded input, non-square"),
    _c(1, 1, 1, 1, 1, 1, 1, 0, True, "everything 1"),
    _c(2, 1, 11, 10, 2, 4, 3, 0, True, "remainder along H only"),
    _c(1, 1, 9, 9, 1, 7, 1, 0, True, "7x7, stride 1"),
    _c(1, 2, 5, 5, 2, 1, 2, 1, False, "1x1 kernel on padding only at the border"),
    _c(1, 1, 3, 3, 2, 3, 3, 2, True, "padded 7 with stride 3: 2x2 out of mostly padding"),
    _c(2, 1, 7, 7, 2, 2, 2, 0, True, "2x2 kernel, stride 2, odd input"),
    _c(3, 2, 23, 21, 5, (5, 3), (1, 2), (2, 1), True, "long reduction (759 terms per weight)", big=True),
    _c(4, 1, 28, 28, 6, 5, 1, 2, True, "lenet5 conv1", big=True),
    _c(4, 6, 14, 14, 16, 5, 1, 0, True, "lenet5 conv2", big=True),
]


class PoolCase(NamedTuple):
    N: int
    C: int
    H: int
    W: int
    kernel: tuple
    stride: tuple
    why: str
    big: bool = False

    @property
    def out_hw(self):
        (kh, kw), (sh, sw) = self.kernel, self.stride
        return (self.H - kh) // sh + 1, (self.W - kw) // sw + 1

    @property
    def id(self):
        return (f"N{self.N}C{self.C}H{self.H}W{self.W}-k{self.kernel[0]}x{self.kernel[1]}"
                f"s{self.stride[0]}x{self.stride[1]}")


def _p(N, C, H, W, k, s, why, big=False):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return PoolCase(N, C, H, W, pair(k), pair(s), why, big)


POOL_CASES = [
    _p(1, 1, 4, 4, 2, 2, "batch 1, classic 2x2"),
    _p(1, 1, 7, 7, 2, 2, "2x2 on an odd input: the last row and column are dropped"),
    _p(2, 3, 7, 7, 3, 2, "overlapping windows"),
    _p(2, 2, 9, 8, (3, 2), (1, 2), "non-square, stride 1 rows: heavy overlap"),
    _p(1, 2, 9, 9, 2, 3, "stride > kernel: gaps get 0"),
    _p(2, 3, 8, 9, 3, (3, 2), "floor output size drops a border"),
    _p(2, 2, 5, 5, 5, 1, "one window per plane"),
    _p(1, 3, 9, 9, 1, 1, "identity pooling"),
    _p(1, 2, 6, 9, (2, 3), (2, 3), "non-square disjoint windows"),
    _p(4, 6, 28, 28, 2, 2, "lenet5 pool1", big=True),
]


def params(cases, *, big=True):
    """``pytest.param`` per case, with readable ids; ``big=False`` leaves the big ones out."""
    return [pytest.param(c, id=c.id) for c in cases if big or not c.big]
