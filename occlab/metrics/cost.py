"""Training cost (DESIGN.md §4): seconds per iteration (synchronised, median after warm-up) and peak memory."""
from __future__ import annotations

import math
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class CostMeter:
    """Per-iteration wall time (CUDA-synchronised on a CUDA device) and peak memory of one training run."""

    def __init__(self, device: str | torch.device = "cpu", warmup: int = 5,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.device = torch.device(device)
        self.warmup = warmup
        self.clock = clock
        self.times: list[float] = []
        self._last: float | None = None

    def _now(self) -> float:
        """The clock, after waiting for queued CUDA work on this meter's device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.clock()

    @contextmanager
    def step(self) -> Iterator[None]:
        """Time the body as one iteration."""
        start = self._now()
        yield
        self.times.append(self._now() - start)

    def tick(self) -> float | None:
        """Mark an iteration boundary; records and returns the time since the previous tick (None the first time)."""
        now = self._now()
        last, self._last = self._last, now
        if last is None:
            return None
        self.times.append(now - last)
        return self.times[-1]

    def median(self) -> float:
        """Median seconds per iteration after the first `warmup` iterations (NaN with a warning if none)."""
        timed = self.times[self.warmup:]
        if not timed:
            warnings.warn(f"CostMeter: {len(self.times)} iterations recorded, none after the {self.warmup} "
                          f"warm-up iterations; median is NaN", RuntimeWarning, stacklevel=2)
            return math.nan
        return statistics.median(timed)

    def peak_memory_gib(self, device: str | torch.device | None = None) -> float:
        """Peak allocated GPU memory (CUDA) or the process's peak RSS (CPU; not resettable), in GiB."""
        device = self.device if device is None else torch.device(device)
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**30
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / (2**30 if sys.platform == "darwin" else 2**20)

    def reset_peak(self, device: str | torch.device | None = None) -> None:
        """Reset the CUDA peak-memory counter; on CPU a no-op (the process peak RSS cannot be reset)."""
        device = self.device if device is None else torch.device(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def reset(self) -> None:
        """Forget the recorded iterations."""
        self.times.clear()
        self._last = None
