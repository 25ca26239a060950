"""Swap a request's paged KV blocks out of the cache and back in.

Layout: one tensor for all layers, per layer vLLM's flash-attention layout (0 = K, 1 = V):

    kv_cache [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    packed   [num_layers, 2, len(block_ids), block_size, num_kv_heads, head_dim]

    swap_out:  packed[l, kv, i] = kv_cache[l, kv, block_ids[i]]
    swap_in:   kv_cache[l, kv, block_ids[i]] = packed[l, kv, i]    (in place, no other block)

Bytes moved each way: num_layers · 2 · len(block_ids) · block_size · num_kv_heads · head_dim ·
itemsize (`packed_bytes`).

Impls (`COPY_IMPLS`; `copy_impls(device)` lists those that run on a device):
  "triton"     one kernel launch for all layers and blocks (`kvbench.kernels.kv_copy`). On CUDA
               with pinned host memory it reads/writes the host tensor straight through its
               device mapping (zero-copy over UVA); otherwise, or with zero_copy=False, it
               gathers into a device staging buffer and makes one bulk copy (staged).
               On CPU tensors it runs only in Triton's interpreter (TRITON_INTERPRET=1).
  "torch"      index_select / index_copy_ on the cache's device plus one bulk copy.
  "per_block"  one copy per block, per layer, per K/V, as vLLM's original swap does: the
               baseline that shows why small blocks hurt.
  "auto"       CPU: "torch" (no DMA engine or launch cost to hide; index_select is a C++
               memcpy loop, per_block pays Python per block, triton only interprets).
               CUDA: the fastest of triton and torch, measured once per device, direction and
               shape (one synchronizing measurement; see `_auto_impl`).

On CUDA the wrappers never synchronize: copies into or out of pinned memory are asynchronous,
so synchronize the stream before the host reads a swapped-out tensor. Passing block_ids as a
list or CPU tensor avoids a device sync (they are validated on the host). The CUDA paths
(zero-copy, staged, auto's measurement, pinned defaults) have not yet been run on a GPU; the
tests marked `gpu` check them against the references where one is present.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np
import torch

COPY_IMPLS = ("triton", "torch", "per_block")
IMPLS = COPY_IMPLS + ("auto",)
NUM_WARPS = 4
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_AUTO_CHOICE: dict[tuple, str] = {}


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """Why impl='triton' cannot run on `device`, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    if torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("impl='triton' on CPU tensors runs only in Triton's interpreter: set "
                "TRITON_INTERPRET=1 before starting Python, or use impl='torch'")
    return None


def require_triton(device: torch.device, kernel=None) -> None:
    """Raise ValueError when Triton cannot run on `device` (kernel: check how it was built)."""
    reason = triton_unavailable_reason(device)
    if reason is None and kernel is not None and device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        if not (isinstance(kernel, InterpretedFunction)
                or isinstance(getattr(kernel, "fn", None), InterpretedFunction)):
            reason = ("kvbench's Triton kernels were imported before TRITON_INTERPRET=1 was set; "
                      "set it before starting Python to run them on CPU tensors")
    if reason is not None:
        raise ValueError(reason)


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (block ids, cu_seqlens) on `device` without blocking the host: on
    CUDA it goes through pinned memory, as a copy from pageable memory may wait for the stream
    (the CUDA branch has not yet been run on a GPU)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def copy_impls(device: torch.device | str) -> tuple[str, ...]:
    """The impls of `COPY_IMPLS` that run on `device` ('triton' needs Triton; on CPU also
    TRITON_INTERPRET=1)."""
    ok = triton_unavailable_reason(device) is None
    return tuple(name for name in COPY_IMPLS if name != "triton" or ok)


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    from kvbench.models import canonical_dtype

    name = canonical_dtype(dtype)
    return torch.float8_e4m3fn if name == "fp8" else getattr(torch, name)


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype | str = torch.bfloat16,
                      device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    """A cache [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] of seeded
    standard-normal values (never zeros, so a copy that skips a block cannot pass)."""
    sizes = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
    names = ("num_layers", "2", "num_blocks", "block_size", "num_kv_heads", "head_dim")
    for name, size in zip(names, sizes):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"allocate_kv_cache: {name} must be a positive integer, got {size!r}")
    dtype = _torch_dtype(dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"allocate_kv_cache: dtype must be a floating type, got {dtype}")
    generator = torch.Generator(device=device).manual_seed(seed)
    fill_dtype = dtype if dtype.itemsize >= 2 else torch.float32  # randn has no fp8 kernel
    cache = torch.randn(sizes, dtype=fill_dtype, device=device, generator=generator)
    return cache.to(dtype)


def packed_shape(kv_cache: torch.Tensor, num_selected: int) -> tuple[int, ...]:
    """Shape of `num_selected` blocks of every layer, K and V, packed contiguously."""
    layers, _, _, block_size, heads, head_dim = kv_cache.shape
    return (layers, 2, num_selected, block_size, heads, head_dim)


def packed_bytes(kv_cache: torch.Tensor, num_selected: int) -> int:
    """Bytes one swap of `num_selected` blocks moves in each direction."""
    layers, _, _, block_size, heads, head_dim = kv_cache.shape
    return layers * 2 * num_selected * block_size * heads * head_dim * kv_cache.element_size()


def _check_cache(kv_cache) -> None:
    if not isinstance(kv_cache, torch.Tensor):
        raise TypeError(f"kv_cache must be a torch.Tensor, got {type(kv_cache).__name__}")
    if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
        raise ValueError("kv_cache must have shape [num_layers, 2, num_blocks, block_size, "
                         f"num_kv_heads, head_dim], got {tuple(kv_cache.shape)}")
    if kv_cache.element_size() not in _INT_VIEW or kv_cache.is_complex():
        raise TypeError(f"kv_cache dtype {kv_cache.dtype} is not supported")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous (blocks are copied as flat rows and "
                         "swap_in writes in place); call .contiguous() on the cache once")


def _check_block_ids(block_ids, num_blocks: int) -> torch.Tensor:
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
        raise ValueError(f"block_ids must be 1-D, got shape {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    values = ids.numpy()  # numpy: a few µs for what takes tens in small torch ops
    if values.min() < 0 or values.max() >= num_blocks:
        bad = values[(values < 0) | (values >= num_blocks)][0]
        raise ValueError(f"block id {bad} is out of range: the cache has {num_blocks} "
                         f"blocks (ids 0..{num_blocks - 1})")
    ordered = np.sort(values)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        raise ValueError(f"block id {repeated[0]} appears more than once in block_ids")
    return ids


def _check_packed(name: str, tensor, kv_cache: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ([num_layers, 2, len(block_ids), "
                         f"block_size, num_kv_heads, head_dim]), got {tuple(tensor.shape)}")
    if tensor.dtype != kv_cache.dtype:
        raise TypeError(f"{name} dtype {tensor.dtype} differs from kv_cache dtype "
                        f"{kv_cache.dtype}")
    if tensor.device.type != "cpu" and tensor.device != kv_cache.device:
        raise ValueError(f"{name} must be on the CPU or on the cache's device {kv_cache.device}, "
                         f"got {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_triton_options(impl: str, num_programs, vector_width, zero_copy) -> None:
    given = [n for n, v in (("num_programs", num_programs), ("vector_width", vector_width),
                            ("zero_copy", zero_copy)) if v is not None]
    if given and impl not in ("triton", "auto"):
        raise ValueError(f"{', '.join(given)} only apply to impl='triton', not {impl!r}")
    for name, value in (("num_programs", num_programs), ("vector_width", vector_width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if vector_width is not None and (vector_width > 16 or vector_width & (vector_width - 1)):
        raise ValueError(f"vector_width must be a power of two from 1 to 16, got {vector_width}")


def _launch(src: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor, num_cache_blocks: int,
            scatter: bool, num_programs: int | None, vector_width: int | None) -> None:
    """One launch of `copy_blocks_kernel`; src/dst are viewed as same-width integers."""
    from kvbench.kernels.kv_copy import copy_blocks_kernel

    device = (dst if scatter else src).device  # the cache's device
    require_triton(device, copy_blocks_kernel)
    import triton

    itemsize = src.element_size()
    block_numel = src[0, 0, 0].numel()
    vec = vector_width or max(1, 16 // itemsize)  # default: 16 bytes per thread per step
    tile = min(vec * 32 * NUM_WARPS, triton.next_power_of_2(block_numel))
    num_rows = src.shape[0] * 2 * ids.numel()
    num_tiles = num_rows * triton.cdiv(block_numel, tile)
    if num_programs is None:  # a persistent grid: a few programs per SM saturate the copy
        sms = torch.cuda.get_device_properties(device).multi_processor_count if (
            device.type == "cuda") else 2
        num_programs = 4 * sms
    grid = (min(num_programs, num_tiles),)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        copy_blocks_kernel[grid](src.view(_INT_VIEW[itemsize]), dst.view(_INT_VIEW[itemsize]),
                                 ids, ids.numel(), num_cache_blocks, num_tiles,
                                 BLOCK_NUMEL=block_numel, TILE=tile, SCATTER=scatter,
                                 num_warps=NUM_WARPS)


def _triton_copy(cache, packed, ids, scatter, num_programs, vector_width, zero_copy):
    """Zero-copy when the packed tensor is pinned host memory (not yet run on a GPU), else
    staged through a device buffer; direct when both live on the same device."""
    ids_dev = host_to_device(ids.to(torch.int32), cache.device)
    src, dst = (packed, cache) if scatter else (cache, packed)
    if packed.device == cache.device:
        return _launch(src, dst, ids_dev, cache.shape[2], scatter, num_programs, vector_width)
    if zero_copy and not packed.is_pinned():
        raise ValueError("zero_copy=True needs the host tensor in pinned memory "
                         "(torch.empty(..., pin_memory=True))")
    if zero_copy is not False and packed.is_pinned():
        try:  # Triton maps a pinned host pointer to its device pointer (UVA)
            return _launch(src, dst, ids_dev, cache.shape[2], scatter, num_programs,
                           vector_width)
        except ValueError as exc:  # raised before the launch: nothing was written
            if zero_copy or "cannot be accessed" not in str(exc):
                raise
    staging = torch.empty(packed.shape, dtype=packed.dtype, device=cache.device)
    if scatter:
        staging.copy_(packed, non_blocking=True)
        _launch(staging, cache, ids_dev, cache.shape[2], True, num_programs, vector_width)
    else:
        _launch(cache, staging, ids_dev, cache.shape[2], False, num_programs, vector_width)
        packed.copy_(staging, non_blocking=True)


def _torch_copy(cache, packed, ids, scatter):
    ids_dev = host_to_device(ids, cache.device)
    # Flat [layers·2, blocks, row] views: index_select over the 6-D cache takes a slow strided
    # path on CPU (0.02 GB/s against 10 GB/s flat, measured on this repo's 2-core CI machine).
    rows = cache.view(cache.shape[0] * 2, cache.shape[2], -1)
    packed_rows = packed.view(rows.shape[0], packed.shape[2], -1)
    if scatter:
        rows.index_copy_(1, ids_dev, packed_rows.to(cache.device, non_blocking=True))
    elif packed.device == cache.device:
        torch.index_select(rows, 1, ids_dev, out=packed_rows)
    else:
        packed_rows.copy_(torch.index_select(rows, 1, ids_dev), non_blocking=True)


def _per_block_copy(cache, packed, ids, scatter):
    block_ids = ids.tolist()
    for layer in range(cache.shape[0]):
        for kv in range(2):
            for i, block in enumerate(block_ids):  # deliberate: the per-block baseline
                if scatter:
                    cache[layer, kv, block].copy_(packed[layer, kv, i], non_blocking=True)
                else:
                    packed[layer, kv, i].copy_(cache[layer, kv, block], non_blocking=True)


def _run(impl, cache, packed, ids, scatter, num_programs, vector_width, zero_copy) -> None:
    if impl == "triton":
        _triton_copy(cache, packed, ids, scatter, num_programs, vector_width, zero_copy)
    elif impl == "torch":
        _torch_copy(cache, packed, ids, scatter)
    else:
        _per_block_copy(cache, packed, ids, scatter)


def _auto_impl(cache, packed, ids, scatter, num_programs, vector_width, zero_copy) -> str:
    """CPU: 'torch'. CUDA: time triton and torch once per (device, direction, dtype, geometry,
    host memory kind, block-count bucket) with CUDA events and keep the faster. Timing reruns
    the requested copy, which is idempotent. Not yet run on a GPU."""
    if cache.device.type != "cuda":
        return "torch"
    key = (cache.device, scatter, cache.dtype, tuple(cache.shape[:2]), tuple(cache.shape[3:]),
           packed.device.type, packed.is_pinned(), max(1, ids.numel()).bit_length())
    if key not in _AUTO_CHOICE:
        times_ms = {}
        for impl in (name for name in copy_impls(cache.device) if name != "per_block"):
            _run(impl, cache, packed, ids, scatter, num_programs, vector_width, zero_copy)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                _run(impl, cache, packed, ids, scatter, num_programs, vector_width, zero_copy)
            end.record()
            end.synchronize()
            times_ms[impl] = start.elapsed_time(end)
        _AUTO_CHOICE[key] = min(times_ms, key=times_ms.get)
    return _AUTO_CHOICE[key]


def _prepare(kv_cache, block_ids, impl, num_programs, vector_width, zero_copy):
    _check_cache(kv_cache)
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; use one of {', '.join(IMPLS)}")
    _check_triton_options(impl, num_programs, vector_width, zero_copy)
    if impl == "triton":
        require_triton(kv_cache.device)
    return _check_block_ids(block_ids, kv_cache.shape[2])


def swap_out(kv_cache: torch.Tensor, block_ids: Sequence[int] | torch.Tensor,
             dst: torch.Tensor | None = None, impl: str = "auto", *,
             num_programs: int | None = None, vector_width: int | None = None,
             zero_copy: bool | None = None) -> torch.Tensor:
    """Gather blocks `block_ids` of every layer, K and V, into `dst` and return it.

    dst: [num_layers, 2, len(block_ids), block_size, num_kv_heads, head_dim], contiguous, the
    cache's dtype, on the CPU or the cache's device; default a new CPU tensor, pinned when the
    cache is on CUDA. Triton options: num_programs (persistent grid size, the SM budget;
    default 4 per SM), vector_width (elements each thread moves per step, a power of two up
    to 16; default 16 bytes' worth), zero_copy (None: when dst is pinned, falling back to
    staged; True: required; False: staged).
    """
    ids = _prepare(kv_cache, block_ids, impl, num_programs, vector_width, zero_copy)
    shape = packed_shape(kv_cache, ids.numel())
    if dst is None:
        dst = torch.empty(shape, dtype=kv_cache.dtype, pin_memory=kv_cache.is_cuda)
    else:
        _check_packed("dst", dst, kv_cache, shape)
    if ids.numel():
        if impl == "auto":
            impl = _auto_impl(kv_cache, dst, ids, False, num_programs, vector_width, zero_copy)
        _run(impl, kv_cache, dst, ids, False, num_programs, vector_width, zero_copy)
    return dst


def swap_in(src: torch.Tensor, kv_cache: torch.Tensor, block_ids: Sequence[int] | torch.Tensor,
            impl: str = "auto", *, num_programs: int | None = None,
            vector_width: int | None = None, zero_copy: bool | None = None) -> None:
    """Scatter `src` (as `swap_out` returns it) into `kv_cache` at `block_ids`, in place;
    every other block is left untouched. Options as for `swap_out` (zero-copy reads src
    through its device mapping when it is pinned)."""
    ids = _prepare(kv_cache, block_ids, impl, num_programs, vector_width, zero_copy)
    _check_packed("src", src, kv_cache, packed_shape(kv_cache, ids.numel()))
    if ids.numel():
        if impl == "auto":
            impl = _auto_impl(kv_cache, src, ids, True, num_programs, vector_width, zero_copy)
        _run(impl, kv_cache, src, ids, True, num_programs, vector_width, zero_copy)
