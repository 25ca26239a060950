"""The worker side of kvbench's swap connector: copies a victim's KV blocks to host memory and
back with kvbench's own copy ops (`kvbench.ops.kv_copy.swap_out` / `swap_in`, the routine that
calibration times), so the profile's swap-out and swap-in fits price this very copy.

vLLM hands the worker one KV cache tensor per attention layer (`register_kv_caches`). Each is
seen as kvbench's 6-D copy layout without a copy (`copy_view`):

* vLLM's CPU attention, [num_blocks, num_kv_heads, block_size, 2·head_size]: one plane
  (K and V share a block's row), [1, 1, num_blocks, ...];
* flash-attention's [2, num_blocks, block_size, num_kv_heads, head_size]: [1, 2, num_blocks, ...].

Any other layout is refused when the engine starts, with one line.

A swap-out (`handle_preemptions`, which vLLM calls before the step's forward pass and so before
a freed block is written again) gathers the victim's first blocks of every layer into one packed
host tensor per layer. On CUDA these are pinned tensors from torch's caching host allocator, and
the copy is stream-ordered before the forward pass that may overwrite the blocks (never run on
a GPU). A swap-in (`start_load_kv`, before the forward pass: the loads are synchronous) scatters
the packed blocks into the request's new blocks and drops the host copy. Each copy is timed
(wall clock, the stream synchronized on CUDA) and reported back to the scheduler side with its
bytes (`CopyReport`), so the records hold measured copy times, not predictions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvbench.errors import KvbenchError
from kvbench.ops.kv_copy import packed_bytes, swap_in, swap_out


@dataclass(frozen=True)
class SwapOut:
    """Copy the KV of `block_ids` (a victim's first blocks, in order) to host memory."""

    request_id: str
    block_ids: tuple[int, ...]
    tokens: int  # the victim's computed tokens (the last block may be partial)


@dataclass(frozen=True)
class SwapIn:
    """Copy a swapped victim's host blocks [first, first + len(block_ids)) into `block_ids`;
    the host copy is dropped after."""

    request_id: str
    first: int
    block_ids: tuple[int, ...]
    tokens: int  # the tokens loaded (the last block may be partial)


@dataclass(frozen=True)
class CopyReport:
    """One copy the worker made: direction "out" or "in", bytes moved, wall time; `ok` is
    False when it could not be made (the message says why)."""

    request_id: str
    direction: str
    blocks: int
    bytes: int
    ms: float
    ok: bool = True
    error: str | None = None


def copy_view(layer_cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """vLLM's KV cache tensor of one layer as kvbench's 6-D copy layout (module docstring)."""
    shape = tuple(layer_cache.shape)
    if not layer_cache.is_contiguous():
        raise KvbenchError(f"kvbench swap connector: a KV cache layer of shape {shape} is not "
                           "contiguous; only vLLM's CPU and flash-attention layouts are "
                           "supported")
    if layer_cache.dim() == 4 and shape[0] == num_blocks:
        return layer_cache.view(1, 1, *shape)
    if layer_cache.dim() == 5 and shape[0] == 2 and shape[1] == num_blocks:
        return layer_cache.view(1, *shape)
    raise KvbenchError(f"kvbench swap connector: KV cache layout {shape} (num_blocks "
                       f"{num_blocks}) is not vLLM's CPU [num_blocks, heads, block_size, "
                       "2*head_size] nor flash-attention's [2, num_blocks, block_size, heads, "
                       "head_size]")


class SwapWorker:
    """Host copies of swapped victims, by request id: one packed tensor per layer."""

    def __init__(self, copy_impl: str = "auto") -> None:
        self.copy_impl = copy_impl
        self.layers: list[torch.Tensor] = []
        self.host: dict[str, list[torch.Tensor]] = {}
        self.reports: list[CopyReport] = []

    def register(self, kv_caches: dict[str, torch.Tensor], num_blocks: int) -> None:
        self.layers = [copy_view(t, num_blocks) for t in kv_caches.values()]

    def _sync(self) -> None:
        if self.layers and self.layers[0].is_cuda:
            torch.cuda.current_stream(self.layers[0].device).synchronize()

    def swap_out(self, jobs: list[SwapOut]) -> None:
        for job in jobs:
            start = time.perf_counter()
            try:
                self.host[job.request_id] = [swap_out(layer, list(job.block_ids),
                                                      impl=self.copy_impl)
                                             for layer in self.layers]
                self._sync()
            except (RuntimeError, KvbenchError) as exc:  # host memory exhausted, a bad id
                self.host.pop(job.request_id, None)
                self.reports.append(CopyReport(job.request_id, "out", len(job.block_ids), 0,
                                               0.0, ok=False, error=str(exc)))
                continue
            self.reports.append(self._report(job.request_id, "out", len(job.block_ids), start))

    def swap_in(self, jobs: list[SwapIn]) -> set[int]:
        """Load each job; returns the block ids that could not be loaded (no host copy)."""
        failed: set[int] = set()
        for job in jobs:
            packed = self.host.pop(job.request_id, None)
            if packed is None:
                failed.update(job.block_ids)
                self.reports.append(CopyReport(job.request_id, "in", len(job.block_ids), 0,
                                               0.0, ok=False, error="no host copy"))
                continue
            start = time.perf_counter()
            end = job.first + len(job.block_ids)
            for layer, blocks in zip(self.layers, packed):
                if job.first or end < blocks.shape[2]:  # the local prefix hit is not loaded
                    blocks = blocks[:, :, job.first:end].contiguous()
                swap_in(blocks, layer, list(job.block_ids), impl=self.copy_impl)
            self._sync()
            self.reports.append(self._report(job.request_id, "in", len(job.block_ids), start))
        return failed

    def drop(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.host.pop(request_id, None)

    def _report(self, request_id: str, direction: str, blocks: int, start: float
                ) -> CopyReport:
        moved = sum(packed_bytes(layer, blocks) for layer in self.layers)
        return CopyReport(request_id, direction, blocks, moved,
                          (time.perf_counter() - start) * 1e3)

    def take_reports(self) -> list[CopyReport]:
        reports, self.reports = self.reports, []
        return reports
