"""Swap a request's paged KV blocks out of the cache and back in.

Layout: one tensor for all layers, per layer vLLM's flash-attention layout (0 = K, 1 = V):

    kv_cache [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    packed   [num_layers, 2, len(block_ids), block_size, num_kv_heads, head_dim]

    swap_out:  packed[l, kv, i] = kv_cache[l, kv, block_ids[i]]
    swap_in:   kv_cache[l, kv, block_ids[i]] = packed[l, kv, i]    (in place, no other block)

Bytes moved each way: num_layers · 2 · len(block_ids) · block_size · num_kv_heads · head_dim ·
itemsize (`packed_bytes`).

The second dimension is the number of planes per block: 2 (K and V apart, as above) or 1 (K and
V in one row per block, as vLLM's CPU attention stores a layer: [num_blocks, num_kv_heads,
block_size, 2·head_size] is the 6-D [1, 1, num_blocks, num_kv_heads, block_size, 2·head_size]).
Every copy moves whole rows of one (layer, plane, block), so both layouts copy alike.

Impls: the registry `COPY_IMPLS` {name: Impl} (`kvbench.ops.registry`); `copy_impls(device)`
lists those that run on a device. Keyword options of swap_out/swap_in go to the impl (its
keyword-only parameters).
  "triton"     one kernel launch for all layers and blocks (`kvbench.kernels.kv_copy`). On CUDA
               with pinned host memory it reads/writes the host tensor straight through its
               device mapping (zero-copy over UVA); otherwise, or with zero_copy=False, it
               gathers into a device staging buffer and makes one bulk copy (staged).
               Options: num_programs, vector_width, zero_copy (see `swap_out`). On CPU tensors
               it runs only in Triton's interpreter (TRITON_INTERPRET=1).
  "torch"      index_select / index_copy_ on the cache's device plus one bulk copy.
  "per_block"  one copy per block, per layer, per K/V, as vLLM's original swap does: the
               baseline that shows why small blocks hurt.
  "batched_dma" every block copy in one cuMemcpyBatchAsync call (`kvbench.ops.cuda_dma`;
               CUDA with cuda-python only, skipped elsewhere).
  "auto"       a fixed rule, never a measurement (`auto_impl`). Calibration times every impl
               and records the fastest as the profile's `swap.impl`: pass that name to use it.

On CUDA the wrappers never synchronize: copies into or out of pinned memory are asynchronous,
so synchronize the stream before the host reads a swapped-out tensor. Passing block_ids as a
list or CPU tensor avoids a device sync (they are validated on the host); in a timed loop pass
`prepare_block_ids(kv_cache, ids)`, built once, so that no validation or upload is timed.
The Triton copy moves 16 bytes per access only when both tensors start 16-byte aligned and a
block of one layer's K or V is a multiple of 16 bytes; otherwise it warns
(`UnalignedCopyWarning`). The CUDA paths (zero-copy, staged, batched DMA, pinned defaults)
have not yet been run on a GPU; the tests marked `gpu` check them against the references
where one is present.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvbench.errors import KvbenchError
from kvbench.ops.cuda_dma import batched_copy
from kvbench.ops.cuda_dma import unavailable_reason as dma_unavailable_reason
from kvbench.ops.dtypes import torch_dtype
from kvbench.ops.launch import (
    check_grid,
    device_context,
    host_to_device,
    require_triton,
    triton_unavailable_reason,
)
from kvbench.ops.registry import Impl, available, choose

NUM_WARPS = 4
ACCESS_BYTES = 16  # the widest global access a thread makes (ld/st.global.v4.b32)
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class UnalignedCopyWarning(UserWarning):
    """The Triton copy cannot use 16-byte accesses on these tensors."""


@dataclass(frozen=True)
class BlockIds:
    """Block ids checked against a cache and already where each impl reads them.

    Built by `prepare_block_ids`; swap_out/swap_in take it in place of a list and then do no
    host work on the ids (no validation, no upload), as a serving engine's block table is.
    """

    host: torch.Tensor  # int64 on the CPU
    device: torch.Tensor  # int64 on the cache's device (index_select, index_copy_)
    device_int32: torch.Tensor  # int32 on the cache's device (the Triton kernel)
    num_cache_blocks: int

    def numel(self) -> int:
        return self.host.numel()


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype | str = torch.bfloat16,
                      device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    """A cache [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] of seeded
    standard-normal values (never zeros, so a copy that skips a block cannot pass); on the
    "meta" device, shapes without memory or values (for compile-only runs)."""
    sizes = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
    names = ("num_layers", "2", "num_blocks", "block_size", "num_kv_heads", "head_dim")
    for name, size in zip(names, sizes):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise KvbenchError(f"allocate_kv_cache: {name} must be a positive integer, got "
                               f"{size!r}")
    dtype = torch_dtype(dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"allocate_kv_cache: dtype must be a floating type, got {dtype}")
    if torch.device(device).type == "meta":
        return torch.empty(sizes, dtype=dtype, device="meta")
    generator = torch.Generator(device=device).manual_seed(seed)
    fill_dtype = dtype if dtype.itemsize >= 2 else torch.float32  # randn has no fp8 kernel
    cache = torch.randn(sizes, dtype=fill_dtype, device=device, generator=generator)
    return cache.to(dtype)


def packed_shape(kv_cache: torch.Tensor, num_selected: int) -> tuple[int, ...]:
    """Shape of `num_selected` blocks of every layer, K and V, packed contiguously."""
    layers, planes, _, block_size, heads, head_dim = kv_cache.shape
    return (layers, planes, num_selected, block_size, heads, head_dim)


def packed_bytes(kv_cache: torch.Tensor, num_selected: int) -> int:
    """Bytes one swap of `num_selected` blocks moves in each direction."""
    layers, planes, _, block_size, heads, head_dim = kv_cache.shape
    return (layers * planes * num_selected * block_size * heads * head_dim
            * kv_cache.element_size())


def _check_cache(kv_cache) -> None:
    if not isinstance(kv_cache, torch.Tensor):
        raise TypeError(f"kv_cache must be a torch.Tensor, got {type(kv_cache).__name__}")
    if kv_cache.dim() != 6 or kv_cache.shape[1] not in (1, 2):
        raise KvbenchError("kv_cache must have shape [num_layers, 2, num_blocks, block_size, "
                           "num_kv_heads, head_dim] (or 1 plane: K and V in one row), got "
                           f"{tuple(kv_cache.shape)}")
    if kv_cache.element_size() not in _INT_VIEW or kv_cache.is_complex():
        raise TypeError(f"kv_cache dtype {kv_cache.dtype} is not supported")
    if not kv_cache.is_contiguous():
        raise KvbenchError("kv_cache must be contiguous (blocks are copied as flat rows and "
                         "swap_in writes in place); call .contiguous() on the cache once")


def _host_block_ids(block_ids, num_blocks: int) -> torch.Tensor:
    """block_ids as a CPU int64 tensor, checked: 1-D integers, in range, no duplicates."""
    if isinstance(block_ids, torch.Tensor):
        ids = block_ids.detach().cpu()  # one device sync if the ids live on a GPU
    elif isinstance(block_ids, (Sequence, range)) or hasattr(block_ids, "__array__"):
        ids = torch.as_tensor(block_ids)
    else:
        raise TypeError(f"block_ids must be a sequence of ints or a tensor, got "
                        f"{type(block_ids).__name__}")
    if ids.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"block_ids must be integers, got dtype {ids.dtype}")
    if ids.dim() != 1:
        raise KvbenchError(f"block_ids must be 1-D, got shape {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    values = ids.numpy()  # numpy: a few µs for what takes tens in small torch ops
    if values.min() < 0 or values.max() >= num_blocks:
        bad = values[(values < 0) | (values >= num_blocks)][0]
        raise KvbenchError(f"block id {bad} is out of range: the cache has {num_blocks} "
                         f"blocks (ids 0..{num_blocks - 1})")
    ordered = np.sort(values)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        raise KvbenchError(f"block id {repeated[0]} appears more than once in block_ids")
    return ids


def prepare_block_ids(kv_cache: torch.Tensor, block_ids: Sequence[int] | torch.Tensor
                      ) -> BlockIds:
    """Check `block_ids` against `kv_cache` and upload them once (see `BlockIds`)."""
    _check_cache(kv_cache)
    return _block_ids(kv_cache, block_ids)


def _block_ids(kv_cache: torch.Tensor, block_ids) -> BlockIds:
    if isinstance(block_ids, BlockIds):
        if block_ids.num_cache_blocks != kv_cache.shape[2] \
                or block_ids.device.device != kv_cache.device:
            raise KvbenchError(f"block_ids were prepared for a cache of "
                             f"{block_ids.num_cache_blocks} blocks on "
                             f"{block_ids.device.device}, not {kv_cache.shape[2]} on "
                             f"{kv_cache.device}")
        return block_ids
    ids = _host_block_ids(block_ids, kv_cache.shape[2])
    device = host_to_device(ids, kv_cache.device)
    return BlockIds(ids, device, device.to(torch.int32), kv_cache.shape[2])


def _check_packed(name: str, tensor, kv_cache: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != shape:
        raise KvbenchError(f"{name} must have shape {shape} ([num_layers, 2, len(block_ids), "
                         f"block_size, num_kv_heads, head_dim]), got {tuple(tensor.shape)}")
    if tensor.dtype != kv_cache.dtype:
        raise TypeError(f"{name} dtype {tensor.dtype} differs from kv_cache dtype "
                        f"{kv_cache.dtype}")
    if tensor.device.type != "cpu" and tensor.device != kv_cache.device:
        raise KvbenchError(f"{name} must be on the CPU or on the cache's device {kv_cache.device}, "
                         f"got {tensor.device}")
    if not tensor.is_contiguous():
        raise KvbenchError(f"{name} must be contiguous")


def _check_triton_options(num_programs, vector_width, zero_copy) -> None:
    for name, value in (("num_programs", num_programs), ("vector_width", vector_width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise KvbenchError(f"{name} must be a positive integer, got {value!r}")
    if vector_width is not None and (vector_width > 16 or vector_width & (vector_width - 1)):
        raise KvbenchError(f"vector_width must be a power of two from 1 to 16, got {vector_width}")
    if zero_copy not in (None, True, False):
        raise KvbenchError(f"zero_copy must be None, True or False, got {zero_copy!r}")


def copy_tile(block_numel: int, itemsize: int, vector_width: int | None = None) -> int:
    """Elements one program moves per step: `vector_width` elements per thread (default 16
    bytes' worth) times the threads of NUM_WARPS warps, at most the block's size rounded up
    to a power of two."""
    import triton

    vec = vector_width or max(1, ACCESS_BYTES // itemsize)
    return min(vec * 32 * NUM_WARPS, triton.next_power_of_2(block_numel))


def warn_if_unaligned(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Warn (UnalignedCopyWarning) when the Triton copy between `src` and `dst` (a cache and
    a packed tensor) cannot make 16-byte accesses: a tensor that does not start on a 16-byte
    boundary, or a block row (block_size·num_kv_heads·head_dim elements) that is not a
    multiple of 16 bytes. The compiled kernel then falls back to narrower accesses (seen in
    its sm_90 PTX by the compile gate; the cost is unmeasured on a GPU)."""
    problems = [f"{name} starts {t.data_ptr() % ACCESS_BYTES} bytes past a 16-byte boundary"
                for name, t in (("source", src), ("destination", dst))
                if t.data_ptr() % ACCESS_BYTES]
    row_bytes = src[0, 0, 0].numel() * src.element_size()
    if row_bytes % ACCESS_BYTES:
        problems.append(f"a block of one layer's K or V is {row_bytes} bytes, not a multiple "
                        "of 16")
    if problems:
        warnings.warn(f"Triton KV copy: {'; '.join(problems)}: the compiled kernel cannot use "
                      "16-byte loads and stores (allocate swap buffers 16-byte aligned)",
                      UnalignedCopyWarning, stacklevel=5)


def _launch(src: torch.Tensor, dst: torch.Tensor, ids: BlockIds, scatter: bool,
            num_programs: int | None, vector_width: int | None) -> None:
    """One launch of `copy_blocks_kernel`; src/dst are viewed as same-width integers."""
    import triton

    from kvbench.kernels.kv_copy import copy_blocks_kernel

    device = (dst if scatter else src).device  # the cache's device
    require_triton(device, copy_blocks_kernel)
    warn_if_unaligned(src, dst)
    itemsize = src.element_size()
    block_numel = src[0, 0, 0].numel()
    tile = copy_tile(block_numel, itemsize, vector_width)
    num_tiles = src.shape[0] * src.shape[1] * ids.numel() * triton.cdiv(block_numel, tile)
    if num_programs is None:  # a persistent grid: a few programs per SM saturate the copy
        sms = torch.cuda.get_device_properties(device).multi_processor_count if (
            device.type == "cuda") else 2
        num_programs = 4 * sms
    if num_tiles >= 2**31:
        raise KvbenchError(f"Triton KV copy: {num_tiles} tiles overflow the kernel's int32 tile "
                         "index; swap fewer blocks per call")
    grid = (min(num_programs, num_tiles),)
    check_grid("Triton KV copy", grid)
    with device_context(device):
        copy_blocks_kernel[grid](src.view(_INT_VIEW[itemsize]), dst.view(_INT_VIEW[itemsize]),
                                 ids.device_int32, ids.numel(), ids.num_cache_blocks,
                                 num_tiles, BLOCK_NUMEL=block_numel, TILE=tile,
                                 SCATTER=scatter, num_warps=NUM_WARPS)


def _triton_copy(cache, packed, ids, scatter, *, num_programs: int | None = None,
                 vector_width: int | None = None, zero_copy: bool | None = None) -> None:
    """Zero-copy when the packed tensor is pinned host memory (not yet run on a GPU), else
    staged through a device buffer; direct when both live on the same device."""
    _check_triton_options(num_programs, vector_width, zero_copy)
    src, dst = (packed, cache) if scatter else (cache, packed)
    if packed.device == cache.device:
        return _launch(src, dst, ids, scatter, num_programs, vector_width)
    if zero_copy and not packed.is_pinned():
        raise KvbenchError("zero_copy=True needs the host tensor in pinned memory "
                         "(torch.empty(..., pin_memory=True))")
    if zero_copy is not False and packed.is_pinned():
        try:  # Triton maps a pinned host pointer to its device pointer (UVA)
            return _launch(src, dst, ids, scatter, num_programs, vector_width)
        except ValueError as exc:  # raised before the launch: nothing was written
            if zero_copy or "cannot be accessed" not in str(exc):
                raise
    staging = torch.empty(packed.shape, dtype=packed.dtype, device=cache.device)
    if scatter:
        staging.copy_(packed, non_blocking=True)
        _launch(staging, cache, ids, True, num_programs, vector_width)
    else:
        _launch(cache, staging, ids, False, num_programs, vector_width)
        packed.copy_(staging, non_blocking=True)


def _torch_copy(cache, packed, ids, scatter) -> None:
    # Flat [layers·2, blocks, row] views: index_select over the 6-D cache takes a slow strided
    # path on CPU (0.02 GB/s against 10 GB/s flat, measured on this repo's 2-core CI machine).
    rows = cache.view(cache.shape[0] * cache.shape[1], cache.shape[2], -1)
    packed_rows = packed.view(rows.shape[0], packed.shape[2], -1)
    if scatter:
        rows.index_copy_(1, ids.device, packed_rows.to(cache.device, non_blocking=True))
    elif packed.device == cache.device:
        torch.index_select(rows, 1, ids.device, out=packed_rows)
    else:
        packed_rows.copy_(torch.index_select(rows, 1, ids.device), non_blocking=True)


def _per_block_copy(cache, packed, ids, scatter) -> None:
    block_ids = ids.host.tolist()
    for layer in range(cache.shape[0]):
        for kv in range(cache.shape[1]):
            for i, block in enumerate(block_ids):  # deliberate: the per-block baseline
                if scatter:
                    cache[layer, kv, block].copy_(packed[layer, kv, i], non_blocking=True)
                else:
                    packed[layer, kv, i].copy_(cache[layer, kv, block], non_blocking=True)


def _batched_dma_copy(cache, packed, ids, scatter) -> None:
    batched_copy(cache, packed, ids.host, scatter)


COPY_IMPLS: dict[str, Impl] = {  # run(cache, packed, ids: BlockIds, scatter, **options)
    "triton": Impl(_triton_copy, triton_unavailable_reason),
    "torch": Impl(_torch_copy),
    "per_block": Impl(_per_block_copy),
    "batched_dma": Impl(_batched_dma_copy, dma_unavailable_reason),
}


def copy_impls(device: torch.device | str) -> tuple[str, ...]:
    """The impls of `COPY_IMPLS` that run on `device`."""
    return available(COPY_IMPLS, device)


def auto_impl(device: torch.device | str) -> str:
    """What impl='auto' runs on `device`: a fixed rule, never a measurement.

    CPU: "torch" (no DMA engine or launch cost to hide; index_select is a C++ memcpy loop,
    per_block pays Python per block, triton only interprets). CUDA: "triton" where Triton is
    installed (one launch for every layer and block, zero-copy into pinned memory), else
    "torch". Which impl is fastest on a machine is what calibration measures: it times every
    impl on the same blocks and records the winner as the profile's `swap.impl`.
    """
    device = torch.device(device)
    if device.type == "cuda" and triton_unavailable_reason(device) is None:
        return "triton"
    return "torch"


def _prepare(kv_cache, block_ids, impl: str, options: dict) -> tuple[Impl, BlockIds, dict]:
    _check_cache(kv_cache)
    _, chosen, options = choose(COPY_IMPLS, impl, auto_impl, kv_cache.device, options)
    return chosen, _block_ids(kv_cache, block_ids), options


def swap_out(kv_cache: torch.Tensor, block_ids: Sequence[int] | torch.Tensor | BlockIds,
             dst: torch.Tensor | None = None, impl: str = "auto", **options) -> torch.Tensor:
    """Gather blocks `block_ids` of every layer, K and V, into `dst` and return it.

    dst: [num_layers, 2, len(block_ids), block_size, num_kv_heads, head_dim], contiguous, the
    cache's dtype, on the CPU or the cache's device; default a new CPU tensor, pinned when the
    cache is on CUDA. Options of impl="triton": num_programs (persistent grid size, the SM
    budget; default 4 per SM), vector_width (elements each thread moves per step, a power of
    two up to 16; default 16 bytes' worth), zero_copy (None: when dst is pinned, falling back
    to staged; True: required; False: staged).
    """
    chosen, ids, options = _prepare(kv_cache, block_ids, impl, options)
    shape = packed_shape(kv_cache, ids.numel())
    if dst is None:
        dst = torch.empty(shape, dtype=kv_cache.dtype, pin_memory=kv_cache.is_cuda)
    else:
        _check_packed("dst", dst, kv_cache, shape)
    if ids.numel():
        chosen.run(kv_cache, dst, ids, False, **options)
    return dst


def swap_in(src: torch.Tensor, kv_cache: torch.Tensor,
            block_ids: Sequence[int] | torch.Tensor | BlockIds, impl: str = "auto",
            **options) -> None:
    """Scatter `src` (as `swap_out` returns it) into `kv_cache` at `block_ids`, in place;
    every other block is left untouched. Options as for `swap_out` (zero-copy reads src
    through its device mapping when it is pinned)."""
    chosen, ids, options = _prepare(kv_cache, block_ids, impl, options)
    _check_packed("src", src, kv_cache, packed_shape(kv_cache, ids.numel()))
    if ids.numel():
        chosen.run(kv_cache, src, ids, True, **options)
