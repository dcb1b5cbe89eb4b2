"""Which examples each training step sees: the per-epoch order and its minibatches.

The order of epoch ``e`` (0-based) is ``numpy.random.default_rng([seed, e])
.permutation(n)``: it depends on nothing but the seed and the epoch, so a
resumed run, a benchmark and a distributed run all see the same batches.
Step ``s`` takes ``order[s * B:(s + 1) * B]`` (the last batch may be
smaller); with several processes each rank takes its contiguous share of that
global batch (:func:`shard_bounds`: the first ``B % world`` ranks get one more).
"""
from __future__ import annotations

import numpy as np

__all__ = ["SHUFFLE_SCHEME", "epoch_permutation", "shuffle_generator", "steps_per_epoch",
           "batch_indices", "batch_start", "shard_bounds"]

#: How the order is drawn, recorded in checkpoints.
SHUFFLE_SCHEME = "numpy.random.default_rng([seed, epoch])"


def _nonneg_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {name}={value!r}")
    return int(value)


def shuffle_generator(seed: int, epoch: int) -> np.random.Generator:
    """The generator epoch ``epoch``'s order is drawn from."""
    return np.random.default_rng([_nonneg_int(seed, "seed"), _nonneg_int(epoch, "epoch")])


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """``int64`` permutation of ``range(n)`` for epoch ``epoch`` (0-based)."""
    return shuffle_generator(seed, epoch).permutation(_nonneg_int(n, "n")).astype(np.int64)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """``ceil(n / batch_size)``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got batch_size={batch_size!r}")
    return -(-_nonneg_int(n, "n") // int(batch_size))


def shard_bounds(count: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``count`` items over ``world`` ranks."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got rank={rank!r}")
    base, extra = divmod(int(count), int(world))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def batch_indices(order, step: int, batch_size: int, rank: int = 0, world: int = 1):
    """This rank's indices of global batch ``step`` of ``order`` (a view when world is 1)."""
    batch = order[step * batch_size:(step + 1) * batch_size]
    if world == 1:
        return batch
    start, stop = shard_bounds(batch.shape[0], rank, world)
    return batch[start:stop]


def batch_start(n: int, step: int, batch_size: int, rank: int = 0, world: int = 1) -> int:
    """The position in an epoch's order of ``n`` examples of the first index
    :func:`batch_indices` gives this rank for ``step`` (what keys its augmentation draws)."""
    first = step * batch_size
    return first + shard_bounds(max(0, min(batch_size, n - first)), rank, world)[0]
