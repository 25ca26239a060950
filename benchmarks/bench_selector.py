"""Selector throughput: vectorized `select_preemption_strategy` against a per-request Python loop.

Each group (1k, 1M requests) times the library and the plain loop on the same token counts;
the vectorized result is checked against the loop's before anything is timed.

    .venv/bin/python -m pytest benchmarks/bench_selector.py            # time
    .venv/bin/python -m pytest benchmarks/bench_selector.py --benchmark-disable -q   # check only
"""

import numpy as np
import pytest

from kvbench.reference import select_preemption_strategy_ref as select_loop
from kvbench.selector import select_preemption_strategy

# Realistic magnitudes (swap per token as for llama-3-8b over PCIe 5) with a recompute cheap
# enough that the crossover lands near 7,700 tokens, so both strategies occur among counts drawn
# from 0..32767.
CONFIG = {"swap_fixed_ms": 0.02, "swap_ms_per_token": 0.0048, "swap_ms_per_block": 0.001,
          "block_size": 16, "recompute_fixed_ms": 0.05, "recompute_ms_per_token": 0.0008,
          "recompute_ms_per_token_sq": 5.3e-7}
SIZES = {"1k": 1_000, "1M": 1_000_000}


def token_counts(size: str) -> list[int]:
    return np.random.default_rng(0).integers(0, 32768, SIZES[size]).tolist()


@pytest.fixture(scope="module", params=list(SIZES))
def case(request):
    """Token counts, the loop's answer, and a check that the library agrees with it."""
    counts = token_counts(request.param)
    expected = select_loop(counts, CONFIG)
    got = select_preemption_strategy(counts, CONFIG)
    assert got["strategies"] == expected["strategies"]
    assert {"swap", "recompute"} <= set(got["strategies"])
    # Same costs; 4-decimal rounding of a value right at a half may differ by one unit.
    for key in ("swap_costs_ms", "recompute_costs_ms"):
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1.01e-4)
    # Summation order differs (pairwise vs sequential): equal to ~1e-12 relative.
    assert got["total_cost_ms"] == pytest.approx(expected["total_cost_ms"], rel=1e-9, abs=1e-4)
    return request.param, counts, got


def test_vectorized(benchmark, case):
    size, counts, expected = case
    benchmark.group = f"selector-{size}"
    benchmark.extra_info["num_requests"] = len(counts)
    result = benchmark(select_preemption_strategy, counts, CONFIG)
    assert result == expected


def test_loop_baseline(benchmark, case):
    size, counts, expected = case
    benchmark.group = f"selector-{size}"
    benchmark.extra_info["num_requests"] = len(counts)
    if size == "1M":  # seconds per call: one round is enough
        result = benchmark.pedantic(select_loop, args=(counts, CONFIG), rounds=1, iterations=1)
    else:
        result = benchmark(select_loop, counts, CONFIG)
    assert result["strategies"] == expected["strategies"]
