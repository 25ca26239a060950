"""The GPU KV block pool, as vLLM 0.32 keeps it (vllm/v1/core/block_pool.py, kv_cache_utils.py).

`CountingPool`: without prefix caching a free block has no content worth keeping, so only the
number of free blocks matters.

`PrefixCachePool`: with prefix caching every full block of known tokens is registered under a
hash of its token prefix (`cache_blocks`) and, once its request frees it, stays in the free
queue as cache until it is reused. The free queue is [blocks without a hash] + [hashed blocks,
oldest freed first]: freed blocks without a hash are prepended (reused first), hashed ones
appended (evicted last, LRU), and new blocks are taken from the front, evicting the hash of a
hashed block (block_pool.py `free_blocks`, `get_new_blocks`). A request's blocks are freed
tail first. A lookup (`lookup`) walks a request's block hashes from the first and stops at the
first one not cached, at most (num_tokens - 1) // block_size blocks (the last token is always
computed again, for its logits); hit blocks found in the free queue leave it when touched.

Blocks without a hash are interchangeable: which of them a request gets does not matter, so
they wait on a stack. Hashes chain over all tokens before
and in the block (`PrefixHashes`), so equal hash means equal token prefix, across requests too.
"""

from __future__ import annotations

import numpy as np

from kvbench.sim.tokens import TokenIds

_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: powers never vanish modulo 2**64
_LENGTH_MIX = np.uint64(0xC2B2AE3D27D4EB4F)


class PrefixHashes:
    """Block hashes of each request's token sequence (prompt, then its generated tokens).

    hash(block j) = sum_{i < (j+1)·bs} token_i · B^i  XOR  (j+1)·M   (mod 2**64): a polynomial
    hash of the whole prefix up to the block's end, so blocks match only with equal prefixes
    (collisions have probability ~2**-64 per pair). Computed once per request, vectorized.
    """

    def __init__(self, tokens: TokenIds, output_tokens: np.ndarray, block_size: int) -> None:
        self.tokens, self.output_tokens, self.block_size = tokens, output_tokens, block_size
        self._cache: dict[int, np.ndarray] = {}
        longest = int(np.diff(tokens.offsets).max() + output_tokens.max()) if output_tokens.size \
            else 0
        with np.errstate(over="ignore"):
            self._powers = np.cumprod(np.full(max(longest, 1), _HASH_BASE, dtype=np.uint64))

    def of(self, request: int) -> np.ndarray:
        hashes = self._cache.get(request)
        if hashes is None:
            prompt = self.tokens.prompt(request).astype(np.uint64)
            out = np.full(int(self.output_tokens[request]), self.tokens.output_token[request],
                          dtype=np.uint64)
            seq = np.concatenate([prompt, out])
            num_blocks = seq.size // self.block_size
            with np.errstate(over="ignore"):
                prefix = np.cumsum(seq * self._powers[:seq.size], dtype=np.uint64)
                ends = prefix[self.block_size - 1:num_blocks * self.block_size:self.block_size]
                lengths = np.arange(1, num_blocks + 1, dtype=np.uint64) * _LENGTH_MIX
            hashes = self._cache[request] = ends ^ lengths
        return hashes

    def forget(self, request: int) -> None:
        """Drop a finished request's hashes (its blocks keep theirs)."""
        self._cache.pop(request, None)


class CountingPool:
    """Free blocks by number only (no prefix caching: freed blocks keep nothing)."""

    caching = False

    def __init__(self, num_blocks: int) -> None:
        self.num_free = num_blocks

    def allocate(self, request: int, num_blocks: int) -> None:
        self.num_free -= num_blocks

    def free(self, request: int, num_blocks: int) -> None:
        self.num_free += num_blocks


class PrefixCachePool:
    """vLLM's block pool with prefix caching (see the module docstring). Blocks of request r
    are `blocks[r]` in order; the engine tracks how many of them are registered.

    Block ids are 0..num_blocks-1, with per-block state in arrays so that a prefill's blocks are
    taken, evicted, registered and freed in a few vectorized operations: `refs` (requests
    holding the block), `hashed`/`hash_of` (registered, under which hash). Free blocks without
    a hash sit on a stack (interchangeable). The free queue of hashed blocks is `queue[head:
    tail]`, oldest freed first; a block is in it while `slot[block]` is its index there (a
    touched or evicted block leaves a stale entry behind, skipped when the front is taken).
    `cached` maps a hash to the block a lookup finds (the first registered), `duplicates` to
    later blocks registered under the same hash (rare: equal prefixes computed twice).
    """

    caching = True

    def __init__(self, num_blocks: int, hashes: PrefixHashes) -> None:
        self.hashes = hashes
        self.unhashed = np.arange(num_blocks, dtype=np.int64)  # stack: [:num_unhashed_free]
        self.num_unhashed_free = num_blocks
        self.refs = np.zeros(num_blocks, dtype=np.int64)
        self.hashed = np.zeros(num_blocks, dtype=bool)
        self.hash_of = np.zeros(num_blocks, dtype=np.uint64)
        self.queue = np.zeros(2 * num_blocks + 1, dtype=np.int64)  # room to append N after a
        self.slot = np.full(num_blocks, -1, dtype=np.int64)        # compaction to <= N live
        self.head = self.tail = self.num_hashed_free = 0
        self.cached: dict[int, int] = {}
        self.duplicates: dict[int, list[int]] = {}
        self.blocks: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return self.num_unhashed_free + self.num_hashed_free

    def allocate(self, request: int, num_blocks: int) -> None:
        """Hand `num_blocks` blocks from the front of the free queue to `request`."""
        self.blocks.setdefault(request, []).extend(self._take(num_blocks).tolist())

    def allocate_many(self, requests: list[int], num_blocks: list[int]) -> None:
        """`allocate` for each request in turn: the same blocks in the same order."""
        taken = self._take(sum(num_blocks)).tolist()
        at, blocks = 0, self.blocks
        for request, k in zip(requests, num_blocks):
            blocks.setdefault(request, []).extend(taken[at:at + k])
            at += k

    def _take(self, num_blocks: int) -> np.ndarray:
        """Blocks without a hash first, then the least recently freed cached blocks (evicted)."""
        fresh = min(num_blocks, self.num_unhashed_free)
        self.num_unhashed_free -= fresh
        taken = self.unhashed[self.num_unhashed_free:self.num_unhashed_free + fresh]
        if num_blocks > fresh:
            taken = np.concatenate([taken, self._evict(num_blocks - fresh)])
        self.refs[taken] = 1
        return taken

    def _evict(self, count: int) -> np.ndarray:
        """Take `count` live blocks from the front of the free queue and drop their hashes."""
        parts, need = [], count
        while need:
            stop = min(self.tail, self.head + 2 * need + 8)
            if stop == self.head:
                raise RuntimeError(f"free queue short of {need} block(s): pool state corrupt")
            chunk = self.queue[self.head:stop]
            live = np.flatnonzero(self.slot[chunk] == np.arange(self.head, stop))[:need]
            parts.append(chunk[live])
            need -= live.size
            self.head = self.head + int(live[-1]) + 1 if not need else stop
        evicted = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.slot[evicted] = -1
        self.num_hashed_free -= count
        hashes = self.hash_of[evicted].tolist()
        if self.duplicates:
            for block, block_hash in zip(evicted.tolist(), hashes):
                self._uncache(block, block_hash)
        else:  # the common case: one block per hash
            cached = self.cached
            for block_hash in hashes:
                del cached[block_hash]
        self.hashed[evicted] = False
        return evicted

    def _uncache(self, block: int, block_hash: int) -> None:
        others = self.duplicates.get(block_hash)
        if self.cached[block_hash] == block:
            if others:
                self.cached[block_hash] = others.pop(0)
            else:
                del self.cached[block_hash]
        else:
            others.remove(block)
        if others is not None and not others:
            del self.duplicates[block_hash]

    def free(self, request: int, num_blocks: int) -> None:
        """Free all of `request`'s blocks (`num_blocks` of them), tail block first: those no
        other request holds go to the free queue (hashed, at its end) or the stack."""
        blocks = self.blocks.pop(request, None)
        if not blocks:
            return
        blocks = np.array(blocks[::-1], dtype=np.int64)
        self.refs[blocks] -= 1  # a request holds each of its blocks once
        released = blocks[self.refs[blocks] == 0]
        hashed = self.hashed[released]
        plain = released[~hashed]
        self.unhashed[self.num_unhashed_free:self.num_unhashed_free + plain.size] = plain
        self.num_unhashed_free += plain.size
        queued = released[hashed]
        if self.tail + queued.size > self.queue.size:
            self._compact()
        self.queue[self.tail:self.tail + queued.size] = queued
        self.slot[queued] = np.arange(self.tail, self.tail + queued.size)
        self.tail += queued.size
        self.num_hashed_free += queued.size

    def _compact(self) -> None:
        """Move the live entries of the free queue to its start, in order."""
        entries = self.queue[self.head:self.tail]
        live = entries[self.slot[entries] == np.arange(self.head, self.tail)]
        self.queue[:live.size] = live
        self.slot[live] = np.arange(live.size)
        self.head, self.tail = 0, live.size

    def cache_blocks(self, request: int, start: int, end: int) -> None:
        """Register `request`'s full blocks start..end-1 under their hashes."""
        hashes, blocks = self.hashes.of(request), self.blocks[request]
        held = np.array(blocks[start:end], dtype=np.int64)
        new = ~self.hashed[held]
        held, new_hashes = held[new], hashes[start:end][new]
        self.hashed[held] = True
        self.hash_of[held] = new_hashes
        pairs = zip(new_hashes.tolist(), held.tolist())
        cached = self.cached
        if self.duplicates or any(h in cached for h in new_hashes.tolist()):
            for h, block in pairs:
                if h in cached:
                    self.duplicates.setdefault(h, []).append(block)
                else:
                    cached[h] = block
        else:
            cached.update(pairs)

    def lookup(self, request: int, num_tokens: int) -> list[int]:
        """The cached blocks that hold `request`'s first blocks (see the module docstring)."""
        hit: list[int] = []
        limit = (num_tokens - 1) // self.hashes.block_size
        if limit <= 0:
            return hit
        cached = self.cached
        for block_hash in self.hashes.of(request)[:limit].tolist():
            block = cached.get(block_hash)
            if block is None:
                break
            hit.append(block)
        return hit

    def num_evictable(self, blocks: list[int]) -> int:
        """How many of these (hit) blocks sit in the free queue: touching them takes them out."""
        return int(np.count_nonzero(self.slot[blocks] >= 0))

    def touch(self, request: int, blocks: list[int]) -> None:
        """Give the hit blocks to `request` as its first blocks (already registered)."""
        held = np.array(blocks, dtype=np.int64)
        queued = self.slot[held] >= 0
        self.num_hashed_free -= int(np.count_nonzero(queued))
        self.slot[held[queued]] = -1
        self.refs[held] += 1
        self.blocks[request] = list(blocks)
