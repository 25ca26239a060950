"""Batched DMA copy of KV blocks: every block of every layer's K and V in one
`cuMemcpyBatchAsync` call of the CUDA driver (CUDA 12.8+, the call vLLM's KV offloading
moved to), through cuda-python. The copy engines move the blocks; no kernel runs.

The impl "batched_dma" of `kvbench.ops.kv_copy` (COPY_IMPLS). It needs a CUDA device, a
driver with cuMemcpyBatchAsync and cuda-python (`pip install 'kvbench[gpu]'`); elsewhere
`unavailable_reason` says which is missing and the impl is skipped. The address lists are
built with numpy, and cuda-python takes them as Python lists of CUdeviceptr: that host work is
part of each call (vLLM builds them in C++). Not yet run on a GPU: no GPU has been lent to
this project.
"""

from __future__ import annotations

import numpy as np
import torch

from kvbench.errors import KvbenchError

MIN_DRIVER = 12080  # cuMemcpyBatchAsync arrived in CUDA 12.8


def unavailable_reason(device: torch.device) -> str | None:
    """Why impl='batched_dma' cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return f"impl='batched_dma' drives the CUDA copy engines: it needs a CUDA device, not " \
               f"{device.type}"
    try:
        from cuda.bindings import driver
    except ImportError:
        return "impl='batched_dma' needs cuda-python (pip install 'kvbench[gpu]')"
    if not hasattr(driver, "cuMemcpyBatchAsync"):
        return "impl='batched_dma' needs a cuda-python with cuMemcpyBatchAsync (12.8 or newer)"
    if not torch.cuda.is_available():
        return "impl='batched_dma' needs a CUDA GPU; torch sees none"
    try:
        err, version = driver.cuDriverGetVersion()
    except Exception as exc:  # noqa: BLE001 - e.g. no libcuda: the impl just cannot run here
        return f"impl='batched_dma' cannot load the CUDA driver: {exc}"
    if err != driver.CUresult.CUDA_SUCCESS or version < MIN_DRIVER:
        return f"impl='batched_dma' needs a CUDA 12.8+ driver (cuDriverGetVersion: {version})"
    return None


def block_addresses(cache: torch.Tensor, packed: torch.Tensor, ids: torch.Tensor,
                    scatter: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Destination and source addresses of the L·2·n block copies of one swap (numpy uint64,
    layer-major as the packed tensor), and the bytes of each: a block of one layer's K or V.
    `ids` are the cache block ids (host int64)."""
    row_bytes = cache[0, 0, 0].numel() * cache.element_size()
    rows = np.arange(cache.shape[0] * cache.shape[1], dtype=np.uint64)[:, None]
    ids = ids.numpy().astype(np.uint64)[None, :]
    cache_at = np.uint64(cache.data_ptr()) + (rows * np.uint64(cache.shape[2]) + ids) \
        * np.uint64(row_bytes)
    packed_at = np.uint64(packed.data_ptr()) + (rows * np.uint64(ids.size)
                                               + np.arange(ids.size, dtype=np.uint64)) \
        * np.uint64(row_bytes)
    src, dst = (packed_at, cache_at) if scatter else (cache_at, packed_at)
    return dst.ravel(), src.ravel(), row_bytes


def _location(driver, tensor: torch.Tensor):
    location = driver.CUmemLocation()
    if tensor.is_cuda:
        location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        location.id = tensor.device.index or 0
    else:
        location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST
    return location


def batched_copy(cache: torch.Tensor, packed: torch.Tensor, ids: torch.Tensor,
                 scatter: bool) -> None:
    """Enqueue the swap on the current stream as one batch of block copies (not yet run on a
    GPU). The host side must be pinned: the copy engines read it in stream order."""
    from cuda.bindings import driver

    if packed.device.type == "cpu" and not packed.is_pinned():
        raise KvbenchError("impl='batched_dma' needs the host tensor in pinned memory "
                         "(torch.empty(..., pin_memory=True))")
    dsts, srcs, row_bytes = block_addresses(cache, packed, ids, scatter)
    attrs = driver.CUmemcpyAttributes()
    attrs.srcAccessOrder = driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
    attrs.srcLocHint = _location(driver, packed if scatter else cache)
    attrs.dstLocHint = _location(driver, cache if scatter else packed)
    stream = driver.CUstream(torch.cuda.current_stream(cache.device).cuda_stream)
    (err,) = driver.cuMemcpyBatchAsync(
        [driver.CUdeviceptr(int(a)) for a in dsts], [driver.CUdeviceptr(int(a)) for a in srcs],
        [row_bytes] * len(dsts), len(dsts), [attrs], [0], 1, stream)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuMemcpyBatchAsync failed: {err}")
