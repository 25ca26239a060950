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
  free, plus, with kvbench's swap connector, the copies it makes as the plugin's costs price
  them (swap-out and swap-in; the faked worker reports each copy done with the step's
  output). Without async scheduling the engine waits for each step's output before scheduling
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

import dataclasses
import os
from collections import deque
from pathlib import Path

from kvbench.errors import KvbenchError
from kvbench.sim.engines import ReplicaSpec
from kvbench.sim.steplog import StepLog, StepLogBuilder
from kvbench.sim.tokens import workload_token_ids
from kvbench.sim.workloads import TokenIds, Workload, WorkloadError
from kvbench.vllm.swap_connector import planned_copies

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model is local: never ask the hub

import torch  # noqa: E402
import vllm  # noqa: E402
from vllm.config import (  # noqa: E402
    CacheConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

TINY_MODEL = Path(__file__).resolve().parent / "tiny_llama"
PLUGIN_SCHEDULER = "kvbench.vllm.scheduler.KvbenchScheduler"


class DriveError(KvbenchError):
    """A workload or setting vLLM's scheduler cannot run; the message names the request."""


def check_replica(replica: ReplicaSpec, step_s: float) -> None:
    """What the drive needs beyond a valid `ReplicaSpec`: a sized cache with vLLM's null block,
    a step time and no write-through offloading."""
    if replica.num_gpu_blocks is None or replica.num_gpu_blocks < 2 or not replica.null_block:
        raise DriveError(f"num_gpu_blocks must be at least 2 with vLLM's null block, got "
                         f"{replica.num_gpu_blocks}")
    if not step_s > 0:
        raise DriveError(f"step_s must be positive, got {step_s}")
    if replica.kv_offloading:
        raise DriveError("kv_offloading is simulated only: the drive and replay do not set up "
                         "vLLM's offloading connector; drop --kv-offloading")


def build_scheduler(replica: ReplicaSpec, max_model_len: int, scheduler_cls: str | None = None,
                    plugin: dict | None = None, scheduling_policy: str = "fcfs"):
    """vLLM's Scheduler (AsyncScheduler under async scheduling) for `replica`, no model;
    `scheduler_cls`: vLLM's --scheduler-cls (None: vLLM's own); `plugin`: the kvbench
    scheduler's options (vLLM's additional_config["kvbench"]), with kvbench's swap connector
    on a host pool of `replica.num_cpu_blocks` blocks when its preemption policy may swap;
    `scheduling_policy`: vLLM's --scheduling-policy (fcfs or priority)."""
    settings = replica.vllm_settings(max_model_len)
    model_config = ModelConfig(model=str(TINY_MODEL), skip_tokenizer_init=True, dtype="float32",
                               seed=0, max_model_len=max_model_len)
    transfer = None
    if plugin is not None:
        scheduler_cls = scheduler_cls or PLUGIN_SCHEDULER
        if plugin.get("preemption", "recompute") != "recompute":
            transfer = KVTransferConfig(
                kv_connector="KvbenchSwapConnector", kv_role="kv_both",
                kv_connector_module_path="kvbench.vllm.swap_connector",
                kv_connector_extra_config={"host_blocks": replica.num_cpu_blocks or 0})
    scheduler_config = SchedulerConfig(**settings["scheduler"], is_encoder_decoder=False,
                                       scheduler_cls=scheduler_cls, policy=scheduling_policy)
    cache_config = CacheConfig(**settings["cache"])
    vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config,
                             cache_config=cache_config, kv_transfer_config=transfer,
                             additional_config={"kvbench": plugin} if plugin else {})
    # vllm/platforms/cpu.py (check_and_update_config) turns async scheduling off on a CPU; the
    # GPU platforms keep what VllmConfig decided, which is what this run stands for.
    vllm_config.scheduler_config.async_scheduling = replica.async_scheduling
    _check_unchanged(settings, vllm_config)
    spec = FullAttentionSpec(block_size=replica.block_size, num_kv_heads=1, head_size=1,
                             dtype=torch.float32)
    kv_cache_config = KVCacheConfig(num_blocks=replica.num_gpu_blocks, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    vllm_config.cache_config.num_gpu_blocks = replica.num_gpu_blocks
    scheduler_cls = vllm_config.scheduler_config.get_scheduler_cls()
    return scheduler_cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                         structured_output_manager=StructuredOutputManager(vllm_config),
                         block_size=replica.block_size, hash_block_size=replica.block_size)


def _check_unchanged(settings: dict[str, dict], vllm_config) -> None:
    """VllmConfig may adjust settings for the platform; a silent change would fake a match."""
    changed = {name: getattr(config, name) for part, config in (
        ("cache", vllm_config.cache_config), ("scheduler", vllm_config.scheduler_config))
        for name, value in settings[part].items()
        if name != "max_model_len" and getattr(config, name) != value}  # (the model config's)
    if changed:
        raise DriveError(f"vLLM changed the requested settings: {changed}")


def _check_fits(workload: Workload, replica: ReplicaSpec) -> None:
    """Refuse requests vLLM would reject or could never finish (it would preempt them forever)."""
    reasons = replica.check_fits(workload.prompt_tokens, workload.output_tokens)
    if reasons:
        i = min(reasons)
        raise DriveError(f"request {i}: {reasons[i]}")


def drive(workload: Workload, replica: ReplicaSpec, tokens: TokenIds | None = None,
          step_s: float = 0.02, seed: int = 0, scheduler_cls: str | None = None,
          plugin: dict | None = None) -> StepLog:
    """Run vLLM's scheduler over `workload` on `replica` (its `num_gpu_blocks` given), one
    step taking `step_s` (see the module docstring); `seed` draws the token ids when `tokens`
    is not given; `scheduler_cls`: vLLM's --scheduler-cls (None: vLLM's own); `plugin`: the
    kvbench scheduler's options (see `build_scheduler`). With the swap connector the worker
    is faked too: every planned copy is reported done with the step's output."""
    check_replica(replica, step_s)
    if tokens is None:
        tokens = workload_token_ids(workload, seed)
    try:
        tokens.check(workload)
    except WorkloadError as exc:
        raise DriveError(str(exc)) from None
    max_model_len = replica.max_model_len or int(
        (workload.prompt_tokens + workload.output_tokens).max())
    _check_fits(workload, dataclasses.replace(replica, max_model_len=max_model_len))
    sched = build_scheduler(replica, max_model_len, scheduler_cls, plugin)
    victims = _track_victims(sched)
    hasher = None
    if replica.enable_prefix_caching:  # as EngineCore: hashes only when caching is on
        hash_fn = get_hash_fn_by_name(sched.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        hasher = get_request_block_hasher(replica.block_size, hash_fn)
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
            victims.clear()
            output = sched.schedule()
            executed = output.total_num_scheduled_tokens > 0
            start_s = end_s = now
            if executed:  # runs once the batch before it is done
                start_s = max(now, gpu_free_s)
                end_s = gpu_free_s = start_s + step_s + _copy_ms(sched, output) / 1e3
            step, sampled = _record(sched, output, victims, start_s, log, tokens)
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
            sampled_token_ids=sampled, kv_connector_output=_copies_done(output)))
        finished = [int(o.request_id) for outs in results.values() for o in outs.outputs
                    if o.finish_reason is not None]
        if finished:
            log.add_events("finished", step, finished)
    return log.build()


def _track_victims(sched) -> list[str]:
    """The requests the scheduler preempts, in the order it preempts them (its
    `_preempt_request`, wrapped): FCFS pops them off the end of `running`, a kvbench victim
    policy picks them anywhere."""
    victims: list[str] = []
    preempt = sched._preempt_request

    def tracked(request, *args, **kwargs):
        victims.append(request.request_id)
        return preempt(request, *args, **kwargs)

    sched._preempt_request = tracked
    return victims


def _record(sched, output, victims: list[str], start_s: float, log: StepLogBuilder,
            tokens: TokenIds) -> tuple[int | None, list[list[int]]]:
    """Log a scheduled step (unless it did nothing; `victims`: the requests preempted while
    scheduling it, in order); returns its log index and the token each scheduled request
    samples (none for a partial prefill chunk)."""
    scheduled = output.num_scheduled_tokens
    preempted = output.preempted_req_ids
    if not scheduled and not preempted:
        return None, []
    step = log.add_step(start_s, [int(r) for r in scheduled], list(scheduled.values()))
    if preempted:  # the order they were preempted in, not the set's
        order = [r for r in dict.fromkeys(victims) if r in preempted]
        log.add_events("preempted", step, [int(r) for r in order])
    log_admissions(log, step, output, int)
    requests = sched.requests
    sampled = [[] if requests[r].is_prefill_chunk else [int(tokens.output_token[int(r)])]
               for r in scheduled]
    return step, sampled


def log_admissions(log: StepLogBuilder, step: int, output, index) -> None:
    """A step's swap-outs, and per admitted request its prefix-cache hit and the tokens it
    loads back from host memory (`index`: vLLM's request id -> the workload's index)."""
    swapped, loaded = planned_copies(output)
    if swapped:
        log.add_events("swapped", step, [index(r) for r in swapped])
    hits = [(r.req_id, r.num_computed_tokens) for r in output.scheduled_new_reqs]
    cached = output.scheduled_cached_reqs
    hits += [(r, n) for r, n in zip(cached.req_ids, cached.num_computed_tokens)
             if r in cached.resumed_req_ids]
    order = {r: k for k, r in enumerate(output.num_scheduled_tokens)}  # the admission order
    hits.sort(key=lambda hit: order.get(hit[0], len(order)))
    hits = [(index(r), n - loaded.get(r, 0), loaded.get(r, 0)) for r, n in hits]
    for name, column in (("cached", 1), ("loaded", 2)):
        some = [hit for hit in hits if hit[column]]
        if some:
            log.add_events(name, step, [h[0] for h in some], [h[column] for h in some])


def _copy_ms(sched, output) -> float:
    """The time of the step's swap copies, as the plugin's costs price them."""
    meta = output.kv_connector_metadata
    if meta is None or not (meta.swap_out or meta.swap_in):
        return 0.0
    costs = sched.kvbench_costs
    return (sum(float(costs.swap_out_ms(job.tokens)) for job in meta.swap_out)
            + sum(float(costs.swap_in_ms(job.tokens)) for job in meta.swap_in))


def _copies_done(output) -> KVConnectorOutput | None:
    """The swap connector's worker, faked: every planned copy made."""
    meta = output.kv_connector_metadata
    if meta is None or not (meta.swap_out or meta.swap_in):
        return None
    from kvbench.vllm.swap_connector import CopyReports
    from kvbench.vllm.swap_worker import CopyReport

    return KVConnectorOutput(kv_connector_worker_meta=CopyReports(
        [CopyReport(job.request_id, "out", len(job.block_ids), 0, 0.0) for job in meta.swap_out]
        + [CopyReport(job.request_id, "in", len(job.block_ids), 0, 0.0)
           for job in meta.swap_in]))


def _stuck(sched) -> str:
    waiting = [*sched.kv_holding_waiting, *sched.waiting]
    request = waiting[0] if waiting else sched.running[0]
    free = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    return (f"request {request.request_id} ({request.num_tokens} tokens, "
            f"{request.num_computed_tokens} computed) can never be scheduled: {free} blocks "
            "free and nothing in flight")
