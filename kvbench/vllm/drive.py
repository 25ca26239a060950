"""Drive vLLM's own v1 scheduler over a workload, step by step, without a model.

The scheduler is built as vLLM's tests build one (tests/v1/core/utils.py: `VllmConfig` from a
`SchedulerConfig`, a `CacheConfig` and a `ModelConfig` of a tiny local config.json, no weights,
no tokenizer, no downloads, and a `KVCacheConfig` of one full-attention group with
`num_gpu_blocks` blocks), then run the way vLLM's `EngineCore` runs it (vllm/v1/engine/core.py
`step`, or `step_with_batch_queue` with two batches in flight under async scheduling):

* the engine's clock starts at the first arrival; before each `schedule()` every request that
  has arrived by then is added (`Scheduler.add_request`), in arrival order;
* `schedule()`; the model's output is faked as vLLM's tests fake it: one sampled token for
  every scheduled request whose known tokens are all computed after this step, none for a
  partial prefill chunk; `update_from_output()` takes it;
* a step that schedules tokens occupies the (virtual) GPU for `step_s`, from when the GPU is
  free. Without async scheduling the engine waits for each step's output before scheduling
  the next, so a step is decided when it starts. With async scheduling (two batches in flight)
  the engine schedules step k+1 right after launching step k and only then waits for step k's
  output: step k+1 is decided when step k starts, before step k's tokens and finishes are
  known. With nothing to do the clock jumps to the next arrival.

Requests carry `max_tokens = output_tokens` and `ignore_eos`, so each generates exactly its
trace length. Prompt token ids are random (seeded) unless given (`kvbench.sim.tokens`), so
prefix-cache hits are those of real block hashes (vLLM's default sha256 chain).

The result is a `kvbench.sim.steplog.StepLog`: each step's batch in vLLM's order, the requests
preempted while scheduling it (in the order vLLM preempted them), the requests finished by its
output, and the prefix-cache hit of each admission.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvbench.sim.requests import cdiv
from kvbench.sim.steplog import StepLog, StepLogBuilder
from kvbench.sim.tokens import TokenIds, random_token_ids
from kvbench.sim.workloads import Workload, WorkloadError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model is local: never ask the hub

import torch  # noqa: E402
import vllm  # noqa: E402
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

TINY_MODEL = Path(__file__).resolve().parent / "tiny_llama"


class DriveError(ValueError):
    """A workload or setting vLLM's scheduler cannot run; the message names the request."""


@dataclass(frozen=True)
class DriveConfig:
    """vLLM's scheduler knobs (vLLM's own names) plus the step time of the virtual clock.

    Defaults are vLLM 0.32's for an OpenAI server on an H100 (docs/vllm-0.32-scheduler.md);
    `num_gpu_blocks` counts vLLM's null block, so num_gpu_blocks - 1 blocks hold KV.
    """

    num_gpu_blocks: int
    block_size: int = 16
    max_num_seqs: int = 1024
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    async_scheduling: bool = True
    long_prefill_token_threshold: int = 0
    scheduler_reserve_full_isl: bool = True
    watermark: float = 0.0
    max_model_len: int | None = None  # None: the workload's longest prompt + output
    step_s: float = 0.02
    scheduler_cls: str | None = None  # None: vLLM's own (--scheduler-cls)

    def __post_init__(self) -> None:
        if self.num_gpu_blocks < 2:
            raise DriveError(f"num_gpu_blocks must be at least 2 (one is vLLM's null block), "
                             f"got {self.num_gpu_blocks}")
        if not self.step_s > 0:
            raise DriveError(f"step_s must be positive, got {self.step_s}")


def build_scheduler(config: DriveConfig, max_model_len: int):
    """vLLM's Scheduler (AsyncScheduler under async scheduling) for `config`, no model."""
    model_config = ModelConfig(model=str(TINY_MODEL), skip_tokenizer_init=True, dtype="float32",
                               seed=0, max_model_len=max_model_len)
    scheduler_config = SchedulerConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=max_model_len, is_encoder_decoder=False,
        enable_chunked_prefill=config.enable_chunked_prefill,
        long_prefill_token_threshold=config.long_prefill_token_threshold,
        scheduler_reserve_full_isl=config.scheduler_reserve_full_isl,
        watermark=config.watermark, async_scheduling=config.async_scheduling,
        scheduler_cls=config.scheduler_cls)
    cache_config = CacheConfig(block_size=config.block_size,
                               enable_prefix_caching=config.enable_prefix_caching)
    vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config,
                             cache_config=cache_config)
    # vllm/platforms/cpu.py (check_and_update_config) turns async scheduling off on a CPU; the
    # GPU platforms keep what VllmConfig decided, which is what this run stands for.
    vllm_config.scheduler_config.async_scheduling = config.async_scheduling
    _check_unchanged(config, vllm_config)
    spec = FullAttentionSpec(block_size=config.block_size, num_kv_heads=1, head_size=1,
                             dtype=torch.float32)
    kv_cache_config = KVCacheConfig(num_blocks=config.num_gpu_blocks, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    vllm_config.cache_config.num_gpu_blocks = config.num_gpu_blocks
    scheduler_cls = vllm_config.scheduler_config.get_scheduler_cls()
    return scheduler_cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                         structured_output_manager=StructuredOutputManager(vllm_config),
                         block_size=config.block_size, hash_block_size=config.block_size)


def _check_unchanged(config: DriveConfig, vllm_config) -> None:
    """VllmConfig may adjust settings for the platform; a silent change would fake a match."""
    got = {"block_size": vllm_config.cache_config.block_size,
           "enable_prefix_caching": vllm_config.cache_config.enable_prefix_caching}
    for name in ("max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill",
                 "long_prefill_token_threshold", "scheduler_reserve_full_isl", "watermark",
                 "async_scheduling"):
        got[name] = getattr(vllm_config.scheduler_config, name)
    changed = {k: v for k, v in got.items() if v != getattr(config, k)}
    if changed:
        raise DriveError(f"vLLM changed the requested settings: {changed}")


def _check_fits(workload: Workload, config: DriveConfig, max_model_len: int) -> None:
    """Refuse requests vLLM would reject or could never finish (it would preempt them forever)."""
    too_long = np.flatnonzero(workload.prompt_tokens >= max_model_len)
    if too_long.size:
        i = int(too_long[0])
        raise DriveError(f"request {i}: prompt of {workload.prompt_tokens[i]} tokens is not "
                         f"shorter than max_model_len ({max_model_len}); vLLM rejects it")
    computed = np.minimum(workload.prompt_tokens + workload.output_tokens, max_model_len) - 1
    blocks = cdiv(computed, config.block_size)
    too_big = np.flatnonzero(blocks > config.num_gpu_blocks - 1)
    if too_big.size:
        i = int(too_big[0])
        raise DriveError(f"request {i}: {computed[i]} tokens need {blocks[i]} KV blocks, the "
                         f"cache has {config.num_gpu_blocks - 1} (num_gpu_blocks - 1 for the "
                         "null block)")


def drive(workload: Workload, config: DriveConfig, tokens: TokenIds | None = None,
          seed: int = 0) -> StepLog:
    """Run vLLM's scheduler over `workload` (see the module docstring); `seed` draws the
    token ids when `tokens` is not given."""
    if tokens is None:
        tokens = random_token_ids(workload, seed)
    try:
        tokens.check(workload)
    except WorkloadError as exc:
        raise DriveError(str(exc)) from None
    max_model_len = config.max_model_len or int(
        (workload.prompt_tokens + workload.output_tokens).max())
    _check_fits(workload, config, max_model_len)
    sched = build_scheduler(config, max_model_len)
    hasher = None
    if config.enable_prefix_caching:  # as EngineCore: hashes only when caching is on
        hash_fn = get_hash_fn_by_name(sched.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        hasher = get_request_block_hasher(config.block_size, hash_fn)
    log = StepLogBuilder(engine=f"vllm {vllm.__version__} ({type(sched).__name__})")
    # EngineCore.batch_queue_size: vllm_config.max_concurrent_batches (2 with async scheduling)
    queue_size = sched.vllm_config.max_concurrent_batches
    in_flight: deque = deque()  # (scheduler output, log step or None, sampled tokens, end_s)
    arrival_s = workload.arrival_s
    num_requests = workload.num_requests
    next_request = 0
    now = float(arrival_s[0])  # the engine's (CPU) time
    gpu_free_s = now  # when the batch launched last ends
    while True:
        while next_request < num_requests and arrival_s[next_request] <= now:
            i = next_request
            sampling = SamplingParams(max_tokens=int(workload.output_tokens[i]), ignore_eos=True)
            sched.add_request(Request(
                request_id=str(i), prompt_token_ids=tokens.prompt(i).tolist(),
                sampling_params=sampling, pooling_params=None,
                arrival_time=float(arrival_s[i]), block_hasher=hasher))
            next_request += 1
        has_requests = sched.has_requests()
        if not has_requests and not in_flight:
            if next_request == num_requests:
                break
            now = float(arrival_s[next_request])
            continue
        # EngineCore.step_with_batch_queue (EngineCore.step is the queue_size 1 case).
        if has_requests:
            running = [r.request_id for r in sched.running]
            output = sched.schedule()
            executed = output.total_num_scheduled_tokens > 0
            start_s = end_s = now
            if executed:  # runs once the batch before it is done
                start_s = max(now, gpu_free_s)
                end_s = gpu_free_s = start_s + config.step_s
            step, sampled = _record(sched, output, running, start_s, log, tokens)
            if step is None and not in_flight and sched.has_unfinished_requests():
                raise DriveError(_stuck(sched))  # nothing ran, nothing can: it would spin
            in_flight.appendleft((output, step, sampled, end_s))
            if len(in_flight) < queue_size and (executed or sched.has_requests()):
                continue  # async: schedule the next batch before this one's output is back
        output, step, sampled, end_s = in_flight.pop()
        now = max(now, end_s)  # the engine blocks on the oldest batch's output
        req_ids = list(output.num_scheduled_tokens)
        results = sched.update_from_output(output, ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: k for k, r in enumerate(req_ids)},
            sampled_token_ids=sampled))
        finished = [int(o.request_id) for outs in results.values() for o in outs.outputs
                    if o.finish_reason is not None]
        if finished:
            log.add_events("finished", step, finished)
    return log.build()


def _record(sched, output, running_before: list[str], start_s: float, log: StepLogBuilder,
            tokens: TokenIds) -> tuple[int | None, list[list[int]]]:
    """Log a scheduled step (unless it did nothing); returns its log index and the token each
    scheduled request samples (none for a partial prefill chunk)."""
    scheduled = output.num_scheduled_tokens
    preempted = output.preempted_req_ids
    if not scheduled and not preempted:
        return None, []
    step = log.add_step(start_s, [int(r) for r in scheduled], list(scheduled.values()))
    if preempted:  # FCFS pops victims off the end of `running`: that order, not the set's
        order = [r for r in reversed(running_before) if r in preempted]
        log.add_events("preempted", step, [int(r) for r in order])
    hits = [(int(r.req_id), r.num_computed_tokens) for r in output.scheduled_new_reqs
            if r.num_computed_tokens]
    cached = output.scheduled_cached_reqs
    hits += [(int(r), n) for r, n in zip(cached.req_ids, cached.num_computed_tokens)
             if n and r in cached.resumed_req_ids]
    if hits:
        log.add_events("cached", step, [r for r, _ in hits], [n for _, n in hits])
    requests = sched.requests
    sampled = [[] if requests[r].is_prefill_chunk else [int(tokens.output_token[int(r)])]
               for r in scheduled]
    return step, sampled


def _stuck(sched) -> str:
    waiting = [*sched.kv_holding_waiting, *sched.waiting]
    request = waiting[0] if waiting else sched.running[0]
    free = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    return (f"request {request.request_id} ({request.num_tokens} tokens, "
            f"{request.num_computed_tokens} computed) can never be scheduled: {free} blocks "
            "free and nothing in flight")
