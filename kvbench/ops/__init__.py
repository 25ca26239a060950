"""Typed host wrappers: shape checks, grids, launches and the choice of implementation.

    swap_out(kv_cache, block_ids, dst=None, impl="auto", **options) -> Tensor
    swap_in(src, kv_cache, block_ids, impl="auto", **options) -> None
    prefill_attention(q, k, v, causal=True, sm_scale=None, impl="auto", cu_seqlens=None,
                      **options) -> Tensor

Each op keeps its implementations in a registry {name: Impl} (`kvbench.ops.registry`).
"""

from kvbench.ops.kv_copy import (
    COPY_IMPLS,
    allocate_kv_cache,
    copy_impls,
    packed_bytes,
    packed_shape,
    prepare_block_ids,
    swap_in,
    swap_out,
)
from kvbench.ops.prefill_attention import (
    ATTENTION_IMPLS,
    attention_config,
    attention_impls,
    prefill_attention,
)

__all__ = ["ATTENTION_IMPLS", "COPY_IMPLS", "allocate_kv_cache", "attention_config",
           "attention_impls", "copy_impls", "packed_bytes", "packed_shape", "prepare_block_ids",
           "prefill_attention", "swap_in", "swap_out"]
