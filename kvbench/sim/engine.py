"""Iteration-level simulation of one serving replica with a paged KV cache (vLLM V1 style).

Each step (one forward pass of the batch):

1. arrivals up to now join the waiting queue, each with a predicted output length;
2. running requests are scheduled in admission order, each for its missing tokens (1 in
   decode, a chunk of a prompt or of a recomputation), within `max_num_batched_tokens`. A
   request that needs a new KV block when none is free preempts victims (victim policy) until
   the block fits, or is itself the victim, which ends this step's scheduling of running
   requests. Each victim is swapped to CPU memory or dropped for recomputation (preemption
   mode) and goes to the front of the waiting queue;
3. if nothing was preempted, waiting requests are admitted in order while the admission policy
   agrees (see `kvbench.sim.policies`): a swapped request swaps back in, a recomputed one
   prefills its prompt and generated tokens again;
4. the step's time is priced by the profile and the clock advances; every request whose known
   tokens are all computed samples a token; finished requests free their blocks.

Step time (ms) is the sum of

* prefill: for each chunk of c tokens after x cached ones, recompute_ms(x + c) - recompute_ms(x)
  (the recompute cost model, incremental; the fixed cost is paid once, by the first chunk);
* decode: DecodeModel.step_ms(B, mean context) over the B requests generating one token;
* swap transfers: a swap-out costs half of swap_ms(n) (the model's round trip) and is paid in
  the step that frees the blocks, the swap-in the other half in the step the request resumes.

Transfers and compute do not overlap, and a step with both prefill and decode pays both in
full (the weights are read twice): both err on the slow side.

FLOPs use `ModelSpec`: a chunk costs linear_flops_per_token·c + attention_flops_per_token_sq·
((x + c)² - x²), plus lm_head_flops when it samples a token. Recomputed FLOPs are those spent
on positions whose KV a recompute preemption threw away.

GPU blocks: `gpu_blocks` if given, else (gpu_memory_gib · gpu_memory_utilization - weights) /
block bytes, as vLLM sizes its cache (activation memory ignored); the memory defaults to the
hardware preset's (80 GiB for an H100). CPU swap space: `cpu_swap_blocks`, else cpu_swap_gib
(vLLM's default, 4 GiB). A request whose prompt + output can never fit the whole cache (or,
without chunked prefill, the token budget) is rejected up front with the reason. If no token
is generated for `livelock_steps` iterations (steps, or jumps to an arrival that do not move
the clock on) the run stops and reports the stuck request.

Speed: while the waiting queue is empty and every running request decodes, the steps up to
the next event are applied at once (`_skip_decode_steps`), with the same arithmetic.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvbench.hardware import get_hardware
from kvbench.sim.config import SimConfig, SimCosts
from kvbench.sim.policies import ADMISSION, PREEMPTIONS, VICTIMS
from kvbench.sim.predictors import PREDICTORS
from kvbench.sim.requests import (
    FINISHED,
    REJECTED,
    RUNNING,
    STATE_NAMES,
    SWAPPED,
    WAITING,
    RequestTable,
    cdiv,
)
from kvbench.sim.steptime import CostStepTime, parse_step_time
from kvbench.sim.view import StateView
from kvbench.sim.workloads import Workload

GIB = 1 << 30
PROGRESS_EVERY_STEPS = 2000


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


class Simulator:
    """One replica under one policy combination; `run()` simulates the whole workload."""

    def __init__(self, workload: Workload, config: SimConfig = SimConfig(),
                 costs: SimCosts | None = None) -> None:
        self.config = config
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
        self.num_cpu_blocks = (config.cpu_swap_blocks if config.cpu_swap_blocks is not None
                               else int(config.cpu_swap_gib * GIB // self.block_bytes))
        self.requests = RequestTable(workload)
        predictor = PREDICTORS[config.predictor]
        self.predictor = predictor(**config.knobs(predictor))
        self.admit, self.choose_victim, self.preemption = (
            functools.partial(fn, **config.knobs(fn)) for fn in (
                ADMISSION[config.admission], VICTIMS[config.victim],
                PREEMPTIONS[config.preemption]))

        self.now_s = 0.0
        self.free_gpu_blocks = self.num_gpu_blocks
        self.free_cpu_blocks = self.num_cpu_blocks
        self.running = np.zeros(0, dtype=np.int64)  # ids in admission order
        self.waiting: deque[int] = deque()
        self.next_arrival = 0
        self.steps = 0
        self.steps_without_token = 0
        self.livelock: dict | None = None
        self.busy_ms = self.recompute_ms = self.swap_ms = self.step_swap_ms = 0.0
        self.flops = self.recompute_flops = 0.0
        self.max_kv_blocks_used = 0
        self.timeline: list[tuple[float, int, int]] = []
        self._reject_impossible()
        self.num_done = len(self.requests.reject_reason)  # finished or rejected

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
        """Advance by one step (or jump to the next arrival); False when the run is over."""
        req, n = self.requests, self.requests.size
        if self.next_arrival < n and req.arrival_s[self.next_arrival] <= self.now_s:
            self._enqueue_arrivals()
        if not self.running.size and not self.waiting:
            if self.next_arrival >= n:
                return False
            arrival_s = float(req.arrival_s[self.next_arrival])
            # The guard counts iterations: a jump that does not move the clock on (a NaN time)
            # generates no token either.
            self.steps_without_token += not arrival_s > self.now_s
            self.now_s = arrival_s
            return self._below_livelock_limit()
        if not self.waiting and self._skip_decode_steps() and self.next_arrival < n \
                and req.arrival_s[self.next_arrival] <= self.now_s:
            self._enqueue_arrivals()
        self.step_swap_ms = 0.0
        ids, tokens, budget, preempted = self._schedule_running()
        if not preempted:
            new_ids, new_tokens = self._admit_waiting(budget)
            if new_ids:
                ids = np.concatenate([ids, np.array(new_ids, dtype=np.int64)])
                tokens = np.concatenate([tokens, np.array(new_tokens, dtype=np.int64)])
        used = self.num_gpu_blocks - self.free_gpu_blocks
        self.max_kv_blocks_used = max(self.max_kv_blocks_used, used)
        self._execute(ids, tokens)
        self.steps += 1
        self.timeline.append((self.now_s, used, self.running.size))
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
            timeline_running=timeline[:, 2].astype(np.int64), livelock=self.livelock)

    def view(self, running: np.ndarray) -> StateView:
        """What the policies see, with `running` (ids in admission order) as the batch."""
        return StateView(running=self.requests.view(running), block_size=self.block_size,
                         num_gpu_blocks=self.num_gpu_blocks, free_cpu_blocks=self.free_cpu_blocks,
                         block_bytes=self.block_bytes, costs=self.costs)

    # -----------------------------------------------------------------------------------------
    # Arrivals, rejection, livelock

    def _reject_impossible(self) -> None:
        req, cfg = self.requests, self.config
        total = req.prompt_tokens + req.output_tokens
        too_big = cdiv(total, self.block_size) > self.num_gpu_blocks
        for i in np.flatnonzero(too_big).tolist():
            req.reject_reason[i] = (f"prompt + output = {total[i]} tokens need "
                                    f"{cdiv(int(total[i]), self.block_size)} KV blocks; the "
                                    f"cache has {self.num_gpu_blocks}")
        if not cfg.chunked_prefill:
            too_long = ~too_big & (total > cfg.max_num_batched_tokens)
            for i in np.flatnonzero(too_long).tolist():
                req.reject_reason[i] = (f"prompt + output = {total[i]} tokens exceed "
                                        f"max_num_batched_tokens ({cfg.max_num_batched_tokens})"
                                        " and chunked prefill is off")
        req.state[list(req.reject_reason)] = REJECTED

    def _enqueue_arrivals(self) -> None:
        req = self.requests
        end = int(np.searchsorted(req.arrival_s, self.now_s, side="right"))
        ids = np.arange(self.next_arrival, end)
        self.next_arrival = end
        ids = ids[req.state[ids] != REJECTED]
        req.predicted_output_tokens[ids] = self.predictor.predict(
            ids, req.prompt_tokens[ids], req.max_tokens[ids], req.output_tokens[ids])
        req.state[ids] = WAITING
        self.waiting.extend(ids.tolist())

    def _below_livelock_limit(self) -> bool:
        if self.steps_without_token < self.config.livelock_steps:
            return True
        self._report_livelock()
        return False

    def _report_livelock(self) -> None:
        stuck = (int(self.running[0]) if self.running.size else
                 int(self.waiting[0]) if self.waiting else self.next_arrival)
        req = self.requests
        self.livelock = {
            "step": self.steps, "time_s": self.now_s, "request_id": stuck,
            "reason": (f"no token generated in {self.steps_without_token} steps; request "
                       f"{stuck} ({STATE_NAMES[req.state[stuck]]}, "
                       f"{req.computed_tokens[stuck]}/{req.known_tokens(stuck)} tokens computed, "
                       f"{self.free_gpu_blocks} of {self.num_gpu_blocks} blocks free) "
                       "makes no progress"),
        }

    # -----------------------------------------------------------------------------------------
    # Scheduling

    def _schedule_running(self) -> tuple[np.ndarray, np.ndarray, int, bool]:
        """Tokens for running requests in order; preempt when a block is missing (vLLM V1).

        Returns the scheduled ids, their token counts, the token budget left and whether any
        request was preempted.
        """
        req, bs, budget = self.requests, self.block_size, self.config.max_num_batched_tokens
        run = self.running
        if not run.size:
            return run, run, budget, False
        computed = req.computed_tokens[run]
        want = req.known_tokens(run) - computed
        if int(want.sum()) <= budget:
            tokens = want
        else:  # vLLM gives each request what is left of the budget, in order
            tokens = np.clip(budget - (np.cumsum(want) - want), 0, want)
        need = cdiv(computed + tokens, bs) - req.gpu_blocks[run]  # >= 0: blocks = cdiv(computed)
        cum_need = np.cumsum(need)
        if cum_need[-1] <= self.free_gpu_blocks:  # the common case: everything fits
            req.gpu_blocks[run] += need
            self.free_gpu_blocks -= int(cum_need[-1])
            if tokens is want:
                return run, tokens, budget - int(tokens.sum()), False
            scheduled = tokens > 0
            return run[scheduled], tokens[scheduled], budget - int(tokens.sum()), False
        # Requests before `first` fit; from `first` on, request by request with preemption.
        first = int(np.searchsorted(cum_need, self.free_gpu_blocks, side="right"))
        req.gpu_blocks[run[:first]] += need[:first]
        self.free_gpu_blocks -= int(cum_need[first - 1]) if first else 0
        order = run.tolist()
        done = tokens[:first].tolist()  # tokens of order[:pos], all scheduled
        budget -= int(sum(done))
        pos = first
        while pos < len(order) and budget > 0:
            i = order[pos]
            computed = int(req.computed_tokens[i])
            num_tokens = min(int(req.known_tokens(i)) - computed, budget)
            num_new = cdiv(computed + num_tokens, bs) - int(req.gpu_blocks[i])
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
            req.gpu_blocks[i] += num_new
            self.free_gpu_blocks -= num_new
            done.append(num_tokens)
            budget -= num_tokens
            pos += 1
        self.running = np.array(order, dtype=np.int64)
        return (self.running[:len(done)], np.array(done, dtype=np.int64), budget, True)

    def _preempt(self, victim: int) -> None:
        req = self.requests
        blocks = int(req.gpu_blocks[victim])
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
        req.gpu_blocks[victim] = 0
        req.num_preemptions[victim] += 1
        self.free_gpu_blocks += blocks
        self.waiting.appendleft(victim)

    def _admit_waiting(self, budget: int) -> tuple[list[int], list[int]]:
        req, cfg, bs = self.requests, self.config, self.block_size
        ids: list[int] = []
        tokens: list[int] = []
        while self.waiting and budget > 0 and self.running.size < cfg.max_num_seqs:
            i = self.waiting[0]
            computed = int(req.computed_tokens[i])
            want = int(req.known_tokens(i)) - computed
            if want > budget and not cfg.chunked_prefill:
                break
            num_tokens = min(want, budget)
            blocks = cdiv(computed + num_tokens, bs)
            if blocks > self.free_gpu_blocks:
                break
            if self.running.size and not self.admit(self.view(self.running),
                                                    req.view(np.array([i]))):
                break
            self.waiting.popleft()
            if req.state[i] == SWAPPED:
                self.free_cpu_blocks += int(req.cpu_blocks[i])
                req.cpu_blocks[i] = 0
                req.swapped_bytes[i] += cdiv(computed, bs) * self.block_bytes
                self.step_swap_ms += float(self.costs.swap_ms(computed)) / 2
            req.state[i] = RUNNING
            req.gpu_blocks[i] = blocks
            self.free_gpu_blocks -= blocks
            self.running = np.append(self.running, i)
            ids.append(i)
            tokens.append(num_tokens)
            budget -= num_tokens
        return ids, tokens

    def _skip_decode_steps(self) -> bool:
        """Run the coming steps at once while they are all plain decode steps; True if any ran.

        With the waiting queue empty and every running request decoding, the next steps only
        grow each request by one token, until the first of: an arrival, a request's last token,
        a request outliving its prediction, or a block that does not fit. Those steps are
        applied together, with the clock advanced step by step exactly as `step` would.
        """
        req, run, bs = self.requests, self.running, self.block_size
        if not run.size or run.size > self.config.max_num_batched_tokens:
            return False
        computed = req.computed_tokens[run]
        generated = req.generated_tokens[run]
        if not (generated > 0).all() or (computed != req.prompt_tokens[run] + generated - 1).any():
            return False
        limit = min(int((req.output_tokens[run] - generated).min()),
                    int((req.predicted_output_tokens[run] - generated).min())) - 1
        if limit < 2:
            return False
        held = int(req.gpu_blocks[run].sum())

        def new_blocks(num_steps: int) -> int:
            return int(cdiv(computed + num_steps, bs).sum()) - held

        if new_blocks(limit) > self.free_gpu_blocks:  # the largest step count whose blocks fit
            low, high = 0, limit
            while low < high:
                mid = (low + high + 1) // 2
                if new_blocks(mid) <= self.free_gpu_blocks:
                    low = mid
                else:
                    high = mid - 1
            limit = low
            if limit < 2:
                return False
        batch = run.size
        total = int(computed.sum())
        means = (total + batch * np.arange(1, limit + 1)) / batch
        next_arrival_s = (float(req.arrival_s[self.next_arrival])
                          if self.next_arrival < req.size else np.inf)
        num_steps = 0
        for step_ms in self.step_time.decode_steps_ms(batch, means).tolist():
            if num_steps and next_arrival_s <= self.now_s:
                break
            self.busy_ms += step_ms
            self.now_s += step_ms / 1e3
            num_steps += 1
        end = computed + num_steps
        self.free_gpu_blocks -= new_blocks(num_steps)
        req.gpu_blocks[run] = cdiv(end, bs)
        req.computed_tokens[run] = end
        req.generated_tokens[run] += num_steps
        model = self.model
        per_token_flops = model.linear_flops_per_token + model.lm_head_flops
        attention_flops = model.attention_flops_per_token_sq * float(
            (end * end - computed * computed).sum())
        self.flops += batch * num_steps * per_token_flops + attention_flops
        self.steps += num_steps
        self.steps_without_token = 0
        used = self.num_gpu_blocks - self.free_gpu_blocks
        self.max_kv_blocks_used = max(self.max_kv_blocks_used, used)
        self.timeline.append((self.now_s, used, batch))
        return True

    # -----------------------------------------------------------------------------------------
    # Execution: price the step, advance the clock, sample tokens, finish requests

    def _execute(self, ids: np.ndarray, tokens: np.ndarray) -> None:
        req, model = self.requests, self.model
        start = req.computed_tokens[ids]
        end = start + tokens
        generated = req.generated_tokens[ids]
        samples = end == req.prompt_tokens[ids] + generated
        decode = samples & (tokens == 1) & (generated > 0)
        num_decode = int(np.count_nonzero(decode))
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
                redo_flops = (model.linear_flops_per_token * (r_end - r_start)
                              + model.attention_flops_per_token_sq * (r_end**2 - r_start**2))
                req.recompute_tokens[r_ids] += r_end - r_start
                req.wasted_flops[r_ids] += redo_flops
                self.recompute_flops += float(redo_flops.sum())
                self.recompute_ms += float(self.step_time.prefill_ms(r_start, r_end).sum())
        if num_decode:
            step_ms += self.step_time.decode_ms(num_decode, float(end[decode].mean()))
        step_ms += self.step_time.fixed_ms
        self.flops += (model.linear_flops_per_token * float(tokens.sum())
                       + model.attention_flops_per_token_sq * float((end * end - start * start)
                                                                    .sum())
                       + model.lm_head_flops * int(np.count_nonzero(samples)))
        self.busy_ms += step_ms
        self.swap_ms += self.step_swap_ms
        self.now_s += step_ms / 1e3
        req.computed_tokens[ids] = end

        sampled = ids[samples]
        if not sampled.size:
            self.steps_without_token += 1
            return
        self.steps_without_token = 0
        req.generated_tokens[sampled] += 1
        generated = req.generated_tokens[sampled]
        req.first_token_s[sampled[generated == 1]] = self.now_s
        outlived = ((generated >= req.predicted_output_tokens[sampled])
                    & (generated < req.output_tokens[sampled]))
        if outlived.any():
            late = sampled[outlived]
            req.predicted_output_tokens[late] = np.minimum(2 * req.generated_tokens[late],
                                                           req.max_tokens[late])
        finished = sampled[generated == req.output_tokens[sampled]]
        if finished.size:
            req.finish_s[finished] = self.now_s
            req.state[finished] = FINISHED
            self.num_done += finished.size
            self.free_gpu_blocks += int(req.gpu_blocks[finished].sum())
            req.gpu_blocks[finished] = 0
            self.running = self.running[req.state[self.running] == RUNNING]
            self.predictor.observe(req.prompt_tokens[finished], req.output_tokens[finished])


def simulate(workload: Workload, config: SimConfig = SimConfig(), costs: SimCosts | None = None,
             progress: Callable[[int], None] | None = None) -> SimResult:
    """Simulate `workload` on one replica under `config`; see the module docstring."""
    return Simulator(workload, config, costs).run(progress)
