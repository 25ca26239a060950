"""Calibration sweeps: the swap space and the requests a swap point rotates through."""

import pytest
import torch

from kvbench.calibration.sweeps import swap_requests, swap_space
from kvbench.models import get_model
from kvbench.ops import packed_shape
from kvbench.ops.kv_copy import BlockIds


@pytest.mark.parametrize("model, block_size", [("qwen2.5-0.5b", 16), ("llama-3-8b", 32)])
@pytest.mark.parametrize("num_tokens", [1, 17, 1000, 4096])
def test_swap_requests_are_aligned_prepared_and_inside_the_swap_space(model, block_size,
                                                                      num_tokens):
    """On the meta device (shapes only, real addresses relative to the swap space): every host
    buffer starts on a 16-byte boundary, ids are prepared for the cache, buffers fit."""
    spec = get_model(model)
    cache, host = swap_space(spec, "meta", block_size, max_blocks=8192 // block_size)
    reqs = swap_requests(spec, cache, host, block_size, num_tokens, torch.Generator())
    num_blocks = -(-num_tokens // block_size)
    assert len(reqs) >= 8
    for ids, buffer in reqs:
        assert isinstance(ids, BlockIds) and ids.numel() == num_blocks
        assert ids.num_cache_blocks == cache.shape[2]
        assert buffer.shape == packed_shape(cache, num_blocks)
        offset = buffer.data_ptr() - host.data_ptr()
        assert offset % 16 == 0
        assert offset + buffer.numel() * buffer.element_size() <= host.numel() * 2
    starts = [buffer.data_ptr() for _, buffer in reqs]
    assert len(set(starts)) == len(starts)  # distinct buffers: the rotation is cold


def test_swap_space_on_cpu_is_filled_and_half_the_cache():
    cache, host = swap_space(get_model("qwen2.5-0.5b"), "cpu", 16, max_blocks=4)
    assert cache.shape[2] == 8 and host.numel() * 2 == cache.numel()
    assert bool((host == 1).all()) and cache.count_nonzero() > 0.99 * cache.numel()
