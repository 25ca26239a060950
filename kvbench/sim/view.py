"""The scheduler state a policy may read: a small, typed view that any engine can provide.

The simulator builds one from its request table; a real engine's scheduler (vLLM's, through an
adapter) builds the same from its own request objects. A policy never sees the engine itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from kvbench.costmodel import CostModel


@dataclass(frozen=True)
class Requests:
    """Some requests as parallel int64 arrays (the running batch in admission order, or the one
    candidate for admission)."""

    computed_tokens: np.ndarray  # tokens whose KV is in the cache
    known_tokens: np.ndarray  # prompt + tokens generated so far
    blocks: np.ndarray  # KV blocks held on the GPU
    predicted_remaining: np.ndarray  # output tokens still to generate, predicted (>= 1)
    max_total_tokens: np.ndarray  # prompt + max_tokens: the most KV the request can ever need
    # Blocks another running request also holds: a running request's leading blocks that
    # preempting it would not free (and that it would find again in the prefix cache); for a
    # candidate, the blocks of its prefix-cache hit that running requests hold, which it needs
    # no new block for. Zero without prefix sharing.
    shared_blocks: np.ndarray

    @property
    def size(self) -> int:
        return self.computed_tokens.size

    @classmethod
    def of(cls, **columns) -> Requests:
        """From lists or arrays (a test writes `Requests.of(computed_tokens=[...], ...)`);
        `shared_blocks` defaults to zeros."""
        arrays = {k: np.asarray(v, dtype=np.int64) for k, v in columns.items()}
        arrays.setdefault("shared_blocks", np.zeros_like(arrays["computed_tokens"]))
        return cls(**arrays)

    def append(self, other: Requests) -> Requests:
        return Requests(*(np.concatenate([a, b]) for a, b in
                          zip(self._columns(), other._columns())))

    def _columns(self) -> tuple[np.ndarray, ...]:
        return (self.computed_tokens, self.known_tokens, self.blocks, self.predicted_remaining,
                self.max_total_tokens, self.shared_blocks)


class SchedulerView(Protocol):
    """What every policy reads: the running requests, the cache and the costs."""

    @property
    def running(self) -> Requests: ...  # in admission order

    @property
    def block_size(self) -> int: ...  # tokens per KV block

    @property
    def num_gpu_blocks(self) -> int: ...  # usable KV blocks on the GPU

    @property
    def free_cpu_blocks(self) -> int: ...  # room left in the CPU swap space

    @property
    def block_bytes(self) -> float: ...  # bytes of one KV block

    @property
    def costs(self) -> CostModel: ...


class StateView(NamedTuple):
    """A plain `SchedulerView`: a snapshot of the fields (a tuple: the simulator builds one per
    policy call)."""

    running: Requests
    block_size: int
    num_gpu_blocks: int
    free_cpu_blocks: int
    block_bytes: float
    costs: CostModel
