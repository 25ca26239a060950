"""Cost of preempting a request of n tokens: swap (linear) or recompute (quadratic).

    swap_ms(n)      = swap_fixed_ms + swap_ms_per_token·n + swap_ms_per_block·ceil(n / block_size)
    recompute_ms(n) = recompute_fixed_ms + recompute_ms_per_token·n + recompute_ms_per_token_sq·n²

Swap is the round trip: the KV cache out to CPU memory and back in. Recompute is a fresh prefill of
the n tokens; its n² term is causal attention (token i attends to the i tokens before it). A
request with 0 tokens holds no KV: both costs are 0. Evaluation is vectorized over numpy arrays.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kvbench.hardware import HardwareSpec
from kvbench.models import ModelSpec

SWAP_KEYS = ("swap_fixed_ms", "swap_ms_per_token", "swap_ms_per_block", "block_size")
RECOMPUTE_KEYS = ("recompute_fixed_ms", "recompute_ms_per_token", "recompute_ms_per_token_sq")
COEFFICIENT_KEYS = SWAP_KEYS + RECOMPUTE_KEYS
OPTIONAL_DEFAULTS = {"swap_ms_per_block": 0.0, "block_size": 16}
CROSSOVER_SEARCH_TOKENS = 1 << 21


@dataclass(frozen=True)
class CostModel:
    swap_fixed_ms: float
    swap_ms_per_token: float
    recompute_fixed_ms: float
    recompute_ms_per_token: float
    recompute_ms_per_token_sq: float
    swap_ms_per_block: float = 0.0
    block_size: int = 16

    def swap_ms(self, num_tokens) -> np.ndarray:
        n = np.asarray(num_tokens, dtype=np.float64)
        blocks = np.ceil(n / self.block_size)
        cost = self.swap_fixed_ms + self.swap_ms_per_token * n + self.swap_ms_per_block * blocks
        return np.where(n > 0, cost, 0.0)

    def recompute_ms(self, num_tokens) -> np.ndarray:
        n = np.asarray(num_tokens, dtype=np.float64)
        cost = (self.recompute_fixed_ms + self.recompute_ms_per_token * n
                + self.recompute_ms_per_token_sq * n * n)
        return np.where(n > 0, cost, 0.0)

    def crossover_tokens(self, max_tokens: int = CROSSOVER_SEARCH_TOKENS) -> int | None:
        """Smallest n from which swap is never dearer than recompute, up to max_tokens.

        None when recompute stays cheaper at max_tokens.
        """
        n = np.arange(1, max_tokens + 1)
        recompute_cheaper = self.recompute_ms(n) < self.swap_ms(n)
        if recompute_cheaper[-1]:
            return None
        last = np.flatnonzero(recompute_cheaper)
        return int(last[-1]) + 2 if last.size else 1

    def to_config(self) -> dict:
        """The selector's coefficient dict (see `kvbench.selector`)."""
        d = asdict(self)
        return {"swap_fixed_ms": d["swap_fixed_ms"], "swap_ms_per_token": d["swap_ms_per_token"],
                "swap_ms_per_block": d["swap_ms_per_block"], "block_size": d["block_size"],
                "recompute_fixed_ms": d["recompute_fixed_ms"],
                "recompute_ms_per_token": d["recompute_ms_per_token"],
                "recompute_ms_per_token_sq": d["recompute_ms_per_token_sq"]}

    @classmethod
    def from_config(cls, config: dict) -> CostModel:
        """From an already validated coefficient dict (`kvbench.selector.validate_config`)."""
        return cls(**{k: config[k] for k in COEFFICIENT_KEYS})

    @classmethod
    def analytic(cls, model: ModelSpec, hw: HardwareSpec, block_size: int = 16) -> CostModel:
        """Costs from first principles.

        Swap moves kv_bytes_per_token·n bytes each way:
            ms_per_token = kv_bytes_per_token · (1/d2h + 1/h2d) / 1e6   (GB/s = 1e9 B/s)
            fixed_ms     = 2 · transfer_latency_ms,  ms_per_block = 2 · block_copy_overhead_ms
        Recompute runs the prefill FLOPs at achieved_fraction of peak_tflops:
            rate (FLOP/ms) = peak_tflops · 1e12 · achieved_fraction / 1e3
            ms_per_token   = linear_flops_per_token / rate
            ms_per_token_sq= 2·H·d·L / tp / rate          (causal attention)
            fixed_ms       = lm_head_flops / rate + launch_overhead_ms
        """
        kvb = model.kv_bytes_per_token
        rate = hw.peak_tflops * 1e12 * hw.achieved_fraction / 1e3
        return cls(
            swap_fixed_ms=2 * hw.transfer_latency_ms,
            swap_ms_per_token=kvb * (1 / hw.d2h_gbps + 1 / hw.h2d_gbps) / 1e6,
            swap_ms_per_block=2 * hw.block_copy_overhead_ms,
            block_size=block_size,
            recompute_fixed_ms=model.lm_head_flops / rate + hw.launch_overhead_ms,
            recompute_ms_per_token=model.linear_flops_per_token / rate,
            recompute_ms_per_token_sq=model.attention_flops_per_token_sq / rate,
        )


@dataclass(frozen=True)
class DecodeModel:
    """One decode step for a batch of B sequences at mean context T: d0 + d1·B + d2·B·T (ms)."""

    d0_ms: float
    d1_ms_per_seq: float
    d2_ms_per_seq_token: float

    def step_ms(self, batch_size, mean_context):
        b = np.asarray(batch_size, dtype=np.float64)
        return self.d0_ms + self.d1_ms_per_seq * b + self.d2_ms_per_seq_token * b * mean_context

    @classmethod
    def analytic(cls, model: ModelSpec, hw: HardwareSpec) -> DecodeModel:
        """Memory-bound decode: read all weights once per step (d0), each sequence's linear
        FLOPs at the achieved rate (d1), and each cached token's K and V once (d2)."""
        rate = hw.peak_tflops * 1e12 * hw.achieved_fraction / 1e3
        bytes_per_ms = hw.hbm_gbps * 1e6
        return cls(
            d0_ms=model.weight_bytes / bytes_per_ms + hw.launch_overhead_ms,
            d1_ms_per_seq=(model.linear_flops_per_token + model.lm_head_flops) / rate,
            d2_ms_per_seq_token=model.kv_bytes_per_token / bytes_per_ms,
        )
