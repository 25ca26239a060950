"""The scheduler side of kvbench's swap connector: per victim, swap or recompute, and the plan
of the copies the worker makes (`kvbench.vllm.swap_worker`).

* At preemption (`preempting`, called by the kvbench scheduler's `_preempt_request` before vLLM
  frees the victim's blocks) the preemption policy decides, the simulator's own function over
  the victim's computed tokens: `recompute` never swaps, `swap` swaps while the host pool has
  room, `selector` swaps when the profile prices swap-out + swap-in no dearer than recomputing
  and the host pool has room. A swap reserves ceil(computed / block_size) host blocks and plans
  a swap-out of the victim's first blocks; vLLM then frees them as usual.
* On resume vLLM asks for externally held tokens (`matched`) after its own prefix-cache hit of
  L tokens: a swapped victim offers min(swapped, num_tokens - 1) - L tokens (at least one token
  is computed, as for a prefix hit), loaded synchronously before the step's forward pass. The
  offer stands only once the worker has reported the swap-out done; a victim resumed before
  that (async scheduling resumes it in the next step, before the output of the step that copied
  it has come back) recomputes: the copy was not done in time. A swap-out the worker could not
  make recomputes too.
* `allocated` (vLLM's update_state_after_alloc) turns the offer into a swap-in plan, or drops
  the host copy when nothing is loaded; either way the host blocks are free again.

Every decision, fallback and measured copy goes to the recorder (`kvbench.vllm.instrument`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvbench.costmodel import CostModel
from kvbench.sim.requests import cdiv
from kvbench.sim.view import Requests, StateView
from kvbench.vllm.swap_worker import CopyReport, SwapIn, SwapOut

NO_ROOM, NOT_DONE, COPY_FAILED = "host-full", "copy-not-done", "copy-failed"


@dataclass(slots=True)
class Swapped:
    """A victim whose KV is (being) copied to the host pool."""

    tokens: int  # computed tokens copied
    blocks: int  # host blocks reserved
    done: bool = False  # the worker reported the swap-out
    offered: int = 0  # tokens offered to vLLM at the last `matched`
    local: int = 0  # ... after a prefix-cache hit of this many tokens


class SwapPlanner:
    """Host pool accounting and copy plans of one scheduler (module docstring)."""

    def __init__(self, host_blocks: int, block_size: int, block_bytes: int, costs: CostModel,
                 decide, recorder=None) -> None:
        self.capacity = self.free_blocks = host_blocks
        self.block_size, self.block_bytes, self.costs = block_size, block_bytes, costs
        self.decide = decide  # the preemption policy, bound: (view, victims) -> bool array
        self.recorder = recorder
        self.swapped: dict[str, Swapped] = {}
        self.swap_out: list[SwapOut] = []
        self.swap_in: list[SwapIn] = []
        self.drops: list[str] = []

    def preempting(self, request_id: str, computed_tokens: int, block_ids: list[int]) -> bool:
        """Decide for a victim with `computed_tokens` of KV in `block_ids`; True: swapped."""
        blocks = cdiv(computed_tokens, self.block_size)
        victim = Requests.of(computed_tokens=[computed_tokens], known_tokens=[computed_tokens],
                             blocks=[blocks], predicted_remaining=[1],
                             max_total_tokens=[computed_tokens])
        view = StateView(running=victim, block_size=self.block_size, num_gpu_blocks=0,
                         free_cpu_blocks=self.free_blocks, block_bytes=self.block_bytes,
                         costs=self.costs)
        swap = bool(computed_tokens) and bool(self.decide(view, victim)[0])
        if not swap:
            room = blocks <= self.free_blocks
            reason = ("no-kv" if not computed_tokens else
                      NO_ROOM if not room and self._wanted(view, victim) else "policy")
            self._record(request_id, "decided", decision="recompute", reason=reason,
                         host_blocks=0, **self.predicted(computed_tokens))
            return False
        self.free_blocks -= blocks
        self.swapped[request_id] = Swapped(computed_tokens, blocks)
        self.swap_out.append(SwapOut(request_id, tuple(block_ids[:blocks]), computed_tokens))
        self._record(request_id, "decided", decision="swap", reason="policy", host_blocks=blocks,
                     **self.predicted(computed_tokens))
        return True

    def _wanted(self, view: StateView, victim: Requests) -> bool:
        """Whether the policy would swap with room enough (the fallback's reason)."""
        return bool(self.decide(view._replace(free_cpu_blocks=self.capacity), victim)[0])

    def matched(self, request_id: str, num_tokens: int, local_tokens: int) -> int:
        """Tokens a resuming request can load beyond its `local_tokens` prefix-cache hit."""
        entry = self.swapped.get(request_id)
        if entry is None:
            return 0
        entry.local = local_tokens
        entry.offered = (max(min(entry.tokens, num_tokens - 1) - local_tokens, 0)
                         if entry.done else 0)
        return entry.offered

    def allocated(self, request_id: str, block_ids: list[int], external_tokens: int) -> None:
        """vLLM admitted the request with `external_tokens` to load after its prefix-cache
        hit (the one `matched` was told)."""
        entry = self.swapped.pop(request_id, None)
        if entry is None:
            return
        self.free_blocks += entry.blocks
        if external_tokens:
            first = entry.local // self.block_size
            last = cdiv(entry.local + external_tokens, self.block_size)
            self.swap_in.append(SwapIn(request_id, first, tuple(block_ids[first:last]),
                                       external_tokens))
            self._record(request_id, "resumed", loaded_tokens=external_tokens,
                         fallback=None)
            return
        self.drops.append(request_id)
        # Not done: resumed before the worker reported the copy. Nothing offered: the device's
        # prefix cache still held all of it. Else vLLM loaded nothing (it skips the cache).
        fallback = (NOT_DONE if not entry.done else None if not entry.offered else
                    "not-loaded")
        self._record(request_id, "resumed", loaded_tokens=0, fallback=fallback)

    def finished(self, request_id: str) -> None:
        """The request ended (or was aborted) while swapped: its host copy goes."""
        entry = self.swapped.pop(request_id, None)
        if entry is not None:
            self.free_blocks += entry.blocks
            self.drops.append(request_id)

    def reported(self, reports: list[CopyReport]) -> None:
        """The worker's copies of the last step."""
        for report in reports:
            entry = self.swapped.get(report.request_id)
            if report.direction == "out" and entry is not None:
                if report.ok:
                    entry.done = True
                else:  # nothing to load: the request recomputes when it resumes
                    self.swapped.pop(report.request_id)
                    self.free_blocks += entry.blocks
                    self._record(report.request_id, "resumed", loaded_tokens=0,
                                 fallback=COPY_FAILED, error=report.error)
            self._record(report.request_id, f"copied_{report.direction}", bytes=report.bytes,
                         ms=report.ms, ok=report.ok)

    def take(self) -> tuple[list[SwapOut], list[SwapIn], list[str]]:
        """This step's plans, handed to the worker through the connector metadata."""
        plans = self.swap_out, self.swap_in, self.drops
        self.swap_out, self.swap_in, self.drops = [], [], []
        return plans

    def predicted(self, tokens: int) -> dict[str, float]:
        """The profile's prices of a swap-out, a swap-in and a recompute of `tokens`."""
        n = np.array([tokens])
        return {"swap_out_ms": float(self.costs.swap_out_ms(n)[0]),
                "swap_in_ms": float(self.costs.swap_in_ms(n)[0]),
                "recompute_ms": float(self.costs.recompute_ms(n)[0])}

    def _record(self, request_id: str, event: str, **fields) -> None:
        if self.recorder is not None:
            self.recorder.connector_event(request_id, event, **fields)
