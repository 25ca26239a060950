"""Simulator speed: the whole shared Azure 2023 conversation trace (19,366 requests) replayed at
the study's load (`STUDY_RATE_SCALE`) under each policy of the study, one round each.

    requests_per_wall_s = simulated requests / wall seconds of one `simulate` call
    steps_per_wall_s    = simulated engine steps / wall seconds
    wall_s              = time.perf_counter around the call (the workload is parsed once)

The issue's budget is 10 s of wall time per policy on this project's 2-core CI machine
(`within_budget` in each row's extra info).
"""

import time

import pytest

from kvbench.sim import SimConfig, read_trace, simulate, summarize
from kvbench.sim.run import STUDY_RATE_SCALE
from kvbench.sim.study import STUDY_POLICIES
from kvbench.sim.workloads import AZURE_CONV_TRACE

WALL_BUDGET_S = 10.0

pytestmark = pytest.mark.skipif(not AZURE_CONV_TRACE.exists(),
                                reason=f"{AZURE_CONV_TRACE} not present")


@pytest.fixture(scope="module")
def azure():
    return read_trace(AZURE_CONV_TRACE, rate_scale=STUDY_RATE_SCALE)


@pytest.mark.parametrize("policy", STUDY_POLICIES)
def test_replay_azure_trace(benchmark, azure, policy):
    config = SimConfig().with_policy(policy)
    wall_s = []

    def run():
        start = time.perf_counter()
        result = simulate(azure, config)
        wall_s.append(time.perf_counter() - start)
        return result

    benchmark.group = "simulate azure_llm_2023_conv"
    result = benchmark.pedantic(run, rounds=1, iterations=1)
    summary = summarize(result)
    assert summary["completed"] == azure.num_requests
    assert summary["max_kv_blocks_used"] <= summary["gpu_blocks"]
    benchmark.extra_info.update({
        "wall_s": wall_s[0],
        "requests_per_wall_s": azure.num_requests / wall_s[0],
        "steps_per_wall_s": summary["steps"] / wall_s[0],
        "simulated_s": summary["makespan_s"],
        "preemptions": summary["preemptions"],
        "recompute_fraction": summary["recompute_fraction"],
    })
    # The budget is reported, not asserted: `make bench-check` runs this once in CI on whatever
    # machine CI has, and a timing there is not a verdict (`make bench-compare` gates speed).
    benchmark.extra_info["within_budget"] = wall_s[0] < WALL_BUDGET_S
