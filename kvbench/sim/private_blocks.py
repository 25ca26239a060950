"""vLLM's block pool with prefix caching when no request can find another's blocks.

When no two requests' first blocks hash alike (`PrefixHashes.first_blocks_distinct`, true of the
default random prompts), a lookup can only find the looking request's own blocks, and a request
looks up only while it waits, after a preemption freed its blocks. So the only blocks a lookup
can find are those a preemption freed. `PrivatePrefixPool` keeps the free queue exactly as
`PrefixCachePool` does (unhashed blocks counted, hashed ones in the order they were freed) but
names only the blocks a preemption freed:

* a running request's blocks are a count; its registered blocks are entered in the hash index
  when a preemption frees them (in the order `PrefixCachePool` would have registered them: a
  request's copies of a hash in the order of its lives);
* the hashed blocks a finished request frees join the queue as an anonymous run: nobody can find
  them, and eviction takes them by number from the front like any other;
* a lookup of a request never preempted finds nothing without hashing its tokens.

Block ids are labels: a block evicted from the queue starts its next life unnamed, and is named
afresh if a preemption frees it registered. The schedules are the same as with `PrefixCachePool`
(tests/sim/test_engine.py runs both).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from kvbench.sim.blocks import PrefixCachePool, PrefixHashes


class _Run:
    """Consecutive hashed blocks of the free queue: `count` of them, named in `blocks` (front
    first; an entry whose block left the queue since is skipped) or anonymous (None)."""

    __slots__ = ("count", "blocks")

    def __init__(self, count: int, blocks: deque[int] | None = None) -> None:
        self.count, self.blocks = count, blocks


class PrivatePrefixPool(PrefixCachePool):
    """See the module docstring. Same interface as `PrefixCachePool`; `free` is told how many
    of the request's first blocks are registered and whether it may come back (a preemption)."""

    names_blocks = False  # allocations by number, nothing registered while it runs: `free`
    # registers what a preemption frees

    def __init__(self, num_blocks: int, hashes: PrefixHashes) -> None:
        super().__init__(num_blocks, hashes)
        self.queue: deque[_Run] = deque()
        self.num_hashed_free = 0
        self.run_of: dict[int, _Run] = {}  # named block in the queue -> its run
        self.named: dict[int, list[int]] = {}  # running request -> its hit blocks (its first)
        self.preempted: set[int] = set()  # requests whose blocks a preemption freed

    @property
    def num_free(self) -> int:
        return self.num_unhashed_free + self.num_hashed_free

    def allocate(self, request: int, num_blocks: int) -> None:
        """Take `num_blocks` blocks from the front of the free queue (whoever takes them)."""
        fresh = min(num_blocks, self.num_unhashed_free)
        self.num_unhashed_free -= fresh
        evict = num_blocks - fresh
        self.num_hashed_free -= evict
        queue, run_of = self.queue, self.run_of
        while evict:
            run = queue[0]
            if run.blocks is None:
                taken = min(evict, run.count)
                run.count -= taken
                evict -= taken
            else:
                while evict and run.count:
                    block = run.blocks.popleft()
                    if run_of.get(block) is run:
                        del run_of[block]
                        self._uncache(block, self.block_hash[block])
                        run.count -= 1
                        evict -= 1
            if not run.count:
                queue.popleft()

    def allocate_each(self, requests: np.ndarray, num_blocks: np.ndarray) -> None:
        self.allocate(-1, int(num_blocks.sum()))

    def register(self, request: int, start: int, end: int) -> None:
        """Nothing is registered while a request runs (see `free`)."""

    def free(self, request: int, num_blocks: int, registered: int = 0,
             reusable: bool = False) -> None:
        """Free `request`'s blocks, the first `registered` of them hashed; `reusable`: it was
        preempted and may find them again."""
        named = self.named.pop(request, [])
        self.num_unhashed_free += num_blocks - registered
        if not registered:
            return
        self.num_hashed_free += registered
        if not reusable:
            for block in named:
                self._uncache(block, self.block_hash[block])
            self.preempted.discard(request)
            if self.queue and self.queue[-1].blocks is None:
                self.queue[-1].count += registered
            else:
                self.queue.append(_Run(registered))
            return
        first = self._next_id
        self._next_id += registered - len(named)
        blocks = named + list(range(first, self._next_id))
        self._register(blocks, self.hashes.of(request), len(named), registered)
        run = _Run(registered, deque(reversed(blocks)))  # freed tail first
        self.run_of.update(dict.fromkeys(blocks, run))
        self.queue.append(run)
        self.preempted.add(request)

    def lookup(self, request: int, num_tokens: int) -> list[int]:
        if request not in self.preempted:
            return []
        return super().lookup(request, num_tokens)

    def num_evictable(self, blocks: list[int]) -> int:
        return sum(block in self.run_of for block in blocks)

    def touch(self, request: int, blocks: list[int]) -> None:
        """Take the hit blocks (all in the free queue) out of it, as `request`'s first."""
        for block in blocks:
            self.run_of.pop(block).count -= 1
        self.num_hashed_free -= len(blocks)
        self.named[request] = list(blocks)
