"""Timing, for `gpucnn bench` and the stage times of a watched run: medians of repeated runs after a
warm-up (CPU clock, or CUDA events on a GPU)."""
from __future__ import annotations

import statistics
import time

from . import backend

__all__ = ["Timer", "TorchTimer"]


class Timer:
    """Median wall time of ``fn`` (CPU clock, or CUDA events on a GPU)."""

    def __init__(self, device: str, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn) -> float:
        """Seconds per call, median of ``repeats`` after ``warmup`` calls."""
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device == "cuda":
            cp = backend.cupy
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            cp.cuda.Device().synchronize()
            for _ in range(self.repeats):
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
        else:
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


class TorchTimer(Timer):
    def __call__(self, fn) -> float:
        if self.device != "cuda":
            return super().__call__(fn)
        import torch

        for _ in range(self.warmup):
            fn()
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(self.repeats):
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        return statistics.median(times)
