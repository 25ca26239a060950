"""Plain-torch references for every op in `kvbench.ops`, and how results are compared.

Copies must match their reference bit for bit (`torch.equal`). Attention is compared with a
float64 reference by relative error ‖out − ref‖_F / ‖ref‖_F, bounded per input dtype by
`ATTENTION_RTOL`: half precision rounds the softmax weights P to the input dtype before P·V
(as FlashAttention does) and the output once more, so the bound is a few units of that dtype's
rounding error (fp16 2⁻¹¹ ≈ 4.9e-4, bf16 2⁻⁸ ≈ 3.9e-3); float32 runs in IEEE float32.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch

ATTENTION_RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def swap_out_ref(kv_cache: torch.Tensor, block_ids) -> torch.Tensor:
    """kv_cache[:, :, block_ids] as a new tensor on the cache's device."""
    ids = torch.as_tensor(block_ids, dtype=torch.int64, device=kv_cache.device)
    return kv_cache[:, :, ids].clone()


def swap_in_ref(src: torch.Tensor, kv_cache: torch.Tensor, block_ids) -> torch.Tensor:
    """A copy of kv_cache with blocks block_ids replaced by src (the input is not modified)."""
    ids = torch.as_tensor(block_ids, dtype=torch.int64, device=kv_cache.device)
    expected = kv_cache.clone()
    expected[:, :, ids] = src.to(kv_cache.device)
    return expected


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                          sm_scale: float | None = None,
                          cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ·sm_scale + mask) V per sequence and head, in float64: [n, Hq, d].

    The mask is -inf where key j > query i (causal). Query head h reads KV head h // (Hq/Hkv).
    Memory: one [Hq, len, len] float64 score matrix per sequence.
    """
    n, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    starts = [0, n] if cu_seqlens is None else cu_seqlens.tolist()
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for start, stop in pairwise(starts):
        qs = q[start:stop].double().transpose(0, 1)  # [Hq, len, d]
        ks = k[start:stop].double().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:stop].double().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) * scale
        if causal:
            above = torch.ones(stop - start, stop - start, dtype=torch.bool, device=q.device)
            scores.masked_fill_(above.triu(1), float("-inf"))
        out[start:stop] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1)
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖_F / ‖ref‖_F, computed in float64."""
    ref = ref.double()
    return float(torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref))


def preemption_costs_ref(num_tokens: int, config: dict) -> tuple[float, float]:
    """Swap and recompute cost (ms) of one request in plain Python, from a coefficient dict
    that gives the swap as a round trip (`swap_*`) or each way (`swap_out_*` + `swap_in_*`)."""
    if num_tokens == 0:
        return 0.0, 0.0
    blocks = math.ceil(num_tokens / config.get("block_size", 16))
    swap = sum(config[f"{p}_fixed_ms"] + config[f"{p}_ms_per_token"] * num_tokens
               + config.get(f"{p}_ms_per_block", 0.0) * blocks
               for p in (("swap",) if "swap_fixed_ms" in config else ("swap_out", "swap_in")))
    recompute = (config["recompute_fixed_ms"] + config["recompute_ms_per_token"] * num_tokens
                 + config["recompute_ms_per_token_sq"] * num_tokens * num_tokens)
    return swap, recompute


def select_preemption_strategy_ref(token_counts: list[int], config: dict) -> dict:
    """`kvbench.select_preemption_strategy` one request at a time (the straightforward loop)."""
    strategies, swap_costs, recompute_costs, total = [], [], [], 0.0
    for n in token_counts:
        swap, recompute = preemption_costs_ref(n, config)
        strategies.append("swap" if swap <= recompute else "recompute")
        total += min(swap, recompute)
        swap_costs.append(round(swap, 4))
        recompute_costs.append(round(recompute, 4))
    return {"strategies": strategies, "swap_costs_ms": swap_costs,
            "recompute_costs_ms": recompute_costs, "total_cost_ms": round(total, 4)}
