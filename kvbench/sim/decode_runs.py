"""The simulator's fast path (`SimConfig.decode_runs`, on by default): runs of plain decode
steps applied at once.

While every running request decodes and no waiting request would be admitted, the steps up to
the next event only grow each request by one token. `DecodeRuns._run_decode_steps` applies them
together through the engine's own pricer (`StepPricer.decode_run`) and KV cache manager
(`allocate_decode_run`, `cache_full`), so the schedule, clock, blocks and prefix cache are
those of scheduling the steps one by one; tests/sim/test_engine.py runs both ways. A step is
scheduled one by one only when it admits, preempts or prefills; under write-through offloading
(kvbench/sim/write_through.py) also when it stores, loads or starts a load.
"""

from __future__ import annotations

import bisect
import itertools

import numpy as np

from kvbench.sim.requests import FINISHED, STATIC_COLUMNS, cdiv
from kvbench.sim.result import Batch


class DecodeRuns:
    """The fast path of `kvbench.sim.engine.Simulator` (a mixin: it reads the engine's state)."""

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
        of the hash the head would hit next (`KVCacheManager.may_extend_hit`; none can when no
        two requests share a first block, `KVCacheManager.private_prefixes`).

        Under write-through offloading no step of the run may copy between the GPU and the
        host: no request loads or has a load landing, every running request has offered all its
        prompt blocks (only a store the host had no room for is left to retry), the step in
        flight copies nothing, and the head finds nothing on the host (so it is admitted, or
        not, as without offloading; the host cache does not change during the run).
        """
        req, run, bs, replica = self.requests, self.running, self.block_size, self.replica
        kv = self.kv
        asynchronous = replica.async_scheduling
        if not run.size or run.size > replica.max_num_batched_tokens:
            return False
        head = self.waiting[0] if self.waiting else None
        if head is not None and not kv.private_prefixes and kv.may_extend_hit(head, run):
            return False
        offloading = self.write_through
        if offloading is not None and (self.loading or not offloading.stores_done(run) or (
                head is not None and offloading.lookup(
                    head, len(kv.get_computed_blocks(head)) * bs) != 0)):
            return False
        if asynchronous:  # one decode step of these requests in flight, and of finished ones
            if (len(self.in_flight) != 1 or self.in_flight[0].swapped
                    or self.in_flight[0].transfers is not None):
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
            if self.kv.can_admit(head, budget, free, True) is None:
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
        if offloading is not None:  # as the first step's schedule would
            offloading.refresh_finished()
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
        kv.cache_decode_run(run, end, asynchronous)
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
