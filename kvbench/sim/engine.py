"""Iteration-level simulation of one serving replica with a paged KV cache, following the
settings of a `ReplicaSpec` (`kvbench.sim.engines`; default vLLM 0.32's v1 scheduler,
docs/vllm-0.32-scheduler.md), checked step by step against vLLM's own scheduler
(tests/vllm/test_differential.py). Read it beside vllm/v1/core/sched/scheduler.py.

Each `schedule` (one forward pass of the batch):

1. arrivals up to now join the waiting queue, each with a predicted output length;
2. running requests are scheduled in admission order, each for its missing tokens (1 in
   decode, a chunk of a prompt or of a recomputation), within `max_num_batched_tokens`. A
   request that needs a new KV block when none is free preempts victims (victim policy) until
   the block fits, or is itself the victim, which ends this step's scheduling of running
   requests. Each victim is swapped to CPU memory or dropped for recomputation (preemption
   mode) and goes to the front of the waiting queue;
3. if nothing was preempted, waiting requests are admitted in order, up to `max_num_seqs`
   running, while the blocks fit (the whole prompt under full-prompt admission, else the first
   chunk; less prefix-cache hits; plus the watermark) and the admission policy agrees (see
   `kvbench.sim.policies`); the first that does not stops admission. A swapped request swaps
   back in, a recomputed one prefills what the cache no longer holds of its prompt and
   generated tokens;
4. the step is priced (`kvbench.sim.steptime`) and runs on the GPU once the previous one is
   done. Its output (one token per request whose known tokens are all computed) is processed
   when the step ends: right away, or, under async scheduling, after the next step has been
   scheduled (two batches in flight, as vLLM's EngineCore). Finished requests free their
   blocks then.

Step time (ms), `profile` pricing: the sum of

* prefill: for each chunk of c tokens after x cached ones, recompute_ms(x + c) - recompute_ms(x)
  (the recompute cost model, incremental; the fixed cost is paid once, by the first chunk);
* decode: DecodeModel.step_ms(B, mean context) over the B requests generating one token;
* swap transfers: a swap-out costs half of swap_ms(n) (the model's round trip) and is paid in
  the step that frees the blocks, the swap-in the other half in the step the request resumes.

Transfers and compute do not overlap, and a step with both prefill and decode pays both in
full (the weights are read twice): both err on the slow side.

FLOPs use `ModelSpec`: a chunk costs linear_flops_per_token·c + attention_flops_per_token_sq·
((x + c)² - x²), plus lm_head_flops when it samples a token. Recomputed FLOPs are those spent
on positions whose KV a recompute preemption threw away (`ModelSpec.recomputation`;
prefix-cache hits are not spent).

The replica (`ReplicaSpec`, vLLM's settings by vLLM's names) is sized by `plan_kv_cache` and its
blocks are the `KVCacheManager`'s (kvbench/sim/kv_cache.py). A request the replica can never
run (`ReplicaSpec.check_fits`) is rejected up front with the reason; `max_model_len` also caps
generation. If no token is generated for `livelock_steps` iterations the run stops and reports
the stuck request.

Speed (`SimConfig.decode_runs`, on by default): while every running request decodes and no
waiting request would be admitted, the steps up to the next event are applied at once
(`_run_decode_steps`), through the same pricer (`StepPricer`) and the same KV cache manager
verbs (`allocate_decode_run`, `cache`, `free`) in the same order, so the schedule is the one of
stepping one by one (tests/sim/test_engine.py runs both). One run follows another (a request
finishing or outliving its prediction ends one), so a step is scheduled one by one only when
it admits, preempts or prefills.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvbench.sim.config import Costs, SimConfig
from kvbench.sim.engines import plan_kv_cache
from kvbench.sim.kv_cache import KVCacheManager
from kvbench.sim.policies import admit_fcfs, bind
from kvbench.sim.requests import (
    FINISHED,
    REJECTED,
    RUNNING,
    STATE_NAMES,
    STATIC_COLUMNS,
    SWAPPED,
    WAITING,
    RequestTable,
    cdiv,
)
from kvbench.sim.steplog import StepLog, StepLogBuilder
from kvbench.sim.steptime import CostStepTime, StepPricer, parse_step_time
from kvbench.sim.tokens import TokenIds, random_token_ids
from kvbench.sim.view import StateView
from kvbench.sim.workloads import Workload

PROGRESS_EVERY_STEPS = 2000
EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class SimResult:
    """Everything a run produced; `kvbench.sim.metrics` turns it into numbers."""

    config: SimConfig
    workload: dict
    model: str
    profile_source: str
    num_gpu_blocks: int
    num_cpu_blocks: int
    block_bytes: float
    requests: RequestTable
    steps: int
    end_s: float
    busy_ms: float
    recompute_ms: float
    swap_ms: float
    flops: float
    recompute_flops: float
    max_kv_blocks_used: int
    timeline_s: np.ndarray
    timeline_kv_blocks: np.ndarray
    timeline_running: np.ndarray
    livelock: dict | None
    step_log: StepLog | None = None


@dataclass
class Batch:
    """A scheduled step: its requests, which of them sample a token, when it ends."""

    ids: np.ndarray
    samples: np.ndarray
    end_s: float
    log_step: int | None


class Simulator:
    """One replica under one policy combination; `run()` simulates the whole workload.

    `record=True` keeps a `StepLog` of every step (batches, preemptions, finishes, prefix-cache
    hits), the record the differential test compares with vLLM's own scheduler.
    """

    def __init__(self, workload: Workload, config: SimConfig = SimConfig(),
                 costs: Costs | None = None, tokens: TokenIds | None = None,
                 record: bool = False) -> None:
        self.config = config
        if costs is None:
            costs = Costs.analytic(hardware=config.replica.hardware,
                                   block_size=config.replica.block_size)
        self.sim_costs = costs
        self.model, self.costs = costs.model, costs.costs
        self.replica = replica = plan_kv_cache(config.replica, costs.model)
        self.pricer = StepPricer(parse_step_time(config.step_time)
                                 or CostStepTime(costs.costs, costs.decode), costs.model)
        self.workload = workload
        self.block_size = replica.block_size
        self.block_bytes = float(replica.block_size * self.model.kv_bytes_per_token)
        self.requests = RequestTable(workload)
        if replica.enable_prefix_caching:
            tokens = tokens if tokens is not None else random_token_ids(workload,
                                                                       config.knobs.seed)
            tokens.check(workload)
        self.kv = KVCacheManager(replica, self.requests, tokens)
        self.usable_blocks = replica.usable_blocks
        functions = config.policy.functions()
        self.admits_all = functions["admission"] is admit_fcfs  # no view to build
        self.predictor = bind(functions["predictor"], config.knobs)()
        self.admit, self.choose_victim, self.preemption = (
            bind(functions[axis], config.knobs) for axis in ("admission", "victim", "preemption"))

        self.now_s = 0.0
        self.gpu_free_s = 0.0  # when the last step launched ends
        self.in_flight: deque[Batch] = deque()
        self.admitted_head: int | None = None  # see `_admit_waiting`
        self.queue_size = 2 if replica.async_scheduling else 1  # batches in flight at most
        self.free_cpu_blocks = replica.num_cpu_blocks
        self.running = EMPTY  # ids in admission order
        self.waiting: deque[int] = deque()
        self.next_arrival = 0
        self.steps = 0
        self.iterations_without_token = 0
        self.livelock: dict | None = None
        self.busy_ms = self.recompute_ms = self.swap_ms = self.step_swap_ms = 0.0
        self.flops = self.recompute_flops = 0.0
        self.max_kv_blocks_used = 0
        self.timeline: list[tuple[float, int, int]] = []
        self.log = StepLogBuilder(engine=f"kvbench {replica.engine}") if record else None
        self._reject_impossible()
        # The request ends at its length limit (max_tokens or max_model_len): under async
        # scheduling vLLM skips it while its last token is in flight (`_wanted_tokens`).
        req = self.requests
        self.stops_at_limit = (req.prompt_tokens + req.output_tokens
                               >= np.minimum(req.max_total_tokens,
                                             replica.max_model_len or np.iinfo(np.int64).max))
        self.num_done = len(self.requests.reject_reason)  # finished or rejected

    @property
    def free_gpu_blocks(self) -> int:
        return self.kv.num_free

    # -----------------------------------------------------------------------------------------
    # Public driver

    def run(self, progress: Callable[[int], None] | None = None) -> SimResult:
        """Simulate to the end; `progress(requests done)` is called now and then."""
        while self.step():
            if progress and self.steps % PROGRESS_EVERY_STEPS == 0:
                progress(self.num_done)
        if progress:
            progress(self.num_done)
        return self.result()

    def step(self) -> bool:
        """One schedule, and the output of the oldest step in flight once `queue_size` steps
        are (vLLM's EngineCore.step / step_with_batch_queue); or a jump to the next arrival.
        False when the run is over."""
        req, n = self.requests, self.requests.size
        if self.next_arrival < n and req.arrival_s[self.next_arrival] <= self.now_s:
            self._enqueue_arrivals()
        if self.running.size or self.waiting:
            while self.config.decode_runs and self._run_decode_steps():  # as `step` would
                if self.next_arrival < n and req.arrival_s[self.next_arrival] <= self.now_s:
                    self._enqueue_arrivals()
            executed = self._schedule()
            if len(self.in_flight) < self.queue_size and (
                    executed or self.running.size or self.waiting):
                return True  # async: schedule the next step before this one's output
        elif not self.in_flight:
            if self.next_arrival >= n:
                return False
            arrival_s = float(req.arrival_s[self.next_arrival])
            # The guard counts iterations: a jump that does not move the clock on (a NaN time)
            # generates no token either.
            self.iterations_without_token += not arrival_s > self.now_s
            self.now_s = arrival_s
            return self._below_livelock_limit()
        batch = self.in_flight.pop()
        self.now_s = max(self.now_s, batch.end_s)
        self._process_output(batch)
        return self._below_livelock_limit()

    def result(self) -> SimResult:
        timeline = np.array(self.timeline, dtype=np.float64).reshape(-1, 3)
        return SimResult(
            config=self.config, workload=self.workload.describe(), model=self.model.name,
            profile_source=self.sim_costs.source, num_gpu_blocks=self.replica.num_gpu_blocks,
            num_cpu_blocks=self.replica.num_cpu_blocks, block_bytes=self.block_bytes,
            requests=self.requests, steps=self.steps, end_s=self.now_s, busy_ms=self.busy_ms,
            recompute_ms=self.recompute_ms, swap_ms=self.swap_ms, flops=self.flops,
            recompute_flops=self.recompute_flops, max_kv_blocks_used=self.max_kv_blocks_used,
            timeline_s=timeline[:, 0], timeline_kv_blocks=timeline[:, 1].astype(np.int64),
            timeline_running=timeline[:, 2].astype(np.int64), livelock=self.livelock,
            step_log=self.log.build() if self.log else None)

    def view(self, running: np.ndarray, reads: set[str] | None = None) -> StateView:
        """What the policies see, with `running` (ids in admission order) as the batch; `reads`
        collects the request columns read."""
        return StateView(running=self.requests.view(running, reads), block_size=self.block_size,
                         num_gpu_blocks=self.usable_blocks, free_cpu_blocks=self.free_cpu_blocks,
                         block_bytes=self.block_bytes, costs=self.costs)

    # -----------------------------------------------------------------------------------------
    # Arrivals, rejection, livelock

    def _reject_impossible(self) -> None:
        req, replica = self.requests, self.replica
        req.reject_reason.update(replica.check_fits(req.prompt_tokens, req.output_tokens))
        if replica.max_model_len is not None:  # generation stops at max_model_len
            np.minimum(req.output_tokens,
                       np.maximum(replica.max_model_len - req.prompt_tokens, 1),
                       out=req.output_tokens)
        req.state[list(req.reject_reason)] = REJECTED

    def _enqueue_arrivals(self) -> None:
        req = self.requests
        end = int(np.searchsorted(req.arrival_s, self.now_s, side="right"))
        ids = np.arange(self.next_arrival, end)
        self.next_arrival = end
        if req.reject_reason:
            ids = ids[req.state[ids] != REJECTED]
        req.predicted_output_tokens[ids] = self.predictor.predict(
            ids, req.prompt_tokens[ids], req.max_tokens[ids], req.output_tokens[ids])
        req.state[ids] = WAITING
        self.waiting.extend(ids.tolist())

    def _next_arrival_s(self) -> float:
        req = self.requests
        return float(req.arrival_s[self.next_arrival]) if self.next_arrival < req.size else np.inf

    def _below_livelock_limit(self) -> bool:
        if self.iterations_without_token < self.config.livelock_steps:
            return True
        self._report_livelock()
        return False

    def _report_livelock(self) -> None:
        stuck = (int(self.running[0]) if self.running.size else
                 int(self.waiting[0]) if self.waiting else self.next_arrival)
        req = self.requests
        self.livelock = {
            "step": self.steps, "time_s": self.now_s, "request_id": stuck,
            "reason": (f"no token generated in {self.iterations_without_token} iterations; "
                       f"request {stuck} ({STATE_NAMES[req.state[stuck]]}, "
                       f"{req.computed_tokens[stuck]}/{req.known_tokens(stuck)} tokens computed, "
                       f"{self.free_gpu_blocks} of {self.usable_blocks} blocks free) "
                       "makes no progress"),
        }

    # -----------------------------------------------------------------------------------------
    # Scheduling

    def _schedule(self) -> bool:
        """Schedule one step and launch it; True if it computes any token."""
        self.step_swap_ms = 0.0
        self.step_preempted: list[int] = []
        self.step_hits: list[tuple[int, int]] = []
        ids, tokens, budget, preempted = self._schedule_running()
        if not preempted:
            new_ids, new_tokens = self._admit_waiting(budget, self.admitted_head)
            if new_ids:
                ids = np.concatenate([ids, np.array(new_ids, dtype=np.int64)])
                tokens = np.concatenate([tokens, np.array(new_tokens, dtype=np.int64)])
        self.admitted_head = None
        self.max_kv_blocks_used = max(self.max_kv_blocks_used, self.kv.num_used)
        return self._launch(ids, tokens)

    def _wanted_tokens(self, run: np.ndarray, computed: np.ndarray) -> np.ndarray:
        """Tokens each running request asks for (vLLM scheduler.py:660-719); `computed` is
        theirs."""
        req = self.requests
        placeholders = req.placeholders[run]
        want = req.known_tokens(run) + placeholders - computed
        if self.replica.async_scheduling:  # its step in flight yields its last token: skip it
            last = (placeholders > 0) & (computed + 2 - placeholders
                                         >= req.max_total_tokens[run])
            want[last] = 0
        if self.replica.max_model_len is not None:  # no position past max_model_len - 1
            want = np.minimum(want, self.replica.max_model_len - 1 - computed)
        return want

    def _schedule_running(self) -> tuple[np.ndarray, np.ndarray, int, bool]:
        """Tokens for running requests in order; preempt when a block is missing.

        Returns the scheduled ids, their token counts, the token budget left and whether any
        request was preempted.
        """
        req, kv = self.requests, self.kv
        budget = self.replica.max_num_batched_tokens
        run = self.running
        if not run.size:
            return run, run, budget, False
        computed = req.computed_tokens[run]
        tokens, need = self._tokens_and_blocks(run, computed, budget)
        if int(need.sum()) <= kv.num_free:  # the common case: everything fits
            kv.allocate(run, need)
            budget -= int(tokens.sum())
            if np.count_nonzero(tokens) < run.size:  # leave out those with nothing to compute
                scheduled = tokens > 0
                run, computed, tokens = run[scheduled], computed[scheduled], tokens[scheduled]
            kv.cache(run, computed + tokens)
            return run, tokens, budget, False
        # The requests whose blocks fit are scheduled at once, up to one whose blocks do not:
        # it preempts victims until they do, or is itself the victim. Then on from the next.
        order = run.tolist()
        done: list[int] = []  # tokens of order[:len(done)] (0: not scheduled)
        while True:
            first = int(np.searchsorted(np.cumsum(need), kv.num_free, side="right"))
            fitted = tokens[:first]
            kv.allocate(run[:first], need[:first])
            some = fitted > 0
            kv.cache(run[:first][some], computed[:first][some] + fitted[some])
            done += fitted.tolist()
            budget -= int(fitted.sum())
            pos = len(done)
            if pos == len(order) or budget <= 0:
                break
            i, num_tokens, num_new = order[pos], int(tokens[first]), int(need[first])
            while num_new > kv.num_free and req.state[i] == RUNNING:
                view = self.view(np.array(order, dtype=np.int64))
                at = self.choose_victim(view, self.preemption(view, view.running))
                victim = order[at]
                del order[at]
                if at < pos:  # already scheduled in this step: give its tokens back
                    budget += done.pop(at)
                    pos -= 1
                self._preempt(victim)
            if req.state[i] != RUNNING:  # it was its own victim: stop scheduling this step
                break
            kv.allocate_one(i, num_new)
            kv.cache_one(i, int(computed[first]) + num_tokens)
            done.append(num_tokens)
            budget -= num_tokens
            if pos + 1 == len(order) or budget <= 0:
                break
            run = np.array(order[pos + 1:], dtype=np.int64)
            computed = req.computed_tokens[run]
            tokens, need = self._tokens_and_blocks(run, computed, budget)
        self.running = np.array(order, dtype=np.int64)
        scheduled_tokens = np.array(done, dtype=np.int64)
        scheduled = scheduled_tokens > 0
        return (self.running[:len(done)][scheduled], scheduled_tokens[scheduled], budget,
                bool(self.step_preempted))

    def _tokens_and_blocks(self, run: np.ndarray, computed: np.ndarray,
                           budget: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens for requests `run` in order within `budget` (vLLM gives each what is left of
        it), and the new blocks each needs for them (>= 0: each holds cdiv(computed))."""
        tokens = self._wanted_tokens(run, computed)
        if int(tokens.sum()) > budget:
            tokens = np.clip(budget - (np.cumsum(tokens) - tokens), 0, tokens)
        return tokens, self.kv.new_blocks(run, computed, tokens)

    def _preempt(self, victim: int) -> None:
        req = self.requests
        computed = int(req.computed_tokens[victim])
        if self.preemption(self.view(self.running), self.requests.view(np.array([victim])))[0]:
            filled = cdiv(computed, self.block_size)  # blocks allocated in this step are empty
            self.free_cpu_blocks -= filled
            req.cpu_blocks[victim] = filled
            req.state[victim] = SWAPPED
            req.num_swaps[victim] += 1
            req.swapped_bytes[victim] += filled * self.block_bytes
            self.step_swap_ms += float(self.costs.swap_ms(computed)) / 2
        else:
            req.recompute_target_tokens[victim] = max(int(req.recompute_target_tokens[victim]),
                                                      computed)
            req.computed_tokens[victim] = 0
            req.state[victim] = WAITING
        self.kv.free(victim, preempted=True)
        req.placeholders[victim] = 0  # an output in flight arrives stale (scheduler.py:1600)
        req.num_preemptions[victim] += 1
        self.waiting.appendleft(victim)
        self.step_preempted.append(victim)

    def _fit(self, i: int, budget: int, free: int) -> tuple[list[int], int, int, int] | None:
        return self.kv.can_admit(i, budget, free, running=bool(self.running.size))

    def _policy_admits(self, i: int, reads: set[str] | None = None) -> bool:
        """Whether the admission policy admits waiting request `i` now; `reads` collects the
        request columns it read."""
        return not self.running.size or self.admits_all or bool(self.admit(
            self.view(self.running, reads), self.requests.view(np.array([i]), reads)))

    def _admit_waiting(self, budget: int, admitted: int | None) -> tuple[list[int], list[int]]:
        """Admit waiting requests in order while they fit and the policy agrees (`admitted`: a
        request the policy has admitted in this very state)."""
        req, kv = self.requests, self.kv
        ids: list[int] = []
        tokens: list[int] = []
        while self.waiting and budget > 0 and self.running.size < self.replica.max_num_seqs:
            i = self.waiting[0]
            fit = self._fit(i, budget, kv.num_free)
            if fit is None or (i != admitted and not self._policy_admits(i)):
                break
            hits, computed, num_tokens, blocks = fit
            self.waiting.popleft()
            if req.state[i] == SWAPPED:
                self.free_cpu_blocks += int(req.cpu_blocks[i])
                req.cpu_blocks[i] = 0
                req.swapped_bytes[i] += cdiv(computed, self.block_size) * self.block_bytes
                self.step_swap_ms += float(self.costs.swap_ms(computed)) / 2
            req.state[i] = RUNNING
            kv.admit(i, hits, computed, blocks)
            if hits:
                self.step_hits.append((i, len(hits) * self.block_size))
            kv.cache_one(i, computed + num_tokens)
            self.running = np.concatenate((self.running, [i]))
            ids.append(i)
            tokens.append(num_tokens)
            budget -= num_tokens
        return ids, tokens

    # -----------------------------------------------------------------------------------------
    # Launch: price the step, advance the GPU clock, account FLOPs

    def _launch(self, ids: np.ndarray, tokens: np.ndarray) -> bool:
        """Price and launch a scheduled step (computed tokens move on now, as in vLLM's
        _update_after_schedule); its output waits in `in_flight`."""
        req = self.requests
        start = req.computed_tokens[ids]
        end = start + tokens
        output = req.generated_tokens[ids] + req.placeholders[ids]
        samples = end == req.prompt_tokens[ids] + output
        decode = samples & (tokens == 1) & (output > 0)
        executed = bool(ids.size)
        if not decode.all():
            # Positions below the recompute target had KV that a preemption dropped; only
            # prefill chunks reach them (a resumed request recomputes before it decodes).
            prefill = ~decode
            redo, redo_tokens, redo_flops = self.model.recomputation(
                start[prefill], end[prefill], req.recompute_target_tokens[ids[prefill]])
            if redo_tokens.size:
                r_ids, r_start = ids[prefill][redo], start[prefill][redo]
                req.recompute_tokens[r_ids] += redo_tokens
                req.wasted_flops[r_ids] += redo_flops
                self.recompute_flops += float(redo_flops.sum())
                self.recompute_ms += self.pricer.recompute_ms(r_start, r_start + redo_tokens)
        start_s = self.now_s
        if executed:
            step_ms, flops = self.pricer.step(start, end, samples, decode, self.step_swap_ms)
            self.flops += flops
            self.busy_ms += step_ms
            self.swap_ms += self.step_swap_ms
            start_s = max(self.now_s, self.gpu_free_s)
            self.gpu_free_s = start_s + step_ms / 1e3
            self.steps += 1
        req.computed_tokens[ids] = end
        if self.replica.async_scheduling:
            req.placeholders[ids[samples]] += 1
        log_step = None
        if self.log is not None and (executed or self.step_preempted):
            log_step = self.log.add_step(start_s, ids.tolist(), tokens.tolist())
            if self.step_preempted:
                self.log.add_events("preempted", log_step, self.step_preempted)
            if self.step_hits:
                self.log.add_events("cached", log_step, [i for i, _ in self.step_hits],
                                    [t for _, t in self.step_hits])
        end_s = self.gpu_free_s if executed else self.now_s
        self.in_flight.appendleft(Batch(ids, samples, end_s, log_step))
        return executed

    # -----------------------------------------------------------------------------------------
    # Output: sample tokens, finish requests

    def _process_output(self, batch: Batch) -> None:
        """A step's tokens arrive (vLLM's update_from_output): one per sampling request, also
        for a request preempted since (a stale output, scheduler.py:2080-2103)."""
        req = self.requests
        used = self.kv.num_used
        sampled = batch.ids[batch.samples]
        state = req.state[sampled]
        if np.count_nonzero(state == FINISHED):
            live = state != FINISHED
            sampled, state = sampled[live], state[live]
        if not sampled.size:
            self.iterations_without_token += 1
            self.timeline.append((self.now_s, used, self.running.size))
            return
        self.iterations_without_token = 0
        generated = req.generated_tokens[sampled] + 1
        req.generated_tokens[sampled] = generated
        if self.replica.async_scheduling:
            running = state == RUNNING
            running = sampled if np.count_nonzero(running) == sampled.size else sampled[running]
            placeholders = req.placeholders[running] - 1
            req.placeholders[running] = placeholders
            self.kv.cache(running, req.computed_tokens[running] - placeholders)
        req.first_token_s[sampled[generated == 1]] = self.now_s
        output = req.output_tokens[sampled]
        outlived = (generated >= req.predicted_output_tokens[sampled]) & (generated < output)
        if np.count_nonzero(outlived):
            self._revise_predictions(sampled[outlived], generated[outlived])
        finished = sampled[generated == output]
        if finished.size:
            self._finish(finished, batch.log_step)
        self.timeline.append((self.now_s, used, self.running.size))

    def _revise_predictions(self, late: np.ndarray, generated: np.ndarray) -> None:
        """Requests that outlived their predictions: as many tokens again as so far."""
        req = self.requests
        req.predicted_output_tokens[late] = np.minimum(2 * generated, req.max_tokens[late])

    def _finish(self, finished: np.ndarray, log_step: int | None) -> None:
        req = self.requests
        was_running = req.state[finished] == RUNNING
        req.finish_s[finished] = self.now_s
        for i in finished.tolist():
            if req.state[i] == RUNNING:
                self.kv.free(i)
            else:  # finished by a stale output while waiting
                self.waiting.remove(i)
                self.free_cpu_blocks += int(req.cpu_blocks[i])
                req.cpu_blocks[i] = 0
        req.state[finished] = FINISHED
        self.num_done += finished.size
        if was_running.any():
            self.running = self.running[req.state[self.running] == RUNNING]
        self.predictor.observe(req.prompt_tokens[finished], req.output_tokens[finished])
        self.kv.forget(finished)
        if self.log is not None and log_step is not None:
            self.log.add_events("finished", log_step, finished.tolist())

    # -----------------------------------------------------------------------------------------
    # Fast path: runs of plain decode steps

    def _run_decode_steps(self) -> bool:
        """Run the coming steps at once while they are all plain decode steps; True if any ran.

        With every running request decoding and no request admitted, the next steps only grow
        each request by one token, until the first of: an arrival while none waits, a block
        that does not fit, the head of the waiting queue being admitted, or the output landing
        that finishes requests or brings them to their predictions (the run's last: those
        requests finish, or their predictions are revised, as `_process_output` does). Those
        steps are applied together: the clock advanced step by step exactly as `step` would,
        arrivals queued when `step` would queue them, blocks taken from the free queue in the
        same order (step, then running order), the prefix cache registering the same blocks.
        Under async scheduling the step in flight is part of the run: its output lands first
        (a first token, if it ends a prompt; dropped for a request finished since), and the last
        skipped step is left in flight. A request finishing at its length limit ends the run one
        landing earlier: vLLM does not schedule it while its last token is in flight.

        The head's admission is checked at every step as `_admit_waiting` would, with the state
        of that step (`head_admitted`); a verdict that read only columns no step changes
        (`STATIC_COLUMNS`) holds for the run. The head's prefix-cache hits must stay what they
        are: no block of the run may evict one of them, and no running request may register one
        of its hashes, which only a request with the same first block can
        (`KVCacheManager.private_prefixes`).
        """
        req, run, bs, replica = self.requests, self.running, self.block_size, self.replica
        kv = self.kv
        asynchronous = replica.async_scheduling
        if not run.size or run.size > replica.max_num_batched_tokens:
            return False
        head = self.waiting[0] if self.waiting else None
        if head is not None and not kv.private_prefixes:
            return False
        if asynchronous:  # one decode step of these requests in flight, and of finished ones
            if len(self.in_flight) != 1:
                return False
            flying = self.in_flight[0].ids
            if flying is not run:  # (the running array is replaced, never changed in place)
                if flying.size != run.size:  # a finished request's output is dropped on landing
                    flying = flying[req.state[flying] != FINISHED]
                if flying.size != run.size or flying.tobytes() != run.tobytes():
                    return False
        elif self.in_flight:
            return False
        generated = req.generated_tokens[run]
        computed = req.computed_tokens[run]
        known = req.prompt_tokens[run] + generated
        if asynchronous:  # each has its next token in flight (a first one: its prompt's last chunk)
            if np.count_nonzero((computed != known) | (req.placeholders[run] != 1)):
                return False
            first_token = run[generated == 0]
        elif np.count_nonzero(computed != known - 1) or np.count_nonzero(generated) < run.size:
            return False
        # Outputs that land in the run: up to the one finishing the first requests to end (as
        # the last to land), if the step before schedules them as a plain decode: under async
        # vLLM skips a request whose last token is in flight at its length limit.
        output = req.output_tokens[run]
        left = output - generated
        landings = limit = int(left.min())
        if asynchronous and np.count_nonzero(self.stops_at_limit[run[left == limit]]):
            limit -= 1
        # Or up to the one that brings requests to their predictions (revised on landing).
        predicted = req.predicted_output_tokens[run]
        outlives = predicted < output
        revised = int((predicted - generated)[outlives].min()) if np.count_nonzero(outlives) else 0
        if revised:
            limit = min(limit, revised)
        if limit < 1:
            return False
        batch = run.size
        budget = replica.max_num_batched_tokens - batch
        check_head = head is not None and budget > 0 and batch < replica.max_num_seqs
        held = req.gpu_blocks[run]
        shown = False  # whether the policy was shown a later step's state
        steady = False  # whether the policy's last verdict holds for the whole run

        def head_admitted(step: int, free: int) -> bool:
            """Whether `_admit_waiting` admits the head in this step of the run (`free` blocks
            free then), as the state would be then; False from the first step it does not fit
            for good (fewer blocks free each step, the same hits)."""
            nonlocal check_head, shown, steady
            if self._fit(head, budget, free) is None:
                check_head = False
                return False
            if self.admits_all:
                return True
            if steady:  # its verdict read nothing a decode step changes: still no
                return False
            if step:
                req.computed_tokens[run] = computed + step
                req.generated_tokens[run] = generated + step
            req.gpu_blocks[run] = cdiv(computed + step + 1, bs)  # with this step's new blocks
            shown = True
            reads: set[str] = set()
            admitted = self._policy_admits(head, reads)
            steady = reads <= STATIC_COLUMNS
            return admitted

        # Step s takes a block for each request whose s-th token starts one: computed + s is a
        # multiple of the block size (each holds cdiv(computed) blocks).
        position = computed % bs
        free = kv.num_free
        if check_head:
            admitted = head_admitted(0, free - int(np.count_nonzero(position == 0)))
            req.gpu_blocks[run] = held
            if admitted:  # the step to schedule now admits it: `_admit_waiting` need not ask
                self.admitted_head = head
                return False
        starting = np.bincount(position, minlength=bs).tolist()  # blocks at each position
        taken = list(itertools.accumulate(starting[-step % bs] for step in range(limit)))
        limit = bisect.bisect_right(taken, free)  # steps whose blocks fit
        hits = kv.get_computed_blocks(head) if check_head else []
        if hits and kv.pool.num_evictable(hits):  # evict none of the head's hits
            limit = min(limit, bisect.bisect_right(taken, kv.pool.num_unhashed_free))
        if limit < 1:
            return False
        free_after = [free - blocks for blocks in taken[:limit]]
        total = int(computed.sum())
        next_arrival_s = self._next_arrival_s()
        landed_log_steps = []  # of the steps whose outputs land in the run, in order
        if asynchronous:  # its output is the first to land in the run
            landed_log_steps.append(self.in_flight.pop().log_step)
        num_steps = 0
        step_starts = []
        for step_ms in self.pricer.decode_run(batch, total, limit).tolist():
            if num_steps:
                if next_arrival_s <= self.now_s:
                    if head is None:
                        break
                    self._enqueue_arrivals()  # behind the head: it changes nothing of the run
                    next_arrival_s = self._next_arrival_s()
                if check_head and head_admitted(num_steps, free_after[num_steps]):
                    break
            self.busy_ms += step_ms
            if asynchronous:  # this step runs after the one in flight; that one's output lands
                step_starts.append(self.gpu_free_s)
                ended = self.gpu_free_s
                self.gpu_free_s += step_ms / 1e3
                self.now_s = max(self.now_s, ended)
                if not num_steps:
                    req.first_token_s[first_token] = self.now_s
            else:
                step_starts.append(self.now_s)
                self.now_s += step_ms / 1e3
                self.gpu_free_s = self.now_s
            num_steps += 1
        if shown:
            req.gpu_blocks[run] = held
        end = computed + num_steps
        kv.allocate_decode_run(run, computed, num_steps, taken[num_steps - 1])
        req.computed_tokens[run] = end
        req.generated_tokens[run] = generated = generated + num_steps
        if num_steps == revised:  # requests that reached their predictions in the last landing
            late = outlives & (generated == predicted)
            self._revise_predictions(run[late], generated[late])
        kv.cache_full(run, (end - asynchronous) // bs)  # all known but the token in flight
        self.flops += self.pricer.decode_run_flops(batch, total, num_steps)
        self.steps += num_steps
        self.iterations_without_token = 0
        used = kv.num_used
        self.max_kv_blocks_used = max(self.max_kv_blocks_used, used)
        log_steps = [None] * num_steps
        if self.log is not None:
            ids, ones = run.tolist(), [1] * batch
            log_steps = [self.log.add_step(start_s, ids, ones) for start_s in step_starts]
        if asynchronous:
            self.in_flight.appendleft(Batch(run, np.ones(batch, dtype=bool), self.gpu_free_s,
                                            log_steps[-1]))
        if num_steps == landings:  # the last output landed finishes requests
            self._finish(run[left == num_steps], (landed_log_steps + log_steps)[num_steps - 1])
        self.timeline.append((self.now_s, used, self.running.size))
        return True

def simulate(workload: Workload, config: SimConfig = SimConfig(), costs: Costs | None = None,
             progress: Callable[[int], None] | None = None) -> SimResult:
    """Simulate `workload` on one replica under `config`; see the module docstring."""
    return Simulator(workload, config, costs).run(progress)
