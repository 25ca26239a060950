"""Timing: warm up, then repeat and keep every sample; median and spread are what we report.

GPU work is timed with CUDA events around each call (device time, no host sync in the loop);
CPU work with `time.perf_counter`. A point whose relative spread (IQR / median) is over
`max_rel_spread` is measured again with more repetitions, once, and keeps the tighter run.

While a list is set in `RECORDER` (`kvbench.calibration.schedule.recording`), `measure` takes a
first look only (warm-up and `FIRST_LOOK_REPS` samples) and appends the point to the list; the
scheduler then takes the point's samples interleaved with the other points'.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

FIRST_LOOK_REPS = 3
RECORDER: ContextVar[list | None] = ContextVar("kvbench_timing_recorder", default=None)


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
    if (recorder := RECORDER.get()) is not None:
        reps, max_rel_spread = min(reps, FIRST_LOOK_REPS), np.inf
    warm = sampler(fn, warmup)
    if budget_ms is not None and warm:
        reps = max(3, min(reps, int(budget_ms / max(min(warm), 1e-6))))
    timing = Timing(sampler(fn, reps))
    if timing.rel_spread > max_rel_spread:
        again = Timing(sampler(fn, 2 * reps))
        if again.rel_spread < timing.rel_spread:
            timing = again
    if recorder is not None:
        recorder.append((bound_now(fn), device, timing))
    return timing


def bound_now(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` with its free variables bound to their current values.

    The sweeps build their timed closures inside loops (`lambda: layer.prefill(x, ...)` reads
    `x` when called): called later, such a closure would see the loop's last values. A copy
    whose cells hold today's values behaves as the call `measure` just timed."""
    cells = getattr(fn, "__closure__", None)
    if not cells:
        return fn
    frozen = tuple(types.CellType(cell.cell_contents) if _filled(cell) else cell
                   for cell in cells)
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, frozen)


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True
