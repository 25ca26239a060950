"""Per-request choice between swapping a request's KV cache out and back, or recomputing it.

`select_preemption_strategy(token_counts, config)` prices both strategies for every request and
picks the cheaper; exactly equal costs choose swap. A swap costs its round trip, swap-out plus
swap-in (`CostModel.swap_ms`). `config` is one of:

* a coefficient dict (`CostModel.from_dict`) with exactly the keys `recompute_fixed_ms`,
  `recompute_ms_per_token`, `recompute_ms_per_token_sq`, the swap's, and optionally
  `block_size` (default 16). The swap is given as a round trip, `swap_fixed_ms` and
  `swap_ms_per_token` (optionally `swap_ms_per_block`, default 0), split evenly between out and
  in; or each way, `swap_out_fixed_ms`, `swap_out_ms_per_token`, `swap_in_fixed_ms`,
  `swap_in_ms_per_token` (optionally `swap_out_ms_per_block` and `swap_in_ms_per_block`), the
  keys `CostModel.to_dict` writes;
* an analytic description: `model` (a preset name, see `kvbench models`), optionally `hardware`
  (a preset name, default "h100-sxm"), `dtype`, `tp`, `block_size`, and any hardware field to
  override: `h2d_gbps`, `d2h_gbps`, `transfer_latency_ms`, `peak_tflops`, `achieved_fraction`,
  `hbm_gbps`, `block_copy_overhead_ms`, `launch_overhead_ms`;
* a profile: a `kvbench.profile.Profile` or the path of a profile JSON.

Token counts are integers from 0 to `kvbench.limits.MAX_TOKENS` (2**31).
"""

from __future__ import annotations

import math
import numbers
from os import PathLike
from typing import Any

import numpy as np
from rich.table import Table

from kvbench.costmodel import (
    CostModel,
    check_coefficient,
    check_positive_int,
    unknown_key_message,
)
from kvbench.errors import KvbenchError
from kvbench.hardware import HARDWARE_FIELDS, get_hardware
from kvbench.limits import MAX_COST_MS, MAX_TOKENS
from kvbench.models import get_model

ANALYTIC_KEYS = ("model", "hardware", "dtype", "tp", "block_size") + HARDWARE_FIELDS
INT_TYPES = (int, np.integer)
STRATEGY_NAMES = np.array(["recompute", "swap"], dtype=object)  # indexed by use_swap


def _analytic_cost_model(config: dict) -> CostModel:
    unknown = [k for k in config if k not in ANALYTIC_KEYS]
    if unknown:
        raise KvbenchError(unknown_key_message(unknown[0], ANALYTIC_KEYS))
    model = get_model(config["model"], dtype=config.get("dtype"),
                      tp=check_positive_int("tp", config.get("tp", 1)))
    overrides = {k: check_coefficient(k, config[k]) for k in HARDWARE_FIELDS if k in config}
    hw = get_hardware(config.get("hardware", "h100-sxm"), **overrides)
    return CostModel.analytic(model, hw,
                              block_size=check_positive_int("block_size",
                                                            config.get("block_size", 16)))


def cost_model_from(config: Any) -> CostModel:
    """Build the cost model from any accepted config form (see the module docstring)."""
    from kvbench.profile import Profile, load

    if isinstance(config, (str, PathLike)):
        config = load(config)
    if isinstance(config, Profile):
        return config.cost_model()
    if not isinstance(config, dict):
        raise TypeError("config must be a coefficient dict, an analytic dict with 'model', a "
                        f"Profile or a profile path; got {type(config).__name__}")
    if "model" in config:
        return _analytic_cost_model(config)
    return CostModel.from_dict(config)


def _first_bad_index(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _token_count(i: int, value: Any) -> int:
    """One token count checked on its own (the slow path, for lists with odd elements)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"request {i}: token count must be an integer, got bool {value!r}")
    if isinstance(value, numbers.Real) and not isinstance(value, INT_TYPES):
        value = float(value)
        if not math.isfinite(value) or value != int(value):
            raise KvbenchError(f"request {i}: token count must be a non-negative integer, got "
                             f"{value!r}")
    elif not isinstance(value, INT_TYPES):
        raise TypeError(f"request {i}: token count must be an integer, got "
                        f"{type(value).__name__} {value!r}")
    value = int(value)
    if value < 0:
        raise KvbenchError(f"request {i}: token count must be non-negative, got {value}")
    if value > MAX_TOKENS:
        raise KvbenchError(f"request {i}: token count {value} is too large (at most {MAX_TOKENS})")
    return value


def validate_token_counts(token_counts: Any) -> np.ndarray:
    """Token counts as an int64 array, each from 0 to `MAX_TOKENS`, or raise naming the first
    bad request index (TypeError for a value that is not a number, else ValueError)."""
    if isinstance(token_counts, np.ndarray):
        if token_counts.ndim != 1:
            raise KvbenchError(f"token_counts must be one-dimensional, got shape "
                             f"{token_counts.shape}")
        if token_counts.dtype.kind not in "iuf":  # bool, object, strings: value by value
            token_counts = token_counts.tolist()
    elif not isinstance(token_counts, (list, tuple)):
        raise TypeError("token_counts must be a list, tuple or numpy array of integers, got "
                        f"{type(token_counts).__name__}")
    if isinstance(token_counts, np.ndarray):
        arr = token_counts
    elif all(t is int or issubclass(t, np.signedinteger)
             for t in set(map(type, token_counts))):  # C-speed pass for the usual list of ints
        try:
            arr = np.asarray(token_counts, dtype=np.int64)
        except OverflowError:
            arr = np.array([_token_count(i, v) for i, v in enumerate(token_counts)],
                           dtype=np.int64)
    else:
        arr = np.array([_token_count(i, v) for i, v in enumerate(token_counts)], dtype=np.int64)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.floor(arr))
        if bad.any():
            i = _first_bad_index(bad)
            raise KvbenchError(f"request {i}: token count must be a non-negative integer, got "
                             f"{arr[i]!r}")
    bad = (arr < 0) | (arr > MAX_TOKENS)
    if bad.any():
        i = _first_bad_index(bad)
        _token_count(i, arr[i].item())  # raises, naming the request
    return arr.astype(np.int64, copy=False)


def select_preemption_strategy(token_counts: Any, config: Any) -> dict:
    """Choose swap or recompute for each request; see the module docstring for `config`.

    Returns plain Python values: `strategies` ("swap"/"recompute" per request, order kept),
    `swap_costs_ms` and `recompute_costs_ms` (rounded to 4 decimals) and `total_cost_ms` (the sum
    of the chosen, unrounded costs, rounded to 4 decimals). Costs are compared unrounded and
    exactly equal costs choose swap; a request with 0 tokens costs 0 both ways and is swapped.
    """
    n = validate_token_counts(token_counts)
    costs = cost_model_from(config)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
        swap, recompute, use_swap = costs.price(n)
    for name, cost in (("swap", swap), ("recompute", recompute)):
        beyond = ~(cost <= MAX_COST_MS)  # inf and NaN included
        if beyond.any():
            i = _first_bad_index(beyond)
            raise KvbenchError(f"request {i}: {name} cost overflows at {n[i]} tokens ({cost[i]:.3g}"
                             f" ms, beyond {MAX_COST_MS:g} ms); the cost coefficients are out of "
                             "range")
    chosen = np.where(use_swap, swap, recompute)
    return {
        "strategies": STRATEGY_NAMES[use_swap.view(np.int8)].tolist(),
        "swap_costs_ms": np.round(swap, 4).tolist(),
        "recompute_costs_ms": np.round(recompute, 4).tolist(),
        "total_cost_ms": float(np.round(chosen.sum(), 4)),
    }


def selection_table(token_counts: list[int], result: dict, title: str) -> Table:
    """The selector's answer as a table: tokens, both costs (4 decimals), the choice."""
    table = Table(title=title)
    for col in ("tokens", "swap_ms", "recompute_ms", "choice"):
        table.add_column(col, justify="left" if col == "choice" else "right")
    for n, s, r, c in zip(token_counts, result["swap_costs_ms"], result["recompute_costs_ms"],
                          result["strategies"]):
        table.add_row(str(n), f"{s:.4f}", f"{r:.4f}", c)
    return table
