"""Swap on preemption, simulator against vLLM: vLLM 0.32's scheduler under the kvbench scheduler
with kvbench's swap connector on its scheduler side (the worker faked: every copy made, in the
time the plugin's costs give it) must agree with the simulator step by step, on the batches,
the preemptions, every victim's swap-or-recompute decision, the prefix-cache hits and the
tokens each resumed victim loads back.

The settings cover the connector's rules: the selector's per-victim choice (a100 costs for the
tiny model swap victims up to about 200 tokens and recompute longer ones), a host pool too small
for every victim (fallback to recompute), prefix caching (a resumed victim loads only what the
device's cache no longer holds). Scheduling is synchronous, as on vLLM's CPU platform: with
async scheduling vLLM defers the frees of a consuming connector's requests, which the simulator
does not model. Then each rule is switched off in the simulator alone and the logs must part.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("vllm")

from kvbench.sim.engines import ReplicaSpec  # noqa: E402
from kvbench.sim.tokens import random_token_ids  # noqa: E402
from kvbench.sim.workloads import AZURE_CONV_TRACE, load_workload  # noqa: E402
from kvbench.vllm.differential import compare  # noqa: E402

pytestmark = pytest.mark.vllm

REQUESTS = 600
BASE = ReplicaSpec(num_gpu_blocks=400, max_num_seqs=128, max_num_batched_tokens=2048,
                   async_scheduling=False)
SETTINGS = {
    # name: (plugin options, replica)
    "selector-prefix-cache": ({"preemption": "selector", "hardware": "a100-80gb"},
                              dataclasses.replace(BASE, num_cpu_blocks=4000)),
    "swap-small-host-pool": ({"preemption": "swap"},
                             dataclasses.replace(BASE, num_cpu_blocks=60)),
    "selector-no-prefix-cache": ({"preemption": "selector", "hardware": "a100-80gb"},
                                 dataclasses.replace(BASE, num_cpu_blocks=300,
                                                     enable_prefix_caching=False)),
}
# A rule of the connector switched off in the simulator only, where it acts.
MUTATIONS = {
    "host_pool_capacity": ("swap-small-host-pool", {"num_cpu_blocks": 100_000}),
}


@pytest.fixture(scope="module")
def workload():
    return load_workload(AZURE_CONV_TRACE, num_requests=REQUESTS)


@pytest.fixture(scope="module")
def runs(workload):
    tokens = random_token_ids(workload, seed=0)
    return {name: compare(workload, replica, tokens, plugin=plugin)
            for name, (plugin, replica) in SETTINGS.items()}


@pytest.mark.parametrize("name", SETTINGS)
def test_simulator_matches_vllm_with_the_swap_connector(runs, name):
    reference, ours, difference = runs[name]
    assert difference is None, difference


def test_settings_exercise_each_rule(runs):
    for name, (reference, _, _) in runs.items():
        assert reference.swapped_request.size > 0, name
        assert reference.loaded_tokens.sum() > 0, name
    # Some victims swapped, some recomputed (by price, or for want of host room).
    for name in ("selector-prefix-cache", "swap-small-host-pool"):
        reference = runs[name][0]
        assert 0 < reference.swapped_request.size < reference.num_preemptions, name
    # Resumed victims found some of their blocks still cached on the device.
    reference = runs["selector-prefix-cache"][0]
    resumed = np.intersect1d(reference.loaded_request, reference.cached_request)
    assert resumed.size > 0


@pytest.mark.parametrize("rule", MUTATIONS)
def test_switching_a_rule_off_breaks_the_match(workload, runs, rule):
    name, mutation = MUTATIONS[rule]
    plugin, replica = SETTINGS[name]
    _, _, difference = compare(workload, replica, random_token_ids(workload, seed=0),
                               vllm_log=runs[name][0], plugin=plugin, **mutation)
    assert difference is not None
