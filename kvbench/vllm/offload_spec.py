"""A vLLM offloading spec whose transfers are plain torch copies, so that vLLM's
OffloadingConnector runs on vLLM's CPU platform, and every transfer is timed.

vLLM's own `CPUOffloadingSpec` (vllm/v1/kv_offload/cpu/spec.py) refuses any platform but
CUDA-alike and XPU (`get_worker`), and its copy handler (cpu/gpu_worker.py) runs on CUDA streams
and events. Everything else it has (the scheduler-side LRU manager, the host size from
`cpu_bytes_to_use`, chunks of `blocks_per_chunk` device blocks) works anywhere, so
`TorchCopyOffloadingSpec` keeps it and swaps the worker: `TorchCopyWorker` copies rows between
the device KV cache and a host tensor with `index_select`/`index_copy_`, synchronously, and
reports each transfer's bytes and wall time (`time.perf_counter` around the copy, after the
device has finished the work queued before it) in vLLM's own `TransferResult`.

Loaded by name from the connector's extra config (vllm/v1/kv_offload/factory.py):
`"spec_name": "TorchCopyOffloadingSpec", "spec_module_path": "kvbench.vllm.offload_spec"`.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

LOAD, STORE = "load", "store"


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TorchCopyWorker(OffloadingWorker):
    """Copies whole blocks between the device KV cache and a host tensor, synchronously.

    Per canonical tensor (the (num_blocks, page_bytes) int8 view of a layer's cache that vLLM's
    connector builds, offloading/worker.py `register_kv_caches`; on the CPU backend a layer's
    cache is [num_blocks, kv_heads, block_size, 2*head_size], a block a row), a host tensor of
    `num_chunks` chunks of `blocks_per_chunk` rows. A transfer is complete when `submit_*`
    returns; `get_finished` hands over the results, each with its bytes and seconds.

    On CUDA the same code runs (gather on the device, one blocking copy, scatter), correct but
    slower than vLLM's DMA path and never stream-overlapped with compute; pinned host memory is
    used there. Only the CPU path runs in kvbench's tests: this machine has no GPU.
    """

    def __init__(self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int, num_chunks: int):
        self.blocks_per_chunk = blocks_per_chunk
        self.device_tensors = [t.tensor for t in kv_caches.tensors]
        self.device = self.device_tensors[0].device
        pin = self.device.type == "cuda"
        # Host rows are device-block sized: chunk c holds rows c*bpc .. c*bpc + bpc - 1.
        self.host_tensors = [
            torch.zeros((num_chunks * blocks_per_chunk, t.shape[1]), dtype=torch.int8,
                        pin_memory=pin)
            for t in self.device_tensors]
        # The tensors each KV cache group's layers live in (layers may share one).
        self.group_tensors = [sorted({ref.tensor_idx for ref in refs})
                              for refs in kv_caches.group_data_refs]
        self._finished: list[TransferResult] = []

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec,
                     dst_spec: LoadStoreSpec) -> bool:
        return self._transfer(job_id, STORE, src_spec, dst_spec)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec,
                    dst_spec: GPULoadStoreSpec) -> bool:
        return self._transfer(job_id, LOAD, dst_spec, src_spec)

    def _transfer(self, job_id: int, direction: str, device_spec: GPULoadStoreSpec,
                  host_spec: LoadStoreSpec) -> bool:
        assert isinstance(host_spec, BlockIDsLoadStoreSpec)
        copies = [(torch.from_numpy(device_rows).to(self.device), torch.from_numpy(host_rows),
                   tensors)
                  for tensors, device_rows, host_rows in zip(
                      self.group_tensors, *self._rows(device_spec, host_spec.block_ids))]
        _synchronize(self.device)
        start = time.perf_counter()
        num_bytes = 0
        for device_ids, host_ids, tensors in copies:
            for i in tensors:
                device, host = self.device_tensors[i], self.host_tensors[i]
                if direction == STORE:
                    host.index_copy_(0, host_ids, device.index_select(0, device_ids).cpu())
                else:
                    device.index_copy_(0, device_ids,
                                       host.index_select(0, host_ids).to(self.device))
                num_bytes += host_ids.numel() * host.shape[1]
        _synchronize(self.device)
        self._finished.append(TransferResult(job_id, True, num_bytes,
                                             time.perf_counter() - start))
        return True

    def _rows(self, device_spec: GPULoadStoreSpec, chunk_ids: np.ndarray
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per KV cache group: the device blocks and the host rows they pair with.

        As vLLM's handler reads a spec (cpu/gpu_worker.py, `transfer_async`): the device blocks
        come group after group (`group_sizes`); group g's first block is block
        `block_indices[g]` of the request, so it sits that many blocks (mod blocks_per_chunk)
        into its group's first chunk."""
        bpc = self.blocks_per_chunk
        device_rows, host_rows = [], []
        block_at, chunk_at = 0, 0
        for size, first in zip(device_spec.group_sizes, device_spec.block_indices):
            skip = first % bpc
            num_chunks = -(-(size + skip) // bpc) if size else 0
            chunks = chunk_ids[chunk_at:chunk_at + num_chunks].astype(np.int64)
            rows = (chunks[:, None] * bpc + np.arange(bpc)).ravel()[skip:skip + size]
            device_rows.append(device_spec.block_ids[block_at:block_at + size].astype(np.int64))
            host_rows.append(rows)
            block_at += size
            chunk_at += num_chunks
        assert (block_at, chunk_at) == (device_spec.block_ids.size, chunk_ids.size)
        return device_rows, host_rows

    def get_finished(self) -> list[TransferResult]:
        finished, self._finished = self._finished, []
        return finished

    def wait(self, job_ids: set[int]) -> None:
        """Nothing to wait for: a transfer is done when its submit returns."""


class TorchCopyOffloadingSpec(CPUOffloadingSpec):
    """vLLM's CPU offloading spec (manager, sizes) with `TorchCopyWorker` transfers."""

    def _uses_shared_region(self) -> bool:
        return False  # a private host tensor per worker, not vLLM's shared mmap region

    def get_worker(self, kv_caches: CanonicalKVCaches) -> TorchCopyWorker:
        if self._worker is None:
            self._worker = TorchCopyWorker(kv_caches, self.blocks_per_chunk, self.num_chunks)
        return self._worker
