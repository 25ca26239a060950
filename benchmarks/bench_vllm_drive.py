"""Speed of vLLM 0.32's own scheduler driven over the whole shared Azure 2023 conversation trace
(19,366 requests): the reference the simulator has to beat (issue 10). One round.

    wall_s           = time.perf_counter around one `drive` call (vLLM imported, the trace
                       parsed and the token ids drawn beforehand)
    steps_per_wall_s = logged steps / wall_s

Settings: 1000 KV blocks of 16 tokens, 256 sequences / 8192 batched tokens, 20 ms steps, vLLM's
defaults otherwise (chunked prefill, prefix caching, async scheduling), and the same with both
of the latter off. Needs vLLM: .venv-vllm/bin/python -m pytest benchmarks/bench_vllm_drive.py
(skipped elsewhere, so `make bench-check` passes over it).
"""

import time

import pytest

pytest.importorskip("vllm")

from kvbench.sim.tokens import random_token_ids  # noqa: E402
from kvbench.sim.workloads import AZURE_CONV_TRACE, read_trace  # noqa: E402
from kvbench.vllm.drive import DriveConfig, drive  # noqa: E402

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not AZURE_CONV_TRACE.exists(),
                                 reason=f"{AZURE_CONV_TRACE} not present")]


@pytest.fixture(scope="module")
def azure():
    workload = read_trace(AZURE_CONV_TRACE)
    return workload, random_token_ids(workload, seed=0)


@pytest.mark.parametrize("caching_and_async", [True, False], ids=["vllm-defaults", "sync-nocache"])
def test_drive_vllm_scheduler_azure_trace(benchmark, azure, caching_and_async):
    workload, tokens = azure
    config = DriveConfig(num_gpu_blocks=1000, max_num_seqs=256, max_num_batched_tokens=8192,
                         enable_prefix_caching=caching_and_async,
                         async_scheduling=caching_and_async, step_s=0.02)
    wall_s = []

    def run():
        start = time.perf_counter()
        log = drive(workload, config, tokens=tokens)
        wall_s.append(time.perf_counter() - start)
        return log

    benchmark.group = "vllm scheduler azure_llm_2023_conv"
    log = benchmark.pedantic(run, rounds=1, iterations=1)
    assert log.finished_request.size == workload.num_requests
    benchmark.extra_info.update({"wall_s": wall_s[0], "steps": log.num_steps,
                                 "steps_per_wall_s": log.num_steps / wall_s[0],
                                 **log.summary()})
