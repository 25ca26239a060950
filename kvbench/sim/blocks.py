"""The GPU KV block pool, as vLLM 0.32 keeps it (vllm/v1/core/block_pool.py, kv_cache_utils.py).

`CountingPool`: without prefix caching a free block has no content worth keeping, so only the
number of free blocks matters.

`PrefixCachePool`: with prefix caching every full block of known tokens is registered under a
hash of its token prefix (`register`) and, once its request frees it, stays in the free
queue as cache until it is reused. The free queue is [blocks without a hash] + [hashed blocks,
oldest freed first]: freed blocks without a hash are prepended (reused first), hashed ones
appended (evicted last, LRU), and new blocks are taken from the front, evicting the hash of a
hashed block (block_pool.py `free_blocks`, `get_new_blocks`). A request's blocks are freed
tail first. A lookup (`lookup`) walks a request's block hashes from the first and stops at the
first one not cached, at most (num_tokens - 1) // block_size blocks (the last token is always
computed again, for its logits); hit blocks found in the free queue leave it when touched.

Blocks without a hash are interchangeable, so the pool only counts them; a block gets an id
when it is handed out and keeps it while it holds a hash. Hashes chain over all tokens before
and in the block (`PrefixHashes`), so equal hash means equal token prefix, across requests too.
`PrivatePrefixPool` (kvbench/sim/private_blocks.py) keeps the same queue with fewer names when
no request can find another's blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import numpy as np

from kvbench.sim.workloads import TokenIds

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
        self._cache: dict[int, list[int]] = {}
        longest = int(np.diff(tokens.offsets).max() + output_tokens.max()) if output_tokens.size \
            else 0
        with np.errstate(over="ignore"):
            self._powers = np.cumprod(np.full(max(longest, 1), _HASH_BASE, dtype=np.uint64))

    def of(self, request: int) -> list[int]:
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
            hashes = self._cache[request] = (ends ^ lengths).tolist()
        return hashes

    def first_blocks_distinct(self) -> bool:
        """Whether no two requests' first blocks hash alike: then, as hashes chain, no request
        holds a block with another's hash."""
        bs, tokens = self.block_size, self.tokens
        lengths = np.diff(tokens.offsets)
        full = np.flatnonzero(lengths + self.output_tokens >= bs)  # the others fill no block
        if not full.size:
            return True
        position = np.arange(bs)
        from_prompt = position < lengths[full, None]
        rows = np.where(from_prompt,
                        tokens.flat[np.minimum(tokens.offsets[full, None] + position,
                                               tokens.flat.size - 1)],
                        tokens.output_token[full, None]).astype(np.uint64)
        with np.errstate(over="ignore"):
            first = (rows * self._powers[:bs]).sum(axis=1, dtype=np.uint64)
        return np.unique(first).size == full.size

    def forget(self, request: int) -> None:
        """Drop a finished request's hashes (its blocks keep theirs)."""
        self._cache.pop(request, None)


class BlockPool(Protocol):
    """What `KVCacheManager` (kvbench/sim/kv_cache.py) asks of a block pool."""

    caching: bool  # registers full blocks for prefix caching
    names_blocks: bool  # knows which block each request holds: blocks are handed out in order
    num_free: int
    num_unhashed_free: int

    def allocate(self, request: int, num_blocks: int) -> None: ...

    def allocate_each(self, requests: np.ndarray, num_blocks: np.ndarray) -> None: ...

    def register(self, request: int, start: int, end: int) -> None: ...

    def free(self, request: int, num_blocks: int, registered: int = 0,
             reusable: bool = False) -> None: ...

    def lookup(self, request: int, num_tokens: int) -> list[int]: ...

    def num_evictable(self, blocks: list[int]) -> int: ...

    def touch(self, request: int, blocks: list[int]) -> None: ...


class CountingPool:
    """Free blocks by number only (no prefix caching: freed blocks keep nothing)."""

    caching = False
    names_blocks = False

    def __init__(self, num_blocks: int) -> None:
        self.num_free = num_blocks

    @property
    def num_unhashed_free(self) -> int:
        return self.num_free

    def allocate(self, request: int, num_blocks: int) -> None:
        self.num_free -= num_blocks

    def allocate_each(self, requests: np.ndarray, num_blocks: np.ndarray) -> None:
        self.num_free -= int(num_blocks.sum())

    def register(self, request: int, start: int, end: int) -> None:
        """Nothing is cached."""

    def free(self, request: int, num_blocks: int, registered: int = 0,
             reusable: bool = False) -> None:
        self.num_free += num_blocks

    def lookup(self, request: int, num_tokens: int) -> list[int]:
        return []

    def num_evictable(self, blocks: list[int]) -> int:
        return 0

    def touch(self, request: int, blocks: list[int]) -> None:
        """No block is ever found."""


class PrefixCachePool:
    """vLLM's block pool with prefix caching (see the module docstring). Blocks of request r
    are `blocks[r]` in order; the engine tracks how many of them are registered."""

    caching = True
    names_blocks = True

    def __init__(self, num_blocks: int, hashes: PrefixHashes) -> None:
        self.hashes = hashes
        self.num_unhashed_free = num_blocks
        self.hashed_free: OrderedDict[int, int] = OrderedDict()  # block id -> hash, queue order
        self.cached: dict[int, int] = {}  # hash -> the block a lookup finds (the first cached)
        self.duplicates: dict[int, list[int]] = {}  # hash -> later blocks with the same hash
        self.block_hash: dict[int, int] = {}
        self.extra_refs: dict[int, int] = {}  # blocks shared by more than one request
        self.blocks: dict[int, list[int]] = {}
        self._next_id = 0

    @property
    def num_free(self) -> int:
        return self.num_unhashed_free + len(self.hashed_free)

    def allocate(self, request: int, num_blocks: int) -> None:
        """Hand `num_blocks` blocks from the front of the free queue to `request`."""
        held = self.blocks.setdefault(request, [])
        fresh = min(num_blocks, self.num_unhashed_free)
        self.num_unhashed_free -= fresh
        held.extend(range(self._next_id, self._next_id + fresh))
        self._next_id += fresh
        popitem, block_hash_of, cached = self.hashed_free.popitem, self.block_hash, self.cached
        for _ in range(num_blocks - fresh):  # evict the least recently freed cached block
            block, block_hash = popitem(last=False)
            if self.duplicates:
                self._uncache(block, block_hash)
            else:  # the common case: one block per hash
                del block_hash_of[block], cached[block_hash]
            held.append(block)

    def allocate_each(self, requests: np.ndarray, num_blocks: np.ndarray) -> None:
        """`allocate` for each request in order."""
        some = np.flatnonzero(num_blocks)
        for i, k in zip(requests[some].tolist(), num_blocks[some].tolist()):
            self.allocate(i, k)

    def _uncache(self, block: int, block_hash: int) -> None:
        del self.block_hash[block]
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

    def free(self, request: int, num_blocks: int, registered: int = 0,
             reusable: bool = False) -> None:
        """Free all of `request`'s blocks (`num_blocks` of them), tail block first (the pool
        knows which are registered, and lets any request find them)."""
        blocks = self.blocks.pop(request, [])
        if self.extra_refs:  # blocks still shared with another request stay
            blocks = [block for block in blocks if not self._unref(block)]
        block_hash_of, hashed_free = self.block_hash, self.hashed_free
        for block in reversed(blocks):
            block_hash = block_hash_of.get(block)
            if block_hash is None:
                self.num_unhashed_free += 1
            else:
                hashed_free[block] = block_hash

    def _unref(self, block: int) -> bool:
        """Drop one of a shared block's extra references; False if it had none."""
        refs = self.extra_refs.get(block)
        if not refs:
            return False
        if refs == 1:
            del self.extra_refs[block]
        else:
            self.extra_refs[block] = refs - 1
        return True

    def register(self, request: int, start: int, end: int) -> None:
        """Register `request`'s full blocks start..end-1 (none registered yet) under their
        hashes."""
        self._register(self.blocks[request], self.hashes.of(request), start, end)

    def _register(self, blocks: list[int], hashes: list[int], start: int, end: int) -> None:
        """Enter blocks[start:end] under hashes[start:end]; a hash already cached keeps the
        block registered first, later ones wait as duplicates."""
        block_hash_of, cached = self.block_hash, self.cached
        for j in range(start, end):
            block, block_hash = blocks[j], hashes[j]
            block_hash_of[block] = block_hash
            if block_hash in cached:
                self.duplicates.setdefault(block_hash, []).append(block)
            else:
                cached[block_hash] = block

    def lookup(self, request: int, num_tokens: int) -> list[int]:
        """The cached blocks that hold `request`'s first blocks (see the module docstring)."""
        hit: list[int] = []
        hashes, cached = self.hashes.of(request), self.cached
        for j in range(min((num_tokens - 1) // self.hashes.block_size, len(hashes))):
            block = cached.get(hashes[j])
            if block is None:
                break
            hit.append(block)
        return hit

    def num_evictable(self, blocks: list[int]) -> int:
        """How many of these (hit) blocks sit in the free queue: touching them takes them out."""
        return sum(block in self.hashed_free for block in blocks)

    def touch(self, request: int, blocks: list[int]) -> None:
        """Give the hit blocks to `request` as its first blocks (already registered)."""
        for block in blocks:
            if block in self.hashed_free:
                del self.hashed_free[block]
            else:
                self.extra_refs[block] = self.extra_refs.get(block, 0) + 1
        self.blocks[request] = list(blocks)
