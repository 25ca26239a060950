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
   mode) and goes to the front of the waiting queue; under write-through offloading
   (`ReplicaSpec.kv_offloading`) it is dropped, its prompt blocks already on the host;
3. if nothing was preempted, waiting requests are admitted in order, up to `max_num_seqs`
   running, while the blocks fit (the whole prompt under full-prompt admission, else the first
   chunk; less prefix-cache hits; plus the watermark) and the admission policy agrees (see
   `kvbench.sim.policies`); the first that does not stops admission. A swapped request swaps
   back in, a recomputed one prefills what the cache no longer holds of its prompt and
   generated tokens. Under write-through offloading a request may first load what the host
   cache holds of it, and runs once the load has landed (`_admit_offloaded`);
4. the step is priced (`kvbench.sim.steptime`) and runs on the GPU once the previous one is
   done. Its output (one token per request whose known tokens are all computed) is processed
   when the step ends: right away, or, under async scheduling, after the next step has been
   scheduled (two batches in flight, as vLLM's EngineCore). Finished requests free their
   blocks then.

Pricing (`StepPricer`, kvbench/sim/steptime.py), FLOP accounting, cache sizing, write-through
offloading (kvbench/sim/write_through.py) and the decode fast path (`SimConfig.decode_runs`,
kvbench/sim/decode_runs.py) are described in docs/simulator.md.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from kvbench.sim.blocks import PrefixHashes
from kvbench.sim.config import Costs, SimConfig
from kvbench.sim.decode_runs import DecodeRuns
from kvbench.sim.engines import plan_kv_cache
from kvbench.sim.kv_cache import KVCacheManager
from kvbench.sim.policies import RESUMES, admit_fcfs, bind
from kvbench.sim.requests import (
    FINISHED,
    LOADING,
    REJECTED,
    RUNNING,
    STATE_NAMES,
    SWAPPED,
    WAITING,
    RequestTable,
    cdiv,
)
from kvbench.sim.result import Batch, SimResult
from kvbench.sim.steplog import StepLogBuilder
from kvbench.sim.steptime import CostStepTime, StepPricer, parse_step_time
from kvbench.sim.tokens import workload_token_ids
from kvbench.sim.view import StateView
from kvbench.sim.workloads import TokenIds, Workload
from kvbench.sim.write_through import StepTransfers, WriteThrough

PROGRESS_EVERY_STEPS = 2000
EMPTY = np.zeros(0, dtype=np.int64)


class Simulator(DecodeRuns):
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
        if replica.enable_prefix_caching or replica.kv_offloading:  # blocks go by their hashes
            tokens = tokens if tokens is not None else workload_token_ids(workload,
                                                                         config.knobs.seed)
            tokens.check(workload)
        self.kv = KVCacheManager(replica, self.requests, tokens)
        # Write-through offloading (kvbench/sim/write_through.py): the connector, the requests
        # loading from the host (-> landed) and the resume policy.
        self.write_through: WriteThrough | None = None
        self.loading: dict[int, bool] = {}
        if replica.kv_offloading:
            hashes = (self.kv.pool.hashes if self.kv.caching
                      else PrefixHashes(tokens, self.requests.output_tokens, self.block_size))
            self.write_through = WriteThrough(self.requests, hashes, replica.num_cpu_blocks,
                                              replica.enable_prefix_caching)
            self.resume = bind(RESUMES[config.policy.preemption], config.knobs)
        self.usable_blocks = replica.usable_blocks
        functions = config.policy.functions()
        self.admits_all = functions["admission"] is admit_fcfs  # no view to build
        self.predictor = bind(functions["predictor"], config.knobs)()
        self.admit, self.choose_victim, self.preemption = (
            bind(functions[axis], config.knobs) for axis in ("admission", "victim", "preemption"))

        self.decode_runs = config.decode_runs
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
        if self.running.size or self.waiting or self.loading:
            while self.decode_runs and self._run_decode_steps():  # as `step` would
                if self.next_arrival < n and req.arrival_s[self.next_arrival] <= self.now_s:
                    self._enqueue_arrivals()
            executed = self._schedule()
            if len(self.in_flight) < self.queue_size and (
                    executed or self.running.size or self.waiting or self.loading):
                return True  # async: schedule the next step before this one's output
        elif not self.in_flight:
            if self.write_through is not None:  # vLLM schedules once more, empty, to report
                self.write_through.refresh_finished()  # the finished (scheduler.py:2823-2838)
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
        self.requests.sharing = None  # the result holds the requests, not the cache
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
                 int(self.waiting[0]) if self.waiting else
                 next(iter(self.loading)) if self.loading else self.next_arrival)
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
        self.step_swapped: list[int] = []
        self.step_hits: list[tuple[int, int]] = []
        self.step_loaded: list[tuple[int, int]] = []
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
                # (under write-through a victim is dropped; its resume is decided later)
                swaps = (self.preemption(view, view.running) if self.write_through is None
                         else np.zeros(view.running.size, dtype=bool))
                at = self.choose_victim(view, swaps)
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
        """Swap the victim's KV to host memory or drop it (the preemption policy), as kvbench's
        swap connector does inside vLLM (kvbench/vllm/swap_scheduler.py): either way it
        restarts from the prefix cache; a swapped one then loads the rest of its copy, once
        the step that copies it has landed. Under write-through offloading it is dropped: what
        the host holds of it is looked up when it starts again (`_admit_offloaded`)."""
        req = self.requests
        computed = int(req.computed_tokens[victim])
        swap = computed and self.write_through is None and self.preemption(
            self.view(self.running), self.requests.view(np.array([victim])))[0]
        req.recompute_target_tokens[victim] = max(int(req.recompute_target_tokens[victim]),
                                                  computed)
        req.computed_tokens[victim] = 0
        req.state[victim] = WAITING
        if swap:
            filled = cdiv(computed, self.block_size)  # blocks allocated in this step are empty
            self.free_cpu_blocks -= filled
            req.cpu_blocks[victim] = filled
            req.swap_tokens[victim] = computed
            req.state[victim] = SWAPPED
            req.num_swaps[victim] += 1
            req.swapped_bytes[victim] += filled * self.block_bytes
            self.step_swap_ms += float(self.costs.swap_out_ms(computed))
            self.step_swapped.append(victim)
        self.kv.free(victim, preempted=True)
        req.placeholders[victim] = 0  # an output in flight arrives stale (scheduler.py:1600)
        req.num_preemptions[victim] += 1
        self.waiting.appendleft(victim)
        self.step_preempted.append(victim)

    def _policy_admits(self, i: int, reads: set[str] | None = None) -> bool:
        """Whether the admission policy admits waiting request `i` now; `reads` collects the
        request columns it read."""
        return not self.running.size or self.admits_all or bool(self.admit(
            self.view(self.running, reads), self.requests.view(np.array([i]), reads)))

    def _admit_waiting(self, budget: int, admitted: int | None) -> tuple[list[int], list[int]]:
        """Admit waiting requests in order while they fit and the policy agrees (`admitted`: a
        request the policy has admitted in this very state)."""
        if self.write_through is not None:
            return self._admit_offloaded(budget)
        kv = self.kv
        ids: list[int] = []
        tokens: list[int] = []
        while self.waiting and budget > 0 and self.running.size < self.replica.max_num_seqs:
            i = self.waiting[0]
            fit = kv.can_admit(i, budget, kv.num_free, self.running.size > 0)
            if fit is None or (i != admitted and not self._policy_admits(i)):
                break
            self.waiting.popleft()
            ids.append(i)
            tokens.append(self._start(i, fit))
            budget -= tokens[-1]
        return ids, tokens

    def _start(self, i: int, fit: tuple[list[int], int, int, int]) -> int:
        """Waiting request `i` runs from this step, as `KVCacheManager.can_admit` fitted it;
        returns the tokens it computes in the step."""
        req, kv = self.requests, self.kv
        hits, computed, num_tokens, blocks = fit
        if req.state[i] == SWAPPED:
            self._swap_in(i, len(hits) * self.block_size, computed)
        req.state[i] = RUNNING
        kv.admit(i, hits, computed, blocks)
        req.computed_tokens[i] = computed
        if hits:
            self.step_hits.append((i, len(hits) * self.block_size))
        kv.cache_one(i, computed + num_tokens)
        self.running = np.concatenate((self.running, [i]))
        return num_tokens

    def _admit_offloaded(self, budget: int) -> tuple[list[int], list[int]]:
        """`_admit_waiting` under write-through offloading (vLLM scheduler.py:912-1395): first
        the requests whose load has landed (vLLM's kv_holding_waiting queue, :913-917), then the
        waiting queue. A request the connector holds back (its load in flight, :3178-3183; a
        host hit still being stored or loaded, `WriteThrough.lookup`, :986-991) is skipped, not
        waited for. One whose host hit the resume policy takes starts loading it and waits
        (`_start_load`). As in `_admit_waiting`, the first that does not fit or that the
        admission policy refuses (kvbench's plugin asks it in allocate_slots) ends admission."""
        req, kv, bs = self.requests, self.kv, self.block_size
        ids: list[int] = []
        tokens: list[int] = []
        landed = [i for i, done in self.loading.items() if done]
        at = 0  # the waiting queue's first request not skipped
        while budget > 0 and self.running.size < self.replica.max_num_seqs:
            running = self.running.size > 0
            if landed:
                i = landed[0]
                fit = kv.can_admit(i, budget, kv.num_free, running, hits=[])
            elif at < len(self.waiting):
                i = self.waiting[at]
                hits = kv.get_computed_blocks(i)
                cached = len(hits) * bs
                host = self.write_through.lookup(i, cached)
                if host is None:
                    at += 1
                    continue
                if host and self.resume(self.view(self.running), np.array([cached]),
                                        np.array([host]))[0]:
                    blocks = kv.blocks_to_admit(i, hits, cached + host, kv.num_free, running,
                                                self._reserved_blocks())
                    if blocks is None or not self._policy_admits(i):
                        break
                    del self.waiting[at]
                    self._start_load(i, hits, cached, host, blocks)
                    continue
                fit = kv.can_admit(i, budget, kv.num_free, running, hits)
            else:
                break
            if fit is None or not self._policy_admits(i):
                break
            if landed:
                del self.loading[landed.pop(0)]
            else:
                del self.waiting[at]
            ids.append(i)
            tokens.append(self._start(i, fit))
            budget -= tokens[-1]
            req.prefilling[i] = fit[1] + tokens[-1] < req.known_tokens(i)
        return ids, tokens

    def _reserved_blocks(self) -> int:
        """The blocks the prefills in flight (vLLM's _inflight_prefills: running requests amid
        a prefill, requests loading) still need for their whole sequence, which an async load
        must leave free (scheduler.py:1241-1251, 3060-3092)."""
        req = self.requests
        ids = np.concatenate([self.running[req.prefilling[self.running]],
                              np.fromiter(self.loading, dtype=np.int64)])
        whole = req.known_tokens(ids)
        if self.replica.max_model_len is not None:
            whole = np.minimum(whole, self.replica.max_model_len)
        return int(np.maximum(cdiv(whole, self.block_size) - req.gpu_blocks[ids], 0).sum())

    def _start_load(self, i: int, hits: list[int], cached: int, host: int, blocks: int) -> None:
        """Write-through: waiting request `i` loads `host` tokens from the host cache past its
        `cached` prefix-cache hit. It takes its blocks now and waits (WAITING_FOR_REMOTE_KVS)
        until the load is reported done with this step's output (scheduler.py:1320-1341); the
        load is priced on this step's clock."""
        req = self.requests
        self.kv.admit(i, hits, cached + host, blocks)
        req.computed_tokens[i] = cached + host
        req.state[i] = LOADING
        self.loading[i] = False
        if hits:
            self.step_hits.append((i, cached))
        self.write_through.start_load(i, cached, host)
        req.loaded_tokens[i] += host
        req.swapped_bytes[i] += host // self.block_size * self.block_bytes
        self.step_swap_ms += float(self.costs.swap_in_ms(host))
        self.step_loaded.append((i, host))

    def _swap_in(self, i: int, cached: int, computed: int) -> None:
        """Swapped victim `i` is admitted with `cached` tokens from the prefix cache and
        `computed` in all: it loads the difference (none: a fallback if its copy was not yet
        reported, or the prefix cache held it all); its host blocks are free again."""
        req = self.requests
        self.free_cpu_blocks += int(req.cpu_blocks[i])
        req.cpu_blocks[i] = 0
        loaded = computed - cached
        if loaded:
            bs = self.block_size
            req.loaded_tokens[i] += loaded
            req.swapped_bytes[i] += (cdiv(computed, bs) - cached // bs) * self.block_bytes
            self.step_swap_ms += float(self.costs.swap_in_ms(loaded))
            self.step_loaded.append((i, loaded))
        elif not req.loadable_tokens[i]:
            req.swap_fallbacks[i] += 1  # resumed before its copy was reported done
        req.loadable_tokens[i] = req.swap_tokens[i] = 0

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
        num_decode = int(np.count_nonzero(decode))
        executed = bool(ids.size or self.step_loaded)  # (a load runs without a forward pass)
        if self.write_through is not None:
            req.prefilling[ids] = ~samples  # (scheduler.py:1634-1642)
            self._store(ids, end)
        p_start = p_end = None  # the prefill chunks
        if num_decode < ids.size:
            # Positions below the recompute target had KV that a preemption dropped; only
            # prefill chunks reach them (a resumed request recomputes before it decodes).
            prefill = ~decode
            p_ids, p_start, p_end = ids[prefill], start[prefill], end[prefill]
            redo, redo_tokens, redo_flops = self.model.recomputation(
                p_start, p_end, req.recompute_target_tokens[p_ids])
            if redo_tokens.size:
                r_ids, r_start = p_ids[redo], p_start[redo]
                req.recompute_tokens[r_ids] += redo_tokens
                req.wasted_flops[r_ids] += redo_flops
                self.recompute_flops += float(redo_flops.sum())
                self.recompute_ms += self.pricer.recompute_ms(r_start, r_start + redo_tokens)
        start_s = self.now_s
        if executed:
            step_ms, flops = self.pricer.step(start, end, p_start, p_end, int(tokens.sum()),
                                              samples, decode, num_decode, self.step_swap_ms)
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
            for name, events in (("cached", self.step_hits), ("loaded", self.step_loaded)):
                if events:
                    self.log.add_events(name, log_step, [i for i, _ in events],
                                        [t for _, t in events])
            if self.step_swapped:
                self.log.add_events("swapped", log_step, self.step_swapped)
        end_s = self.gpu_free_s if executed else self.now_s
        transfers = self.write_through.take_step() if self.write_through is not None else None
        self.in_flight.appendleft(Batch(ids, samples, end_s, log_step, tuple(self.step_swapped),
                                        transfers))
        return executed

    def _store(self, ids: np.ndarray, end: np.ndarray) -> None:
        """Write-through: the step that computes positions up to `end` of requests `ids` copies
        their new full prompt blocks to the host (`WriteThrough.store`), priced on its clock
        (vLLM overlaps the copies with the next step's forward pass; kvbench/sim/
        write_through.py, Timing)."""
        req = self.requests
        jobs, stored = self.write_through.store(ids, end)
        if jobs.size:
            req.stored_tokens[jobs] += stored
            req.swapped_bytes[jobs] += stored // self.block_size * self.block_bytes
            self.step_swap_ms += float(self.costs.swap_out_ms(stored).sum())

    # -----------------------------------------------------------------------------------------
    # Output: sample tokens, finish requests

    def _process_output(self, batch: Batch) -> None:
        """A step's tokens arrive (vLLM's update_from_output): one per sampling request, also
        for a request preempted since (a stale output, scheduler.py:2080-2103)."""
        req = self.requests
        used = self.kv.num_used
        for i in batch.swapped:  # the worker reports the copies with the step's output
            if req.state[i] == SWAPPED:
                req.loadable_tokens[i] = req.swap_tokens[i]
        if batch.transfers is not None:
            self._land(batch.transfers)
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

    def _land(self, transfers: StepTransfers) -> None:
        """Write-through: a step's stores and loads are reported done with its output. A
        request whose load landed registers the loaded blocks in the prefix cache and will
        compute at least its last token again (scheduler.py:3123-3173)."""
        req = self.requests
        for i in self.write_through.land(transfers):
            self.loading[i] = True
            computed = int(req.computed_tokens[i])
            self.kv.cache_one(i, computed)
            req.computed_tokens[i] = min(computed, int(req.known_tokens(i)) - 1)

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
                req.cpu_blocks[i] = req.loadable_tokens[i] = req.swap_tokens[i] = 0
        req.state[finished] = FINISHED
        self.num_done += finished.size
        if was_running.any():
            self.running = self.running[req.state[self.running] == RUNNING]
        self.predictor.observe(req.prompt_tokens[finished], req.output_tokens[finished])
        if self.write_through is not None:
            self.write_through.finish(finished)
        self.kv.forget(finished)
        if self.log is not None and log_step is not None:
            self.log.add_events("finished", log_step, finished.tolist())


def simulate(workload: Workload, config: SimConfig = SimConfig(), costs: Costs | None = None,
             progress: Callable[[int], None] | None = None) -> SimResult:
    """Simulate `workload` on one replica under `config`; see the module docstring."""
    return Simulator(workload, config, costs).run(progress)
