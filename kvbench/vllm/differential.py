"""The differential test's two sides: vLLM's own scheduler (`kvbench.vllm.drive`) and the
simulator under the same settings, with the same token ids and the same constant step time, and
where their step logs first part (`kvbench.sim.steplog.first_difference`).
"""

from __future__ import annotations

import dataclasses

from kvbench.sim.config import SimConfig
from kvbench.sim.engine import Simulator
from kvbench.sim.steplog import StepLog, first_difference
from kvbench.sim.tokens import TokenIds, random_token_ids
from kvbench.sim.workloads import Workload
from kvbench.vllm.drive import DriveConfig, drive


def sim_config(config: DriveConfig, **overrides) -> SimConfig:
    """The simulator configured as `config` configures vLLM (overrides: to mutate a rule)."""
    return dataclasses.replace(SimConfig(
        engine="vllm-0.32", gpu_blocks=config.num_gpu_blocks, block_size=config.block_size,
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        chunked_prefill=config.enable_chunked_prefill,
        prefix_caching=config.enable_prefix_caching, async_scheduling=config.async_scheduling,
        full_prompt_admission=config.scheduler_reserve_full_isl, watermark=config.watermark,
        max_model_len=config.max_model_len, step_time=f"constant:{config.step_s * 1e3:g}ms"),
        **overrides)


def same_requests(workload: Workload) -> Workload:
    """The workload as the driver replays it: each request's max_tokens is its output length
    (vLLM is told `max_tokens = output_tokens`, `ignore_eos`)."""
    return dataclasses.replace(workload, max_tokens=workload.output_tokens.copy())


def simulate_log(workload: Workload, config: SimConfig, tokens: TokenIds) -> StepLog:
    return Simulator(same_requests(workload), config, tokens=tokens, record=True).run().step_log


def compare(workload: Workload, config: DriveConfig, tokens: TokenIds | None = None,
            vllm_log: StepLog | None = None, **mutations) -> tuple[StepLog, StepLog, str | None]:
    """Run both sides (vLLM's unless given) and return their logs and the first difference
    (None: they agree on every step's batch, preemption, finish and prefix-cache hit)."""
    tokens = tokens if tokens is not None else random_token_ids(workload, seed=0)
    reference = vllm_log if vllm_log is not None else drive(workload, config, tokens=tokens)
    ours = simulate_log(workload, sim_config(config, **mutations), tokens)
    return reference, ours, first_difference(reference, ours)
