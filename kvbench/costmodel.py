"""Cost of preempting a request of n tokens: swap (linear) or recompute (quadratic).

    swap_out_ms(n)  = swap_out_fixed_ms + swap_out_ms_per_token·n
                      + swap_out_ms_per_block·ceil(n / block_size)
    swap_in_ms(n)   = the same with the swap_in_* coefficients
    swap_ms(n)      = swap_out_ms(n) + swap_in_ms(n)
    recompute_ms(n) = recompute_fixed_ms + recompute_ms_per_token·n + recompute_ms_per_token_sq·n²

A swap is two transfers of different prices: out (device to host, when the request is preempted)
and in (host to device, when it resumes); `swap_ms` is their round trip, what the selector weighs
against recompute. Recompute is a fresh prefill of the n tokens; its n² term is causal attention
(token i attends to the i tokens before it). A request with 0 tokens holds no KV: every cost is
0. Evaluation is vectorized over numpy arrays.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.hardware import HardwareSpec
from kvbench.limits import MAX_TOKENS
from kvbench.models import ModelSpec

CROSSOVER_SEARCH_TOKENS = 1 << 21


def unknown_key_message(key: Any, known: tuple[str, ...]) -> str:
    hint = difflib.get_close_matches(str(key), known, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"config: unknown key {key!r}{suggestion}; known keys: {', '.join(known)}"


def check_coefficient(key: str, value: Any) -> float:
    """A finite, non-negative number, or TypeError/ValueError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"config: {key} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise KvbenchError(f"config: {key} must be finite, got {value}")
    if value < 0:
        raise KvbenchError(f"config: {key} must be non-negative, got {value}")
    return value


def check_positive_int(key: str, value: Any) -> int:
    """A positive integer up to MAX_TOKENS (block sizes, tensor-parallel degrees)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"config: {key} must be a positive integer, got {value!r}")
    if not 1 <= value <= MAX_TOKENS:
        raise KvbenchError(f"config: {key} must be a positive integer up to {MAX_TOKENS}, got "
                         f"{value}")
    return int(value)


def check_analytic(hw: HardwareSpec, coefficients: dict[str, float]) -> dict[str, float]:
    """Coefficients computed from datasheet figures, if all are finite (a rate near 0, e.g.
    achieved_fraction 1e-320, overflows them): ValueError naming the first that is not."""
    for key, value in coefficients.items():
        if not math.isfinite(value):
            raise KvbenchError(f"hardware {hw.name!r}: its figures give {key} = {value}; the rates "
                             f"are too small to price with (achieved_fraction "
                             f"{hw.achieved_fraction:g}, peak_tflops {hw.peak_tflops:g}, links "
                             f"{hw.h2d_gbps:g}/{hw.d2h_gbps:g} GB/s, memory {hw.hbm_gbps:g} GB/s)")
    return coefficients


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """The coefficients: what a fit produces, a profile stores, the selector and simulator use."""

    swap_out_fixed_ms: float
    swap_out_ms_per_token: float
    swap_out_ms_per_block: float = 0.0
    swap_in_fixed_ms: float
    swap_in_ms_per_token: float
    swap_in_ms_per_block: float = 0.0
    block_size: int = 16
    recompute_fixed_ms: float
    recompute_ms_per_token: float
    recompute_ms_per_token_sq: float

    def _transfer_ms(self, num_tokens, fixed_ms: float, ms_per_token: float,
                     ms_per_block: float) -> np.ndarray:
        n = np.asarray(num_tokens, dtype=np.float64)
        blocks = np.ceil(n / self.block_size)
        return np.where(n > 0, fixed_ms + ms_per_token * n + ms_per_block * blocks, 0.0)

    def swap_out_ms(self, num_tokens) -> np.ndarray:
        """The KV cache of n tokens out to host memory (device to host)."""
        return self._transfer_ms(num_tokens, self.swap_out_fixed_ms, self.swap_out_ms_per_token,
                                 self.swap_out_ms_per_block)

    def swap_in_ms(self, num_tokens) -> np.ndarray:
        """The KV cache of n tokens back from host memory (host to device)."""
        return self._transfer_ms(num_tokens, self.swap_in_fixed_ms, self.swap_in_ms_per_token,
                                 self.swap_in_ms_per_block)

    def swap_ms(self, num_tokens) -> np.ndarray:
        """The round trip, out and back in: what a swap costs against a recompute.

        With out and in each half of a round-trip coefficient (`from_dict`, a v1 profile) this
        is bit for bit the round-trip formula: halving a (normal) float is exact."""
        return self.swap_out_ms(num_tokens) + self.swap_in_ms(num_tokens)

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
        recompute_cheaper = ~self.prefer_swap(n)
        if recompute_cheaper[-1]:
            return None
        last = np.flatnonzero(recompute_cheaper)
        return int(last[-1]) + 2 if last.size else 1

    def price(self, num_tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Swap cost, recompute cost and whether to swap: swapping wins exact ties."""
        swap, recompute = self.swap_ms(num_tokens), self.recompute_ms(num_tokens)
        return swap, recompute, swap <= recompute

    def prefer_swap(self, num_tokens) -> np.ndarray:
        """Per request: is swapping no dearer than recomputing? (see `price`)"""
        return self.price(num_tokens)[2]

    def to_dict(self) -> dict:
        """The selector's coefficient dict: the field names are the keys."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> CostModel:
        """Validate a coefficient dict (the selector's). Raises ValueError/TypeError naming the
        key.

        The swap is given one of two ways, not both: each direction (the field names,
        `swap_out_*` and `swap_in_*`, as `to_dict` writes them), or the round trip
        (`ROUND_TRIP_KEYS`: `swap_fixed_ms`, `swap_ms_per_token`, `swap_ms_per_block`), each
        coefficient then split evenly between out and in, so `swap_ms` is the round trip given.
        The `*_ms_per_block` keys and `block_size` are optional."""
        known = COEFFICIENT_KEYS + ROUND_TRIP_KEYS
        unknown = [k for k in config if k not in known]
        if unknown:
            raise KvbenchError(unknown_key_message(unknown[0], known))
        round_trip = [k for k in config if k in ROUND_TRIP_KEYS]
        one_way = [k for k in config if k.startswith(("swap_out_", "swap_in_"))]
        if round_trip and one_way:
            raise KvbenchError(f"config: {round_trip[0]!r} prices the swap round trip and "
                             f"{one_way[0]!r} one direction; give the round trip "
                             f"({', '.join(ROUND_TRIP_KEYS)}) or each direction (swap_out_*, "
                             "swap_in_*), not both")
        if one_way:
            required, instead = REQUIRED_KEYS, "the round trip: swap_fixed_ms, swap_ms_per_token"
        else:
            required, instead = ROUND_TRIP_REQUIRED_KEYS, "each direction: swap_out_*, swap_in_*"
        missing = [k for k in required if k not in config]
        if missing:
            raise KvbenchError(f"config: missing key {missing[0]!r} (required: "
                             f"{', '.join(required)}; the swap may be given as {instead})")
        values = {k: check_positive_int(k, v) if k == "block_size" else
                  check_coefficient(k, v) for k, v in config.items()}
        for key in round_trip:
            term = key.removeprefix("swap_")
            values[f"swap_out_{term}"] = values[f"swap_in_{term}"] = values.pop(key) / 2
        return cls(**values)

    @classmethod
    def analytic(cls, model: ModelSpec, hw: HardwareSpec, block_size: int = 16) -> CostModel:
        """Costs from first principles.

        Swap moves kv_bytes_per_token·n bytes each way, out over the device-to-host link and in
        over the host-to-device link:
            swap_out_ms_per_token = kv_bytes_per_token / d2h / 1e6      (GB/s = 1e9 B/s)
            swap_in_ms_per_token  = kv_bytes_per_token / h2d / 1e6
            swap_{out,in}_fixed_ms = transfer_latency_ms,
            swap_{out,in}_ms_per_block = block_copy_overhead_ms
        Recompute runs the prefill FLOPs at achieved_fraction of peak_tflops:
            rate (FLOP/ms) = peak_tflops · 1e12 · achieved_fraction / 1e3
            ms_per_token   = linear_flops_per_token / rate
            ms_per_token_sq= 2·H·d·L / tp / rate          (causal attention)
            fixed_ms       = lm_head_flops / rate + launch_overhead_ms
        """
        kvb = model.kv_bytes_per_token
        rate = hw.peak_tflops * 1e12 * hw.achieved_fraction / 1e3
        return cls(**check_analytic(hw, dict(
            swap_out_fixed_ms=hw.transfer_latency_ms,
            swap_out_ms_per_token=kvb / hw.d2h_gbps / 1e6,
            swap_out_ms_per_block=hw.block_copy_overhead_ms,
            swap_in_fixed_ms=hw.transfer_latency_ms,
            swap_in_ms_per_token=kvb / hw.h2d_gbps / 1e6,
            swap_in_ms_per_block=hw.block_copy_overhead_ms,
            recompute_fixed_ms=model.lm_head_flops / rate + hw.launch_overhead_ms,
            recompute_ms_per_token=model.linear_flops_per_token / rate,
            recompute_ms_per_token_sq=model.attention_flops_per_token_sq / rate,
        )), block_size=block_size)


COEFFICIENT_KEYS = tuple(f.name for f in dataclasses.fields(CostModel))
REQUIRED_KEYS = tuple(f.name for f in dataclasses.fields(CostModel)
                      if f.default is dataclasses.MISSING)
ROUND_TRIP_KEYS = ("swap_fixed_ms", "swap_ms_per_token", "swap_ms_per_block")  # split evenly
ROUND_TRIP_REQUIRED_KEYS = ("swap_fixed_ms", "swap_ms_per_token") + tuple(
    k for k in REQUIRED_KEYS if not k.startswith("swap_"))


@dataclass(frozen=True)
class DecodeModel:
    """One decode step for a batch of B sequences at mean context T: d0 + d1·B + d2·B·T (ms)."""

    d0_ms: float
    d1_ms_per_seq: float
    d2_ms_per_seq_token: float

    def step_ms(self, batch_size, mean_context):
        """ms of a step (batch_size and mean_context: numbers or arrays); plain numbers stay
        Python floats, as the simulator prices a step this way once per step."""
        b = (float(batch_size) if isinstance(batch_size, int | float)
             else np.asarray(batch_size, dtype=np.float64))
        return self.d0_ms + self.d1_ms_per_seq * b + self.d2_ms_per_seq_token * b * mean_context

    @classmethod
    def analytic(cls, model: ModelSpec, hw: HardwareSpec) -> DecodeModel:
        """Memory-bound decode: read all weights once per step (d0), each sequence's linear
        FLOPs at the achieved rate (d1), and each cached token's K and V once (d2)."""
        rate = hw.peak_tflops * 1e12 * hw.achieved_fraction / 1e3
        bytes_per_ms = hw.hbm_gbps * 1e6
        return cls(**check_analytic(hw, dict(
            d0_ms=model.weight_bytes / bytes_per_ms + hw.launch_overhead_ms,
            d1_ms_per_seq=(model.linear_flops_per_token + model.lm_head_flops) / rate,
            d2_ms_per_seq_token=model.kv_bytes_per_token / bytes_per_ms,
        )))
