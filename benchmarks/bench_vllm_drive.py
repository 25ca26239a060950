"""Speed of the simulator against vLLM 0.32's own scheduler, both over the whole shared Azure 2023
conversation trace (19,366 requests) under the same settings, in one benchmark run (issue 10:
the simulator must be the faster). One round each.

    wall_s           = time.perf_counter around one `drive` or `Simulator.run` call (vLLM
                       imported, the trace parsed and the token ids drawn beforehand)
    steps_per_wall_s = steps / wall_s
    speedup          = vLLM's wall_s / the simulator's wall_s (extra_info of the simulator's row)

Settings: 1000 KV blocks of 16 tokens, 256 sequences / 8192 batched tokens, 20 ms steps, vLLM's
defaults otherwise (chunked prefill, prefix caching, async scheduling), and the same with both
of the latter off. Needs vLLM: .venv-vllm/bin/python -m pytest benchmarks/bench_vllm_drive.py
(skipped elsewhere, so `make bench-check` passes over it).
"""

import time

import pytest

pytest.importorskip("vllm")

from kvbench.sim.engines import ReplicaSpec  # noqa: E402
from kvbench.sim.steplog import first_difference  # noqa: E402
from kvbench.sim.tokens import random_token_ids  # noqa: E402
from kvbench.sim.workloads import AZURE_CONV_TRACE, read_trace  # noqa: E402
from kvbench.vllm.differential import sim_config, simulate_log  # noqa: E402
from kvbench.vllm.drive import drive  # noqa: E402

pytestmark = pytest.mark.vllm
SETTINGS = {"vllm-defaults": True, "sync-nocache": False}
WALL_S: dict[tuple[str, str], float] = {}
LOGS: dict[tuple[str, str], object] = {}


@pytest.fixture(scope="module")
def azure():
    workload = read_trace(AZURE_CONV_TRACE)
    return workload, random_token_ids(workload, seed=0)


def config_for(setting: str) -> ReplicaSpec:
    on = SETTINGS[setting]
    return ReplicaSpec(num_gpu_blocks=1000, max_num_seqs=256, max_num_batched_tokens=8192,
                       enable_prefix_caching=on, async_scheduling=on)


def timed(key, fn):
    def run():
        start = time.perf_counter()
        LOGS[key] = fn()
        WALL_S[key] = time.perf_counter() - start
        return LOGS[key]
    return run


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_drive_vllm_scheduler_azure_trace(benchmark, azure, setting):
    workload, tokens = azure
    benchmark.group = f"azure_llm_2023_conv {setting}"
    log = benchmark.pedantic(timed(("vllm", setting),
                                   lambda: drive(workload, config_for(setting), tokens=tokens)),
                             rounds=1, iterations=1)
    assert log.finished_request.size == workload.num_requests
    wall_s = WALL_S["vllm", setting]
    benchmark.extra_info.update({"wall_s": wall_s, "steps_per_wall_s": log.num_steps / wall_s,
                                 **log.summary()})


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_simulator_same_trace(benchmark, azure, setting):
    workload, tokens = azure
    benchmark.group = f"azure_llm_2023_conv {setting}"
    config = sim_config(config_for(setting), step_s=0.02)
    log = benchmark.pedantic(timed(("sim", setting),
                                   lambda: simulate_log(workload, config, tokens)),
                             rounds=1, iterations=1)
    wall_s = WALL_S["sim", setting]
    benchmark.extra_info.update({"wall_s": wall_s, "steps_per_wall_s": log.num_steps / wall_s,
                                 **log.summary()})
    if ("vllm", setting) in WALL_S:  # both ran in this session: same schedule, and the ratio
        assert first_difference(LOGS["vllm", setting], log) is None
        benchmark.extra_info["speedup"] = WALL_S["vllm", setting] / wall_s
        assert wall_s < WALL_S["vllm", setting]
