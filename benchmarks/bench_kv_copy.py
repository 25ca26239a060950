"""Swap-out and swap-in of a request's KV blocks, each impl side by side (one group per
direction, size and block size): llama-3-8b geometry (32 layers, 8 KV heads, head_dim 128,
bf16), block sizes 8/16/32 on CUDA, 8/16 on CPU (small blocks are what hurt per_block).

    bytes (each way)    = num_layers · 2 · num_blocks · block_size · num_kv_heads · head_dim · 2
    bandwidth_gbps      = bytes / median_s / 1e9
    fraction_of_ceiling = bandwidth_gbps / ceiling_gbps, where the ceiling is one contiguous
                          copy of the same bytes (CUDA: one pinned cudaMemcpy each way; CPU: one
                          memcpy), also shown as the "ceiling" row.

CUDA (not yet run on a GPU): 1k-32k tokens from a 64k-token cache, host side pinned;
"triton" is zero-copy, "triton_staged" gathers on the device and makes one bulk copy;
"batched_dma" is one cuMemcpyBatchAsync call (skipped without cuda-python).
CPU: 16 and 2048 tokens; triton runs in the interpreter (a correctness tool, far slower than
compiled code) at 16 tokens only.
"""

import functools

import pytest
import torch

from kvbench.calibration.timing import measure, synchronize
from kvbench.models import get_model
from kvbench.ops import (
    allocate_kv_cache,
    packed_bytes,
    packed_shape,
    prepare_block_ids,
    swap_in,
    swap_out,
)
from kvbench.ops.kv_copy import COPY_IMPLS
from kvbench.reference import swap_in_ref, swap_out_ref

MODEL = get_model("llama-3-8b")
BLOCK_SIZES = (8, 16, 32) if torch.cuda.is_available() else (8, 16)  # 16 tokens: no 32
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TOKENS = (1024, 4096, 16384, 32768) if CUDA else (16, 2048)  # CPU: 2 MB and 256 MB
INTERPRETER_MAX_TOKENS = 16
IMPLS = ("ceiling", "triton") + (("triton_staged",) if CUDA else ()) + ("torch", "per_block") \
    + (("batched_dma",) if CUDA else ())
OPTIONS = {"triton": {"impl": "triton", "zero_copy": True if CUDA else None},
           "batched_dma": {"impl": "batched_dma"},
           "triton_staged": {"impl": "triton", "zero_copy": False},
           "torch": {"impl": "torch"}, "per_block": {"impl": "per_block"}}
_CEILING_GBPS: dict[tuple, float] = {}


@functools.cache
def kv_cache(block_size: int) -> torch.Tensor:
    """A cache holding twice the largest request, one per block size (CUDA: 8 GB each)."""
    num_blocks = 2 * max(TOKENS) // block_size
    return allocate_kv_cache(MODEL.num_layers, num_blocks, block_size, MODEL.num_kv_heads,
                             MODEL.head_dim, torch.bfloat16, device=DEVICE, seed=0)


def contiguous_copy(direction: str, device_buffer: torch.Tensor, host: torch.Tensor):
    """The ceiling: one bulk copy of the same bytes (device -> host for swap_out)."""
    if direction == "swap_out":
        return lambda: host.copy_(device_buffer, non_blocking=True)
    return lambda: device_buffer.copy_(host, non_blocking=True)


def ceiling_gbps(direction: str, device_buffer: torch.Tensor, host: torch.Tensor) -> float:
    """GB/s of `contiguous_copy` by the calibration's own timer (CUDA events on GPU), measured
    once per direction and size."""
    key = (direction, host.numel())
    if key not in _CEILING_GBPS:
        timing = measure(contiguous_copy(direction, device_buffer, host), DEVICE.type, reps=5)
        _CEILING_GBPS[key] = host.numel() * host.element_size() / timing.median_ms / 1e6
    return _CEILING_GBPS[key]


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", ["swap_out", "swap_in"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_kv_copy(benchmark, timed, block_size, direction, impl, num_tokens):
    reason = COPY_IMPLS[OPTIONS[impl]["impl"]].unavailable(DEVICE) if impl in OPTIONS else None
    if reason:
        pytest.skip(reason)
    if impl == "triton" and not CUDA and num_tokens > INTERPRETER_MAX_TOKENS:
        pytest.skip(f"the Triton interpreter is timed at {INTERPRETER_MAX_TOKENS} tokens only")
    benchmark.group = f"{direction} {num_tokens} tokens, block size {block_size}"
    cache = kv_cache(block_size)
    num_blocks = num_tokens // block_size
    ids = torch.randperm(cache.shape[2], generator=torch.Generator().manual_seed(num_tokens))
    # scattered through the cache, as after fragmentation; checked and uploaded once, untimed
    ids = prepare_block_ids(cache, ids[:num_blocks])
    shape = packed_shape(cache, num_blocks)
    generator = torch.Generator(device=DEVICE).manual_seed(num_tokens)  # random on the device
    device_buffer = torch.randn(shape, generator=generator, device=DEVICE, dtype=cache.dtype)
    host = torch.empty(shape, dtype=cache.dtype, pin_memory=CUDA)
    host.copy_(torch.randn(shape, generator=generator, device=DEVICE, dtype=cache.dtype))

    if impl == "ceiling":
        fn = contiguous_copy(direction, device_buffer, host)
        fn()
        synchronize(DEVICE.type)
        assert torch.equal(host.to(DEVICE), device_buffer)
    elif direction == "swap_out":
        fn = lambda: swap_out(cache, ids, host, **OPTIONS[impl])  # noqa: E731
        fn()
        synchronize(DEVICE.type)
        assert torch.equal(host.to(DEVICE), swap_out_ref(cache, ids.host))
    else:
        fn = lambda: swap_in(host, cache, ids, **OPTIONS[impl])  # noqa: E731
        expected = swap_in_ref(host, cache, ids.host)
        fn()
        synchronize(DEVICE.type)
        assert torch.equal(cache, expected)
        del expected

    rounds = 3 if impl == "per_block" or (impl == "triton" and not CUDA) else 10
    seconds = timed(fn, rounds)
    nbytes = packed_bytes(cache, num_blocks)
    info = {"impl": impl, "direction": direction, "device": str(DEVICE), "num_tokens": num_tokens,
            "num_blocks": num_blocks, "block_size": block_size, "dtype": "bfloat16",
            "bytes": nbytes}
    if seconds is not None:
        # the ceiling row is its own reference; the others use one shared measurement per size
        ceiling = (nbytes / seconds / 1e9 if impl == "ceiling"
                   else ceiling_gbps(direction, device_buffer, host))
        info.update(median_ms=seconds * 1e3, bandwidth_gbps=nbytes / seconds / 1e9,
                    ceiling_gbps=ceiling, fraction_of_ceiling=nbytes / seconds / 1e9 / ceiling)
    benchmark.extra_info.update(info)
