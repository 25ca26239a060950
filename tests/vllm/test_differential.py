"""The simulator's vLLM baseline is vLLM: step-by-step equality with vLLM 0.32's own scheduler.

For each setting (built from the shared Azure 2023 conversation trace) vLLM's scheduler
(`kvbench.vllm.drive`) and the simulator (`--engine vllm-0.32`, the same token ids, a constant
20 ms step) must agree on every step's batch (requests, order, tokens), every preemption
(step, request, order), every finish and every prefix-cache hit. Then each rule is switched off
in the simulator alone, and the logs must part: a rule the comparison cannot see is not tested.
Marker `vllm`: `make test-vllm` runs these in .venv-vllm; the whole-trace run is also `slow`.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvbench.sim.engines import ReplicaSpec  # noqa: E402
from kvbench.sim.tokens import random_token_ids  # noqa: E402
from kvbench.sim.workloads import AZURE_CONV_TRACE, load_workload  # noqa: E402
from kvbench.vllm.differential import compare  # noqa: E402

pytestmark = pytest.mark.vllm

SLICE = 1000  # requests from the start of the trace

def replica(num_gpu_blocks: int, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
            **settings) -> ReplicaSpec:
    return ReplicaSpec(num_gpu_blocks=num_gpu_blocks, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, **settings)


SETTINGS = {
    # name: (requests, rate scale, vLLM settings)
    "1000-blocks-256/8192": (2000, 1.0, replica(1000)),
    "2000-blocks-256/8192-sync": (SLICE, 1.0, replica(2000, async_scheduling=False)),
    "1000-blocks-no-prefix-cache": (SLICE, 1.0, replica(1000, enable_prefix_caching=False)),
    "1500-blocks-64/2048-sync-no-cache": (SLICE, 1.0, replica(
        1500, 64, 2048, enable_prefix_caching=False, async_scheduling=False)),
    "1000-blocks-2x-rate": (SLICE, 2.0, replica(1000)),
    # vLLM rejects prompts of max_model_len tokens or more before scheduling: left out here.
    "watermark-max-model-len": (SLICE, 1.0, replica(600, 128, 2048, watermark=0.02,
                                                    max_model_len=2048)),
}
# Each rule switched off (or changed) in the simulator only, on the setting where it acts.
MUTATIONS = {
    # With an 8192-token budget nearly every prompt is admitted whole: the rule acts when the
    # first chunk is smaller than the prompt.
    "full_prompt_admission": ("1500-blocks-64/2048-sync-no-cache",
                              {"scheduler_reserve_full_isl": False}),
    "prefix_caching": ("1000-blocks-256/8192", {"enable_prefix_caching": False}),
    "async_scheduling": ("1000-blocks-256/8192", {"async_scheduling": False}),
    "null_block": ("1000-blocks-256/8192", {"null_block": False}),
    "watermark": ("watermark-max-model-len", {"watermark": 0.0}),
    "max_model_len": ("watermark-max-model-len", {"max_model_len": None}),
}


@pytest.fixture(scope="module")
def runs():
    """vLLM's log per setting, computed once (the mutations reuse it)."""
    cache = {}

    def run(name: str):
        if name not in cache:
            num_requests, rate_scale, config = SETTINGS[name]
            workload = load_workload(AZURE_CONV_TRACE, None, rate_scale, num_requests)
            if config.max_model_len is not None:
                workload = workload.subset(workload.prompt_tokens < config.max_model_len)
            tokens = random_token_ids(workload, seed=0)
            reference, ours, difference = compare(workload, config, tokens)
            cache[name] = (workload, config, tokens, reference, ours, difference)
        return cache[name]

    return run


@pytest.mark.parametrize("name", list(SETTINGS))
def test_simulator_matches_vllm_step_by_step(runs, name):
    _, _, _, reference, ours, difference = runs(name)
    assert difference is None, difference
    assert reference.num_preemptions > 0  # a setting without preemption proves little
    assert ours.summary() | {"engine": ""} == reference.summary() | {"engine": ""}


def test_settings_exercise_each_rule(runs):
    """Prefix-cache hits happen where caching is on, none where it is off."""
    assert runs("1000-blocks-256/8192")[3].prefix_hit_tokens > 0
    assert runs("1000-blocks-no-prefix-cache")[3].prefix_hit_tokens == 0


@pytest.mark.parametrize("rule", list(MUTATIONS))
def test_switching_a_rule_off_breaks_the_match(runs, rule):
    setting, mutation = MUTATIONS[rule]
    workload, config, tokens, reference, _, _ = runs(setting)
    _, _, difference = compare(workload, config, tokens, vllm_log=reference, **mutation)
    assert difference is not None, f"{rule} off: the logs still agree"


@pytest.mark.slow
def test_whole_azure_trace_matches_vllm():
    workload = load_workload(AZURE_CONV_TRACE, None, 1.0, None)
    assert workload.num_requests == 19366
    config = replica(1500, 64, 2048)
    reference, _, difference = compare(workload, config)
    assert difference is None, difference
    assert reference.num_preemptions > 0
