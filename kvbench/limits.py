"""Bounds and type checks on the values a user gives, applied where they are read.

`MAX_TOKENS` (2**31) bounds every token count: a count given to the selector, a request's
prompt, output and generation limit in a trace or a synthetic mix. Within it a count squared
(the n² attention term, at most 2**62) and any two counts added stay exact in int64, so no
capacity or admission check can be defeated by wrap-around. It is far beyond any model's context.
`MAX_MODEL_DIM` (2**31) bounds each number of a model's shape, so byte and FLOP counts stay floats.
`MAX_BLOCKS` (2**40) bounds a KV cache's block count and `MAX_MEMORY_GIB` (2**20, a PiB) a
memory size: their products with block and byte sizes stay exact. `MAX_COST_MS` (1e100) bounds
a price in ms (the selector's, or a simulated step's at MAX_TOKENS tokens): sums of prices (a
simulated clock) stay finite, and a price rounds to 4 decimals without overflowing (np.round
scales by 1e4: 1e305 would round to inf).
"""

from __future__ import annotations

import math
import numbers

from kvbench.errors import KvbenchError

MAX_TOKENS = 1 << 31
MAX_MODEL_DIM = 1 << 31  # any size of a model's shape (layers, hidden, heads, vocabulary, ...)
MAX_BLOCKS = 1 << 40
MAX_MEMORY_GIB = float(1 << 20)
MAX_COST_MS = 1e100


def check_finite(name: str, value, *, low: float | None = None, high: float | None = None,
                 positive: bool = False, error: type[ValueError] = KvbenchError) -> float:
    """`value` as a float if it is a finite real number within [low, high] (and > 0 when
    `positive`); `error` (a ValueError) naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if positive and value <= 0:
        raise error(f"{name} must be positive, got {value:g}")
    if low is not None and value < low:
        raise error(f"{name} must be at least {low:g}, got {value:g}")
    if high is not None and value > high:
        raise error(f"{name} must be at most {high:g}, got {value:g}")
    return value


def check_name(what: str, name) -> str:
    """A preset name must be a string: anything else is a TypeError naming `what`."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a name (a string), got {type(name).__name__} {name!r}")
    return name


def check_int(name: str, value, low: int, high: int) -> int:
    """`value` as an int if it is an integer (not a bool) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not low <= value <= high:
        raise KvbenchError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return int(value)
