"""When each calibration point is measured: interleaved rounds in a shuffled order, within a time
budget, and a check that the machine is quiet before and after.

A sweep that measures size after size, in increasing order, turns any drift or interference
(another process starting, a frequency change, the page cache filling) into an error that grows
with the size: exactly what a fit reads as a coefficient. So inside `recording()` each sweep only
takes a first look at its points (`kvbench.calibration.timing`), and `interleave` then measures
all of a phase's points again, one call each per round, every round in a new random order:
interference lands on random sizes and averages out as noise instead of biasing the slope. The
rounds' samples replace the first look. While the budget lasts, the points whose relative spread
is still above `MAX_REL_SPREAD` get extra rounds of their own (at most doubling their samples).

`machine_check` times a fixed reference workload (on all threads and on one) and reads the load
average; the pipeline runs it before and after, and the profile records both (with the drift
between them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from kvbench.calibration.timing import RECORDER, Timing, measure, synchronize

Point = tuple[Callable[[], object], str, Timing]  # what `measure` registers: fn, device, timing
MIN_ROUNDS, MAX_ROUNDS = 3, 30
MAX_REL_SPREAD = 0.05  # IQR / median above which a point gets more samples
EXTRA_SHARE = 0.3  # of the budget kept for the extra rounds of noisy points
BUSY_LOAD_PER_CORE = 0.5  # load average per core from which the machine counts as busy
BUSY_REL_SPREAD = 0.10  # the reference workload's spread from which it counts as busy
MIN_SPEEDUP = 1.2  # all threads over one on the reference: below this the cores are taken


@contextmanager
def recording() -> Iterator[list[Point]]:
    """Collect the points every `measure` call inside registers (after a first look at each)."""
    points: list[Point] = []
    token = RECORDER.set(points)
    try:
        yield points
    finally:
        RECORDER.reset(token)


def _one_call_ms(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


@dataclass
class ScheduleReport:
    """What `interleave` did for one phase."""

    points: int
    rounds: int
    extra_samples: int  # taken for points whose spread stayed high
    seconds: float
    max_rel_spread: float  # the worst point's IQR / median at the end

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def interleave(points: list[Point], budget_s: float, seed: int = 0) -> ScheduleReport:
    """Measure every point again in shuffled rounds (one call per point per round) and make the
    rounds' samples each point's samples.

    Rounds: as many as fit in `EXTRA_SHARE`-less `budget_s` by the first look's fastest samples,
    within [MIN_ROUNDS, MAX_ROUNDS]. Then, while time is left, extra rounds over the points whose
    relative spread is still above `MAX_REL_SPREAD`, each at most doubling its samples (each
    sweep's function rotates through its own buffers and weights: every call stays cold).
    """
    start = time.perf_counter()
    if not points:
        return ScheduleReport(0, 0, 0, 0.0, 0.0)
    rng = np.random.default_rng(seed)
    round_ms = sum(min(timing.samples_ms) for _, _, timing in points)
    rounds = int(np.clip((1 - EXTRA_SHARE) * budget_s * 1e3 / max(round_ms, 1e-6), MIN_ROUNDS,
                         MAX_ROUNDS))
    samples: list[list[float]] = [[] for _ in points]

    def one_round(indices: list[int]) -> None:
        for i in rng.permutation(indices).tolist():
            fn, device, _ = points[i]
            samples[i].append(_one_call_ms(fn, device))

    for _ in range(rounds):
        one_round(list(range(len(points))))
    extra = 0
    while time.perf_counter() - start < budget_s:
        noisy = [i for i, s in enumerate(samples)
                 if Timing(s).rel_spread > MAX_REL_SPREAD and len(s) < 2 * rounds]
        if not noisy:
            break
        one_round(noisy)
        extra += len(noisy)
    for (_, _, timing), taken in zip(points, samples):
        timing.samples_ms[:] = taken
    return ScheduleReport(len(points), rounds, extra, time.perf_counter() - start,
                          max(Timing(s).rel_spread for s in samples))


def machine_check(device: str) -> dict:
    """A fixed reference workload on `device` (a 768² float32 matrix product) timed 15 times:
    median ms and relative spread, with the 1-minute load average and core count. On a CPU with
    several torch threads it is timed on one thread too: `parallel_speedup` (one thread's time
    over all threads') falls below 1 when other processes hold the cores, and then every parallel
    region of a calibration waits for a descheduled thread (measured here: a decoder layer 4x
    slower on two threads than on one, beside two busy processes on two cores)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(768, 768, generator=gen).to(device)
    timing = measure(lambda: a @ a, device, warmup=3, reps=15, max_rel_spread=np.inf)
    synchronize(device)
    threads, speedup = torch.get_num_threads(), None
    if device == "cpu" and threads > 1:
        torch.set_num_threads(1)
        try:
            one = measure(lambda: a @ a, device, warmup=3, reps=15, max_rel_spread=np.inf)
        finally:
            torch.set_num_threads(threads)
        speedup = one.median_ms / timing.median_ms
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"reference_ms": timing.median_ms, "rel_spread": timing.rel_spread,
            "threads": threads, "parallel_speedup": speedup, "load_1m": load,
            "cpu_count": os.cpu_count()}


def busy_reason(check: dict) -> str | None:
    """Why a `machine_check` says the machine was not quiet, or None."""
    reasons = []
    if check["load_1m"] is not None and check["load_1m"] > BUSY_LOAD_PER_CORE * check["cpu_count"]:
        reasons.append(f"load {check['load_1m']:.1f} on {check['cpu_count']} cores")
    if check["rel_spread"] > BUSY_REL_SPREAD:
        reasons.append(f"reference workload spread {100 * check['rel_spread']:.0f}%")
    if check.get("parallel_speedup") is not None and check["parallel_speedup"] < MIN_SPEEDUP:
        reasons.append(f"{check['threads']} threads ran it only {check['parallel_speedup']:.1f}x "
                       "as fast as one: other processes hold the cores")
    return ", ".join(reasons) or None
