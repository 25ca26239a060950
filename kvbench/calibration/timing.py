"""Timing: warm up, then repeat and keep every sample; median and spread are what we report.

GPU work is timed with CUDA events around each call (device time, no host sync in the loop);
CPU work with `time.perf_counter`. A point whose relative spread (IQR / median) is over
`max_rel_spread` is measured again with more repetitions, once, and keeps the tighter run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Timing:
    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    @property
    def spread_ms(self) -> float:
        """Interquartile range of the samples."""
        q75, q25 = np.percentile(self.samples_ms, [75, 25])
        return float(q75 - q25)

    @property
    def rel_spread(self) -> float:
        return self.spread_ms / self.median_ms if self.median_ms > 0 else 0.0


def synchronize(device: str) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _cpu_samples(fn: Callable[[], object], reps: int) -> list[float]:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _cuda_samples(fn: Callable[[], object], reps: int) -> list[float]:
    """CUDA events around each call. Not yet run on a GPU in this repository's CI."""
    import torch

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def measure(fn: Callable[[], object], device: str, *, warmup: int = 2, reps: int = 5,
            max_rel_spread: float = 0.1, budget_ms: float | None = None) -> Timing:
    """Median-of-reps timing of `fn` on `device` ('cpu' or 'cuda').

    `budget_ms` caps the repetitions for slow points: after warm-up, reps is lowered so that
    the run takes about that long (never below 3).
    """
    sampler = _cuda_samples if device == "cuda" else _cpu_samples
    warm = sampler(fn, warmup)
    if budget_ms is not None and warm:
        reps = max(3, min(reps, int(budget_ms / max(min(warm), 1e-6))))
    timing = Timing(sampler(fn, reps))
    if timing.rel_spread > max_rel_spread:
        again = Timing(sampler(fn, 2 * reps))
        if again.rel_spread < timing.rel_spread:
            timing = again
    return timing
