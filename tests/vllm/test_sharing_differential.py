"""The simulator equals vLLM 0.32's scheduler step by step on a workload whose requests share
prefixes: Mooncake's synthetic trace (bundled; token ids from its hash ids), prefix caching and
async scheduling on, at cache sizes from one that preempts often to one that never does.
Prefix-cache hits are part of the comparison (each admission's hit), so cross-request sharing
must come out the same; switching prefix caching off in the simulator alone must part the logs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("vllm")

from kvbench.sim.engines import ReplicaSpec  # noqa: E402
from kvbench.sim.workloads import MOONCAKE_SYNTHETIC_TRACE, read_trace  # noqa: E402
from kvbench.vllm.differential import compare  # noqa: E402

pytestmark = pytest.mark.vllm

# Requests 3600-3899 of the trace: late in its conversations, where most prompt blocks repeat
# an earlier request's (about 60% of them, by hash ids, within these 300). Its requests generate
# few tokens (48 on average): preemptions are rare, and only the faster replay has any.
FIRST, NUM_REQUESTS = 3600, 300
MAX_TOKENS = 40_000  # prompt + output; longer requests are left out (a cache must hold one)
RATE_SCALE = 4.0  # the trace 4x faster: decodes then outgrow the smaller caches
CACHE_BLOCKS = {"4000-blocks": 4000, "8000-blocks-preempts": 8000, "30000-blocks": 30000}


@pytest.fixture(scope="module")
def mooncake():
    workload = read_trace(MOONCAKE_SYNTHETIC_TRACE, RATE_SCALE, FIRST + NUM_REQUESTS)
    index = np.arange(workload.num_requests)
    workload = workload.subset((index >= FIRST)
                               & (workload.prompt_tokens + workload.output_tokens <= MAX_TOKENS))
    workload = dataclasses.replace(workload, arrival_s=workload.arrival_s - workload.arrival_s[0])
    # Sharing is there to be found: prompts whose first 512 tokens another prompt has too.
    tokens = workload.tokens
    firsts = {tuple(tokens.prompt(i)[:512]) for i in range(workload.num_requests)}
    assert len(firsts) < workload.num_requests * 0.8
    return workload


@pytest.fixture(scope="module")
def runs(mooncake):
    cache = {}

    def run(name: str):
        if name not in cache:
            replica = ReplicaSpec(num_gpu_blocks=CACHE_BLOCKS[name], max_num_seqs=256,
                                  max_num_batched_tokens=8192)
            cache[name] = (replica, *compare(mooncake, replica))
        return cache[name]

    return run


@pytest.mark.parametrize("name", list(CACHE_BLOCKS))
def test_simulator_matches_vllm_with_shared_prefixes(runs, name):
    replica, reference, ours, difference = runs(name)
    assert replica.enable_prefix_caching and replica.async_scheduling
    assert difference is None, difference
    assert reference.prefix_hit_tokens > 0
    if name == "8000-blocks-preempts":
        assert reference.num_preemptions > 0
    if name == "30000-blocks":  # nothing preempted: every hit is another request's blocks
        assert reference.num_preemptions == 0


def test_prefix_caching_off_in_the_simulator_alone_parts_the_logs(runs, mooncake):
    replica, reference, _, _ = runs("4000-blocks")
    _, _, difference = compare(mooncake, replica, vllm_log=reference,
                               enable_prefix_caching=False)
    assert difference is not None


# ---------------------------------------------------------------------------------------------
# kvbench's policies see sharing alike in vLLM (the plugin reads vLLM's block reference counts)
# and in the simulator: conversations with a shared system prompt, a cache that preempts.

SHARED_MIX = ("multi-turn:sessions=40,turns=3,rate=4,think-s=1,system-prompt-tokens=512,"
              "input-tokens=256,output-tokens=200,max-tokens=300")
POLICIES = [("fcfs", "lcf"), ("fcfs", "cost-aware"), ("future-kv", "lifo")]


@pytest.fixture(scope="module")
def conversations():
    from kvbench.sim.workloads import load_workload

    return load_workload(None, SHARED_MIX, seed=0)


def policy_logs(workload, admission, victim, monkeypatch, blind_simulator=False):
    from kvbench.models import from_hf_config
    from kvbench.sim.config import Costs
    from kvbench.sim.engine import Simulator
    from kvbench.sim.kv_cache import KVCacheManager
    from kvbench.sim.policies import PolicySpec
    from kvbench.vllm.differential import same_requests, sim_config
    from kvbench.vllm.drive import PLUGIN_SCHEDULER, TINY_MODEL, drive

    replica = ReplicaSpec(num_gpu_blocks=300, max_num_seqs=64, max_num_batched_tokens=2048,
                          async_scheduling=False)
    for key, value in (("ADMISSION", admission), ("VICTIM", victim), ("PREDICTOR", "oracle")):
        monkeypatch.setenv(f"KVBENCH_{key}", value)
    theirs = drive(workload, replica, scheduler_cls=PLUGIN_SCHEDULER)
    costs = Costs.analytic(from_hf_config(TINY_MODEL / "config.json"), "h100-sxm",
                           replica.block_size)
    config = dataclasses.replace(sim_config(replica, step_s=0.02),
                                 policy=PolicySpec(admission, victim, "recompute", "oracle"))
    if blind_simulator:  # the simulator's policies no longer see what is shared
        monkeypatch.setattr(KVCacheManager, "shared_blocks",
                            lambda self, ids: np.zeros(ids.size, dtype=np.int64))
    ours = Simulator(same_requests(workload), config, costs, record=True).run().step_log
    return theirs, ours


@pytest.mark.parametrize(("admission", "victim"), POLICIES)
def test_policies_see_sharing_alike_in_vllm_and_the_simulator(conversations, monkeypatch,
                                                               admission, victim):
    from kvbench.sim.steplog import first_difference

    theirs, ours = policy_logs(conversations, admission, victim, monkeypatch)
    assert theirs.prefix_hit_tokens > 0
    assert first_difference(theirs, ours) is None
    if admission == "fcfs":
        assert theirs.num_preemptions > 0
        blind = policy_logs(conversations, admission, victim, monkeypatch,
                            blind_simulator=True)[1]
        assert first_difference(theirs, blind) is not None
