"""Iteration-level simulation of one serving replica with a paged KV cache, following the
scheduling rules of a named engine (`kvbench.sim.engines`; default vLLM 0.32's v1 scheduler,
docs/vllm-0.32-scheduler.md), checked step by step against vLLM's own scheduler
(tests/test_vllm_differential.py).

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
on positions whose KV a recompute preemption threw away (prefix-cache hits are not spent).

GPU blocks: `gpu_blocks` if given, else (gpu_memory_gib · gpu_memory_utilization - weights) /
block bytes, as vLLM sizes its cache (activation memory ignored); the memory defaults to the
hardware preset's. With the null block one of them holds no KV. CPU swap space:
`cpu_swap_blocks`, else cpu_swap_gib (4 GiB). A request whose KV can never fit the whole cache
(or, without chunked prefill, whose prompt + output exceed the token budget) is rejected up
front with the reason; `max_model_len` rejects longer prompts and caps generation. If no
token is generated for `livelock_steps` iterations the run stops and reports the stuck request.

Speed: while every running request decodes and no waiting request would be admitted, the
steps up to the next event are applied at once (`_skip_decode_steps`), with the same arithmetic
and the same block allocations in the same order; one run follows another (a request finishing
or outliving its prediction ends one), so a step is scheduled one by one only when it admits,
preempts or prefills. When no two prompts share a first block (the
default random prompts) the prefix cache is kept as counts plus the blocks preemptions freed
(`PrivatePrefixPool`), which schedules exactly as the full block pool (`PrefixCachePool`).
"""

from __future__ import annotations

import bisect
import functools
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvbench.hardware import get_hardware
from kvbench.sim.blocks import CountingPool, PrefixCachePool, PrefixHashes
from kvbench.sim.config import SimConfig, SimCosts
from kvbench.sim.policies import ADMISSION, PREEMPTIONS, VICTIMS, admit_fcfs
from kvbench.sim.predictors import PREDICTORS
from kvbench.sim.private_blocks import PrivatePrefixPool
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
from kvbench.sim.steptime import CostStepTime, parse_step_time
from kvbench.sim.tokens import TokenIds, random_token_ids
from kvbench.sim.view import StateView
from kvbench.sim.workloads import Workload

GIB = 1 << 30
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
                 costs: SimCosts | None = None, tokens: TokenIds | None = None,
                 record: bool = False) -> None:
        self.config = config
        self.rules = rules = config.rules
        self.workload = workload
        if costs is None:
            costs = SimCosts.analytic(config.model, config.hardware, config.block_size)
        self.sim_costs = costs
        self.model, self.costs = costs.model, costs.costs
        self.step_time = (parse_step_time(config.step_time)
                          or CostStepTime(costs.costs, costs.decode))
        self.block_size = config.block_size
        self.block_bytes = float(config.block_size * self.model.kv_bytes_per_token)
        if config.gpu_blocks is not None:
            self.num_gpu_blocks = config.gpu_blocks
        else:
            memory_gib = config.gpu_memory_gib or get_hardware(config.hardware).memory_gib
            kv_bytes = memory_gib * GIB * config.gpu_memory_utilization - self.model.weight_bytes
            self.num_gpu_blocks = int(kv_bytes // self.block_bytes)
            if self.num_gpu_blocks < 1:
                raise ValueError(
                    f"{self.model.name} weights ({self.model.weight_bytes / GIB:.1f} GiB) leave "
                    f"no KV cache in {memory_gib:g} GiB x {config.gpu_memory_utilization:g}; "
                    "give gpu_blocks or more GPU memory")
        self.usable_blocks = self.num_gpu_blocks - int(rules.null_block)
        if self.usable_blocks < 1:
            raise ValueError(f"{self.num_gpu_blocks} GPU block(s) leave none beside vLLM's null "
                             "block; give more blocks")
        self.watermark_blocks = int(rules.watermark * self.num_gpu_blocks)
        self.num_cpu_blocks = (config.cpu_swap_blocks if config.cpu_swap_blocks is not None
                               else int(config.cpu_swap_gib * GIB // self.block_bytes))
        self.requests = RequestTable(workload)
        if rules.prefix_caching:
            tokens = tokens if tokens is not None else random_token_ids(workload, config.seed)
            tokens.check(workload)
            hashes = PrefixHashes(tokens, self.requests.output_tokens, self.block_size)
            # No request can find another's blocks: hits are its own, kept since a preemption.
            self.private_prefixes = hashes.first_blocks_distinct()
            pool = PrivatePrefixPool if self.private_prefixes else PrefixCachePool
            self.pool: CountingPool | PrefixCachePool = pool(self.usable_blocks, hashes)
        else:
            self.private_prefixes = True  # nothing is found again
            self.pool = CountingPool(self.usable_blocks)
        self.admits_all = ADMISSION[config.admission] is admit_fcfs  # no view to build
        predictor = PREDICTORS[config.predictor]
        self.predictor = predictor(**config.knobs(predictor))
        self.admit, self.choose_victim, self.preemption = (
            functools.partial(fn, **config.knobs(fn)) for fn in (
                ADMISSION[config.admission], VICTIMS[config.victim],
                PREEMPTIONS[config.preemption]))

        self.now_s = 0.0
        self.gpu_free_s = 0.0  # when the last step launched ends
        self.in_flight: deque[Batch] = deque()
        self.admitted_head: int | None = None  # see `_admit_waiting`
        self.queue_size = 2 if rules.async_scheduling else 1  # batches in flight at most
        self.free_cpu_blocks = self.num_cpu_blocks
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
        self.log = StepLogBuilder(engine=f"kvbench {rules.name}") if record else None
        self._reject_impossible()
        # The request ends at its length limit (max_tokens or max_model_len): under async
        # scheduling vLLM skips it while its last token is in flight (`_wanted_tokens`).
        req = self.requests
        self.stops_at_limit = (req.prompt_tokens + req.output_tokens
                               >= np.minimum(req.max_total_tokens,
                                             config.max_model_len or np.iinfo(np.int64).max))
        self.num_done = len(self.requests.reject_reason)  # finished or rejected

    @property
    def free_gpu_blocks(self) -> int:
        return self.pool.num_free

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
            while self._skip_decode_steps():  # runs of steps, each one as `step` would be
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
            profile_source=self.sim_costs.source, num_gpu_blocks=self.num_gpu_blocks,
            num_cpu_blocks=self.num_cpu_blocks, block_bytes=self.block_bytes,
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
        req, cfg, rules = self.requests, self.config, self.rules
        if cfg.max_model_len is not None:
            too_long = req.prompt_tokens >= cfg.max_model_len
            for i in np.flatnonzero(too_long).tolist():
                req.reject_reason[i] = (f"prompt of {req.prompt_tokens[i]} tokens is not shorter "
                                        f"than max_model_len ({cfg.max_model_len})")
            np.minimum(req.output_tokens, np.maximum(cfg.max_model_len - req.prompt_tokens, 1),
                       out=req.output_tokens)
        # The last token is sampled, never fed back: its KV is never computed.
        kv_tokens = req.prompt_tokens + req.output_tokens - 1
        too_big = (cdiv(kv_tokens, self.block_size) > self.usable_blocks) & (req.state != REJECTED)
        for i in np.flatnonzero(too_big).tolist():
            req.reject_reason[i] = (f"{kv_tokens[i]} tokens of KV need "
                                    f"{cdiv(int(kv_tokens[i]), self.block_size)} blocks; the "
                                    f"cache has {self.usable_blocks}")
        if not cfg.chunked_prefill:
            total = req.prompt_tokens + req.output_tokens
            too_long = ~too_big & (total > rules.max_num_batched_tokens)
            for i in np.flatnonzero(too_long).tolist():
                req.reject_reason[i] = (f"prompt + output = {total[i]} tokens exceed "
                                        f"max_num_batched_tokens ({rules.max_num_batched_tokens})"
                                        " and chunked prefill is off")
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
        used = self.usable_blocks - self.free_gpu_blocks
        self.max_kv_blocks_used = max(self.max_kv_blocks_used, used)
        return self._launch(ids, tokens)

    def _wanted_tokens(self, run: np.ndarray, computed: np.ndarray) -> np.ndarray:
        """Tokens each running request asks for (vLLM scheduler.py:660-719); `computed` is
        theirs."""
        req = self.requests
        placeholders = req.placeholders[run]
        want = req.known_tokens(run) + placeholders - computed
        if self.rules.async_scheduling:  # its step in flight yields its last token: skip it
            last = (placeholders > 0) & (computed + 2 - placeholders
                                         >= req.max_total_tokens[run])
            want[last] = 0
        if self.config.max_model_len is not None:  # no position past max_model_len - 1
            want = np.minimum(want, self.config.max_model_len - 1 - computed)
        return want

    def _schedule_running(self) -> tuple[np.ndarray, np.ndarray, int, bool]:
        """Tokens for running requests in order; preempt when a block is missing.

        Returns the scheduled ids, their token counts, the token budget left and whether any
        request was preempted.
        """
        req = self.requests
        budget = self.rules.max_num_batched_tokens
        run = self.running
        if not run.size:
            return run, run, budget, False
        computed = req.computed_tokens[run]
        tokens, need = self._tokens_and_blocks(run, computed, budget)
        if int(need.sum()) <= self.free_gpu_blocks:  # the common case: everything fits
            self._allocate(run, need)
            budget -= int(tokens.sum())
            if np.count_nonzero(tokens) < run.size:  # leave out those with nothing to compute
                scheduled = tokens > 0
                run, computed, tokens = run[scheduled], computed[scheduled], tokens[scheduled]
            self._cache_blocks(run, computed + tokens)
            return run, tokens, budget, False
        # The requests whose blocks fit are scheduled at once, up to one whose blocks do not:
        # it preempts victims until they do, or is itself the victim. Then on from the next.
        order = run.tolist()
        done: list[int] = []  # tokens of order[:len(done)] (0: not scheduled)
        while True:
            first = int(np.searchsorted(np.cumsum(need), self.free_gpu_blocks, side="right"))
            fitted = tokens[:first]
            self._allocate(run[:first], need[:first])
            some = fitted > 0
            self._cache_blocks(run[:first][some], computed[:first][some] + fitted[some])
            done += fitted.tolist()
            budget -= int(fitted.sum())
            pos = len(done)
            if pos == len(order) or budget <= 0:
                break
            i, num_tokens, num_new = order[pos], int(tokens[first]), int(need[first])
            while num_new > self.free_gpu_blocks and req.state[i] == RUNNING:
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
            self._allocate_one(i, num_new)
            self._cache_one(i, int(computed[first]) + num_tokens)
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
        return tokens, cdiv(computed + tokens, self.block_size) - self.requests.gpu_blocks[run]

    def _allocate(self, ids: np.ndarray, new_blocks: np.ndarray) -> None:
        """Give each request its new blocks, in order (the order blocks leave the free queue)."""
        self.requests.gpu_blocks[ids] += new_blocks
        if self.pool.tracks_blocks:
            some = np.flatnonzero(new_blocks)
            for i, k in zip(ids[some].tolist(), new_blocks[some].tolist()):
                self.pool.allocate(i, k)
        else:
            self.pool.allocate(-1, int(new_blocks.sum()))

    def _allocate_one(self, i: int, new_blocks: int) -> None:
        self.requests.gpu_blocks[i] += new_blocks
        if new_blocks:
            self.pool.allocate(i, new_blocks)

    def _cache_one(self, i: int, upto_tokens: int) -> None:
        """`_cache_blocks` of one request, in plain ints."""
        if self.pool.caching:
            req = self.requests
            full = min(upto_tokens, int(req.known_tokens(i))) // self.block_size
            if full > req.cached_blocks[i]:
                if self.pool.tracks_blocks:
                    self.pool.cache_blocks(i, int(req.cached_blocks[i]), full)
                req.cached_blocks[i] = full

    def _cache_blocks(self, ids: np.ndarray, upto_tokens: np.ndarray) -> None:
        """Register the full blocks of known tokens among each request's first `upto_tokens`
        (kv_cache_manager.py:606-616; the tokens of a step in flight are not known yet)."""
        if self.pool.caching and ids.size:
            self._cache_full_blocks(ids, np.minimum(upto_tokens, self.requests.known_tokens(ids))
                                    // self.block_size)

    def _cache_full_blocks(self, ids: np.ndarray, full: np.ndarray) -> None:
        """Register each request's first `full` blocks, those not registered yet."""
        req = self.requests
        if not self.pool.tracks_blocks:  # counts only
            req.cached_blocks[ids] = np.maximum(full, req.cached_blocks[ids])
            return
        grow = full > req.cached_blocks[ids]
        for i, upto in zip(ids[grow].tolist(), full[grow].tolist()):
            self.pool.cache_blocks(i, int(req.cached_blocks[i]), upto)
        req.cached_blocks[ids[grow]] = full[grow]

    def _free_blocks(self, i: int, preempted: bool = False) -> None:
        req = self.requests
        self.pool.free(i, int(req.gpu_blocks[i]), int(req.cached_blocks[i]), preempted)
        req.gpu_blocks[i] = 0
        req.cached_blocks[i] = 0

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
        self._free_blocks(victim, preempted=True)
        req.placeholders[victim] = 0  # an output in flight arrives stale (scheduler.py:1600)
        req.num_preemptions[victim] += 1
        self.waiting.appendleft(victim)
        self.step_preempted.append(victim)

    def _fit(self, i: int, budget: int, free: int) -> tuple[list[int], int, int, int] | None:
        """Whether waiting request `i` fits the cache with `free` blocks free and `budget` tokens
        left: its prefix-cache hits, computed tokens after them, tokens to schedule and new
        blocks; None if it does not fit."""
        req, cfg, bs, pool = self.requests, self.config, self.block_size, self.pool
        computed = int(req.computed_tokens[i])
        known = int(req.known_tokens(i))
        hits = self._hits(i)
        computed += len(hits) * bs
        want = known - computed
        if want > budget and not cfg.chunked_prefill:
            return None
        num_tokens = min(want, budget)
        in_queue = pool.num_evictable(hits) if hits else 0
        extra = in_queue + (self.watermark_blocks if self.running.size else 0)
        if self.rules.full_prompt_admission:
            whole = known if cfg.max_model_len is None else min(known, cfg.max_model_len)
            if cdiv(whole, bs) - len(hits) + extra > free:
                return None
        blocks = cdiv(computed + num_tokens, bs) - len(hits)
        if blocks + extra > free:
            return None
        return hits, computed, num_tokens, blocks

    def _hits(self, i: int) -> list[int]:
        """The prefix-cache blocks waiting request `i` would start with."""
        req = self.requests
        if not self.pool.caching or req.computed_tokens[i]:
            return []
        return self.pool.lookup(i, int(req.known_tokens(i)))

    def _policy_admits(self, i: int, reads: set[str] | None = None) -> bool:
        """Whether the admission policy admits waiting request `i` now; `reads` collects the
        request columns it read."""
        return not self.running.size or self.admits_all or bool(self.admit(
            self.view(self.running, reads), self.requests.view(np.array([i]), reads)))

    def _admit_waiting(self, budget: int, admitted: int | None) -> tuple[list[int], list[int]]:
        """Admit waiting requests in order while they fit and the policy agrees (`admitted`: a
        request the policy has admitted in this very state)."""
        req, bs, pool = self.requests, self.block_size, self.pool
        ids: list[int] = []
        tokens: list[int] = []
        while self.waiting and budget > 0 and self.running.size < self.rules.max_num_seqs:
            i = self.waiting[0]
            fit = self._fit(i, budget, self.free_gpu_blocks)
            if fit is None or (i != admitted and not self._policy_admits(i)):
                break
            hits, computed, num_tokens, blocks = fit
            self.waiting.popleft()
            if req.state[i] == SWAPPED:
                self.free_cpu_blocks += int(req.cpu_blocks[i])
                req.cpu_blocks[i] = 0
                req.swapped_bytes[i] += cdiv(computed, bs) * self.block_bytes
                self.step_swap_ms += float(self.costs.swap_ms(computed)) / 2
            req.state[i] = RUNNING
            if hits:
                pool.touch(i, hits)
                req.gpu_blocks[i] = len(hits)
                req.cached_blocks[i] = len(hits)
                req.computed_tokens[i] = computed
                req.prefix_hit_tokens[i] += len(hits) * bs
                self.step_hits.append((i, len(hits) * bs))
            self._allocate_one(i, blocks)
            self._cache_one(i, computed + num_tokens)
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
        req, model = self.requests, self.model
        start = req.computed_tokens[ids]
        end = start + tokens
        output = req.generated_tokens[ids] + req.placeholders[ids]
        samples = end == req.prompt_tokens[ids] + output
        decode = samples & (tokens == 1) & (output > 0)
        num_decode = int(np.count_nonzero(decode))
        executed = bool(ids.size)
        step_ms = self.step_swap_ms
        if num_decode < ids.size:
            prefill = ~decode
            p_ids, p_start, p_end = ids[prefill], start[prefill], end[prefill]
            step_ms += float(self.step_time.prefill_ms(p_start, p_end).sum())
            # Positions below the recompute target had KV that a preemption dropped; only
            # prefill chunks reach them (a resumed request recomputes before it decodes).
            redo_end = np.minimum(p_end, req.recompute_target_tokens[p_ids])
            redo = redo_end > p_start
            if redo.any():
                r_ids, r_start, r_end = p_ids[redo], p_start[redo], redo_end[redo]
                redo_flops = model.chunk_flops(r_start, r_end)
                req.recompute_tokens[r_ids] += r_end - r_start
                req.wasted_flops[r_ids] += redo_flops
                self.recompute_flops += float(redo_flops.sum())
                self.recompute_ms += float(self.step_time.prefill_ms(r_start, r_end).sum())
        if num_decode:  # mean context: an exact integer sum over the count, as numpy's mean
            context = end if num_decode == ids.size else end[decode]
            step_ms += self.step_time.decode_ms(num_decode, int(context.sum()) / num_decode)
        start_s = self.now_s
        if executed:
            step_ms += self.step_time.fixed_ms
            self.flops += (model.linear_flops_per_token * float(tokens.sum())
                           + model.attention_flops_per_token_sq
                           * float((end * end - start * start).sum())
                           + model.lm_head_flops * int(np.count_nonzero(samples)))
            self.busy_ms += step_ms
            self.swap_ms += self.step_swap_ms
            start_s = max(self.now_s, self.gpu_free_s)
            self.gpu_free_s = start_s + step_ms / 1e3
            self.steps += 1
        req.computed_tokens[ids] = end
        if self.rules.async_scheduling:
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
        used = self.usable_blocks - self.free_gpu_blocks
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
        if self.rules.async_scheduling:
            running = state == RUNNING
            running = sampled if np.count_nonzero(running) == sampled.size else sampled[running]
            placeholders = req.placeholders[running] - 1
            req.placeholders[running] = placeholders
            self._cache_blocks(running, req.computed_tokens[running] - placeholders)
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
                self._free_blocks(i)
            else:  # finished by a stale output while waiting
                self.waiting.remove(i)
                self.free_cpu_blocks += int(req.cpu_blocks[i])
                req.cpu_blocks[i] = 0
        req.state[finished] = FINISHED
        self.num_done += finished.size
        if was_running.any():
            self.running = self.running[req.state[self.running] == RUNNING]
        self.predictor.observe(req.prompt_tokens[finished], req.output_tokens[finished])
        if self.pool.caching:
            for i in finished.tolist():
                self.pool.hashes.forget(i)
        if self.log is not None and log_step is not None:
            self.log.add_events("finished", log_step, finished.tolist())

    # -----------------------------------------------------------------------------------------
    # Fast path: runs of plain decode steps

    def _skip_decode_steps(self) -> bool:
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
        of its hashes, which only a request with the same first block can (`private_prefixes`).
        """
        req, run, bs, rules = self.requests, self.running, self.block_size, self.rules
        asynchronous = rules.async_scheduling
        if not run.size or run.size > rules.max_num_batched_tokens:
            return False
        head = self.waiting[0] if self.waiting else None
        if head is not None and not self.private_prefixes:
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
        budget = rules.max_num_batched_tokens - batch
        check_head = head is not None and budget > 0 and batch < rules.max_num_seqs
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
        free = self.free_gpu_blocks
        if check_head:
            admitted = head_admitted(0, free - int(np.count_nonzero(position == 0)))
            req.gpu_blocks[run] = held
            if admitted:  # the step to schedule now admits it: `_admit_waiting` need not ask
                self.admitted_head = head
                return False
        starting = np.bincount(position, minlength=bs).tolist()  # blocks at each position
        taken = list(itertools.accumulate(starting[-step % bs] for step in range(limit)))
        limit = bisect.bisect_right(taken, free)  # steps whose blocks fit
        hits = self._hits(head) if check_head else []
        if hits and self.pool.num_evictable(hits):  # evict none of the head's hits
            limit = min(limit, bisect.bisect_right(taken, self.pool.num_unhashed_free))
        if limit < 1:
            return False
        free_after = [free - blocks for blocks in taken[:limit]]
        total = int(computed.sum())
        means = (total + batch * np.arange(1, limit + 1)) / batch
        next_arrival_s = self._next_arrival_s()
        landed_log_steps = []  # of the steps whose outputs land in the run, in order
        if asynchronous:  # its output is the first to land in the run
            landed_log_steps.append(self.in_flight.pop().log_step)
        num_steps = 0
        step_starts = []
        for step_ms in self.step_time.decode_steps_ms(batch, means).tolist():
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
        self._allocate_decode_run(run, computed, num_steps, taken[num_steps - 1])
        req.computed_tokens[run] = end
        req.generated_tokens[run] = generated = generated + num_steps
        if num_steps == revised:  # requests that reached their predictions in the last landing
            late = outlives & (generated == predicted)
            self._revise_predictions(run[late], generated[late])
        if self.pool.caching:  # all known but the token in flight under async
            self._cache_full_blocks(run, (end - asynchronous) // bs)
        model = self.model
        per_token_flops = model.linear_flops_per_token + model.lm_head_flops
        # sum((c + n)^2 - c^2) over the batch, as an exact integer
        squares = 2 * num_steps * total + batch * num_steps * num_steps
        self.flops += (batch * num_steps * per_token_flops
                       + model.attention_flops_per_token_sq * float(squares))
        self.steps += num_steps
        self.iterations_without_token = 0
        used = self.usable_blocks - self.free_gpu_blocks
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

    def _allocate_decode_run(self, run: np.ndarray, computed: np.ndarray, num_steps: int,
                             num_blocks: int) -> None:
        """Blocks for `num_steps` decode steps of `run` (`num_blocks` in all): in step order,
        then running order."""
        bs = self.block_size
        if not self.pool.tracks_blocks:  # counts
            self.requests.gpu_blocks[run] = cdiv(computed + num_steps, bs)
            self.pool.allocate(-1, num_blocks)
            return
        new = cdiv(computed + num_steps, bs) - self.requests.gpu_blocks[run]
        # Request p needs a new block at step s when computed_p + s - 1 is a multiple of bs.
        first = (-(computed[new > 0]) % bs) + 1  # step of its first new block
        pos = np.repeat(np.flatnonzero(new > 0), new[new > 0])
        offsets = np.arange(pos.size) - np.repeat(np.cumsum(new[new > 0]) - new[new > 0],
                                                  new[new > 0])
        steps = np.repeat(first, new[new > 0]) + offsets * bs
        order = np.lexsort((pos, steps))
        for i in run[pos[order]].tolist():
            self._allocate_one(i, 1)


def simulate(workload: Workload, config: SimConfig = SimConfig(), costs: SimCosts | None = None,
             progress: Callable[[int], None] | None = None) -> SimResult:
    """Simulate `workload` on one replica under `config`; see the module docstring."""
    return Simulator(workload, config, costs).run(progress)
