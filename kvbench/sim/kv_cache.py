"""The KV cache manager: the boundary between the scheduler and the block pool, as vLLM 0.32's
(vllm/v1/core/kv_cache_manager.py). The engine asks it whether a waiting request fits
(`can_admit`, with its prefix-cache hits: `get_computed_blocks`; `blocks_to_admit` for a
write-through load's blocks, kvbench/sim/write_through.py), gives requests blocks
(`allocate`, `allocate_decode_run`), registers full blocks in the prefix cache (`cache`) and
frees a request's blocks (`free`); it never touches the pool itself.

The manager owns the pool (one `BlockPool`, kvbench/sim/blocks.py: counts without prefix
caching, `PrivatePrefixPool` when no two prompts share a first block, else the full
`PrefixCachePool`; all three schedule alike), the per-request block columns of the
`RequestTable` (`gpu_blocks` held, `cached_blocks` registered), the watermark and the null
block (one of `num_gpu_blocks` holds no KV).
"""

from __future__ import annotations

import numpy as np

from kvbench.sim.blocks import BlockPool, CountingPool, PrefixCachePool, PrefixHashes
from kvbench.sim.engines import ReplicaSpec
from kvbench.sim.private_blocks import PrivatePrefixPool
from kvbench.sim.requests import RequestTable, cdiv
from kvbench.sim.workloads import TokenIds


class KVCacheManager:
    """Blocks of one replica's cache for the requests of `requests` (module docstring)."""

    def __init__(self, replica: ReplicaSpec, requests: RequestTable,
                 tokens: TokenIds | None) -> None:
        self.replica, self.requests = replica, requests
        self.block_size = replica.block_size
        self.usable_blocks = replica.usable_blocks
        self.watermark_blocks = int(replica.watermark * replica.num_gpu_blocks)
        self.pool: BlockPool
        if replica.enable_prefix_caching:
            hashes = PrefixHashes(tokens, requests.output_tokens, self.block_size)
            # No request can find another's blocks: hits are its own, kept since a preemption.
            self.private_prefixes = hashes.first_blocks_distinct()
            pool = PrivatePrefixPool if self.private_prefixes else PrefixCachePool
            self.pool = pool(self.usable_blocks, hashes)
        else:
            self.private_prefixes = True  # nothing is found again
            self.pool = CountingPool(self.usable_blocks)
        self.caching = self.pool.caching
        # The waiting request last fitted (`can_admit`) and its hit blocks running requests hold.
        self._candidate: tuple[int, int] = (-1, 0)
        if not self.private_prefixes:
            requests.sharing = self

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_used(self) -> int:
        return self.usable_blocks - self.pool.num_free

    # -----------------------------------------------------------------------------------------
    # Admission

    def get_computed_blocks(self, i: int) -> list[int]:
        """The prefix-cache blocks waiting request `i` would start with."""
        req = self.requests
        if not self.caching or req.computed_tokens[i]:
            return []
        return self.pool.lookup(i, int(req.known_tokens(i)))

    def can_admit(self, i: int, budget: int, free: int, running: bool,
                  hits: list[int] | None = None) -> tuple[list[int], int, int, int] | None:
        """Whether waiting request `i` fits with `free` blocks free and `budget` tokens left
        (`running`: other requests run, so the watermark applies): its prefix-cache hits
        (`hits`, if already looked up), computed tokens after them, tokens to schedule and new
        blocks; None if it does not fit (kv_cache_manager.py:509-522)."""
        req, replica, bs = self.requests, self.replica, self.block_size
        computed = int(req.computed_tokens[i])
        known = int(req.known_tokens(i))
        if hits is None:
            hits = self.get_computed_blocks(i)
        if not self.private_prefixes:
            self._candidate = (i, len(hits) - self.pool.num_evictable(hits) if hits else 0)
        computed += len(hits) * bs
        # A swapped victim loads what the prefix cache no longer holds of its copy (the swap
        # connector's get_num_new_matched_tokens), leaving at least one token to compute.
        computed = max(computed, min(int(req.loadable_tokens[i]), known - 1))
        want = known - computed
        if want > budget and not replica.enable_chunked_prefill:
            return None
        num_tokens = min(want, budget)
        blocks = self.blocks_to_admit(i, hits, computed + num_tokens, free, running)
        return None if blocks is None else (hits, computed, num_tokens, blocks)

    def blocks_to_admit(self, i: int, hits: list[int], tokens: int, free: int, running: bool,
                        reserved: int = 0) -> int | None:
        """The new blocks waiting request `i` needs for its first `tokens` tokens beside its
        prefix-cache `hits` and the blocks it holds (those of a write-through load), if they fit
        in `free` blocks less `reserved` (what an async load leaves the prefills in flight,
        scheduler.py:1241-1251) and less the watermark while others run; None if not
        (kv_cache_manager.py:509-579)."""
        req, replica, bs = self.requests, self.replica, self.block_size
        held = len(hits) + int(req.gpu_blocks[i])
        in_queue = self.pool.num_evictable(hits) if hits else 0
        extra = in_queue + (self.watermark_blocks if running else 0)
        if replica.scheduler_reserve_full_isl:
            known = int(req.known_tokens(i))
            whole = known if replica.max_model_len is None else min(known, replica.max_model_len)
            if cdiv(whole, bs) - held + extra > free:
                return None
        blocks = cdiv(tokens, bs) - held
        if blocks + extra > free - reserved:
            return None
        return blocks

    def may_extend_hit(self, head: int, run: np.ndarray) -> bool:
        """Whether a decode step of the running requests `run` might register the block that
        waiting request `head` would hit next, growing its prefix-cache hit (hashes chain over
        whole prefixes, so only a block at the same position can; a registered block is one a
        lookup finds already). Conservative: True for a head that holds computed tokens."""
        req, hashes = self.requests, self.pool.hashes
        if req.computed_tokens[head]:
            return True
        head_hashes = hashes.of(head)
        position = len(self.get_computed_blocks(head))
        if position >= min(len(head_hashes), (int(req.known_tokens(head)) - 1) // self.block_size):
            return False  # its hit can grow no further
        # Running requests that will fill a block there and have not registered it yet.
        full_blocks = (req.prompt_tokens[run] + req.output_tokens[run]) // self.block_size
        unregistered = run[(req.cached_blocks[run] <= position) & (position < full_blocks)]
        wanted = head_hashes[position]
        return any(hashes.of(i)[position] == wanted for i in unregistered.tolist())

    def shared_blocks(self, ids: np.ndarray) -> np.ndarray:
        """`Requests.shared_blocks` of requests `ids`: a running request's leading blocks that
        another request also holds (only hits are shared, and a hit's blocks before it are hits
        too), or the candidate's hit blocks that running requests hold."""
        pool, (candidate, held) = self.pool, self._candidate
        extra_refs = pool.extra_refs
        out = np.zeros(ids.size, dtype=np.int64)
        for k, i in enumerate(ids.tolist()):
            blocks = pool.blocks.get(i)
            if not blocks:
                out[k] = held if i == candidate else 0
                continue
            n = 0
            for block in blocks:
                if block not in extra_refs:
                    break
                n += 1
            out[k] = n
        return out

    def admit(self, i: int, hits: list[int], computed: int, blocks: int) -> None:
        """Give waiting request `i` its hit blocks and `blocks` new ones."""
        req = self.requests
        if self.caching:
            req.prefix_query_tokens[i] += int(req.known_tokens(i))
        if hits:
            self.pool.touch(i, hits)
            req.gpu_blocks[i] = len(hits)
            req.cached_blocks[i] = len(hits)
            req.computed_tokens[i] = computed
            req.prefix_hit_tokens[i] += len(hits) * self.block_size
        self.allocate_one(i, blocks)

    # -----------------------------------------------------------------------------------------
    # Allocation

    def new_blocks(self, ids: np.ndarray, computed: np.ndarray, tokens: np.ndarray
                   ) -> np.ndarray:
        """The blocks each request needs beyond those it holds to compute `tokens` more."""
        return cdiv(computed + tokens, self.block_size) - self.requests.gpu_blocks[ids]

    def allocate(self, ids: np.ndarray, new_blocks: np.ndarray) -> None:
        """Give each request its new blocks, in order (the order blocks leave the free queue)."""
        self.requests.gpu_blocks[ids] += new_blocks
        self.pool.allocate_each(ids, new_blocks)

    def allocate_one(self, i: int, new_blocks: int) -> None:
        self.requests.gpu_blocks[i] += new_blocks
        if new_blocks:
            self.pool.allocate(i, new_blocks)

    def allocate_decode_run(self, run: np.ndarray, computed: np.ndarray, num_steps: int,
                            num_blocks: int) -> None:
        """Blocks for `num_steps` decode steps of `run` (`num_blocks` in all): in step order,
        then running order."""
        bs, req = self.block_size, self.requests
        if not self.pool.names_blocks:  # by number
            req.gpu_blocks[run] = cdiv(computed + num_steps, bs)
            self.pool.allocate(-1, num_blocks)
            return
        new = cdiv(computed + num_steps, bs) - req.gpu_blocks[run]
        grows = new > 0
        # Request p needs a new block at step s when computed_p + s - 1 is a multiple of bs.
        first = (-(computed[grows]) % bs) + 1  # step of its first new block
        pos = np.repeat(np.flatnonzero(grows), new[grows])
        offsets = np.arange(pos.size) - np.repeat(np.cumsum(new[grows]) - new[grows], new[grows])
        steps = np.repeat(first, new[grows]) + offsets * bs
        for i in run[pos[np.lexsort((pos, steps))]].tolist():
            self.allocate_one(i, 1)

    # -----------------------------------------------------------------------------------------
    # Prefix cache

    def cache(self, ids: np.ndarray, upto_tokens: np.ndarray) -> None:
        """Register the full blocks of known tokens among each request's first `upto_tokens`
        (kv_cache_manager.py:606-616; the tokens of a step in flight are not known yet)."""
        if self.caching and ids.size:
            self.cache_full(ids, np.minimum(upto_tokens, self.requests.known_tokens(ids))
                            // self.block_size)

    def cache_one(self, i: int, upto_tokens: int) -> None:
        """`cache` of one request, in plain ints."""
        if self.caching:
            req = self.requests
            full = min(upto_tokens, int(req.known_tokens(i))) // self.block_size
            if full > req.cached_blocks[i]:
                self.pool.register(i, int(req.cached_blocks[i]), full)
                req.cached_blocks[i] = full

    def cache_decode_run(self, run: np.ndarray, end: np.ndarray, in_flight: int) -> None:
        """After a decode run: register the full blocks of all tokens known (all computed but
        `in_flight`, the token of the step in flight under async scheduling)."""
        if self.caching:
            self.cache_full(run, (end - in_flight) // self.block_size)

    def cache_full(self, ids: np.ndarray, full: np.ndarray) -> None:
        """Register each request's first `full` blocks, those not registered yet."""
        if not self.caching:
            return
        req = self.requests
        if not self.pool.names_blocks:  # registered when freed, if ever
            req.cached_blocks[ids] = np.maximum(full, req.cached_blocks[ids])
            return
        grow = full > req.cached_blocks[ids]
        for i, upto in zip(ids[grow].tolist(), full[grow].tolist()):
            self.pool.register(i, int(req.cached_blocks[i]), upto)
        req.cached_blocks[ids[grow]] = full[grow]

    # -----------------------------------------------------------------------------------------
    # Free

    def free(self, i: int, preempted: bool = False) -> None:
        """Free request `i`'s blocks (tail first); a preempted request may find its registered
        ones again."""
        req = self.requests
        self.pool.free(i, int(req.gpu_blocks[i]), int(req.cached_blocks[i]), preempted)
        req.gpu_blocks[i] = 0
        req.cached_blocks[i] = 0

    def forget(self, finished: np.ndarray) -> None:
        """Finished requests never look up again: drop their hashes."""
        if self.caching:
            for i in finished.tolist():
                self.pool.hashes.forget(i)
