"""Shared benchmark fixtures. Run `pytest benchmarks/` (TRITON_INTERPRET=1 adds the tiny CPU
Triton rows; `--benchmark-disable` runs every case once as a quick check, as CI does).

Every benchmark checks its op against `kvbench.reference` before timing it.
"""

import pytest
import torch

from kvbench.calibration.timing import synchronize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def timed(benchmark):
    """timed(fn, rounds) -> median seconds of `rounds` calls after one warm-up (None when
    benchmarks are disabled). On CUDA each call ends with torch.cuda.synchronize, so a round
    is the op's wall time including its device work."""

    def run(fn, rounds: int):
        def call():
            fn()
            synchronize(DEVICE)

        benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
        return benchmark.stats.stats.median if benchmark.stats else None

    return run
