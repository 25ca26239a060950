"""What a calibration sweeps, per device and mode (`PLANS`): the token counts of the swap and
prefill sweeps, the decode grid, and the seconds the interleaved rounds of the swap and prefill
points may take (kvbench/calibration/schedule.py). The memory plan (memory.py) and the time plan
(timeplan.py) cut these down to what fits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def geometric_sizes(lo: int, hi: int, count: int) -> list[int]:
    return sorted({int(round(x)) for x in np.geomspace(lo, hi, count)})


@dataclass(frozen=True)
class TokenSweep:
    """`num_points` token counts from `min_tokens` to `max_tokens`, spaced geometrically."""

    min_tokens: int
    max_tokens: int
    num_points: int

    def sizes(self) -> list[int]:
        return geometric_sizes(self.min_tokens, self.max_tokens, self.num_points)


@dataclass(frozen=True, kw_only=True)
class CalibrationPlan:
    """The sizes and seconds a calibration starts from, before memory and time cut them."""

    swap_tokens: TokenSweep
    prefill_tokens: TokenSweep
    decode_batch_sizes: tuple[int, ...]
    decode_contexts: tuple[int, ...]  # decode measures every (batch size, context) pair
    per_block_max_tokens: int | None  # the per-block copy's last size (slow baseline); None: all
    swap_interleave_s: float
    prefill_interleave_s: float

    @property
    def interleave_s(self) -> dict[str, float]:
        """The interleaved rounds' seconds by phase, as the time plan and the schedule take them."""
        return {"swap": self.swap_interleave_s, "prefill": self.prefill_interleave_s}


PLANS = {
    ("cpu", True): CalibrationPlan(
        swap_tokens=TokenSweep(16, 16384, 10), prefill_tokens=TokenSweep(32, 2048, 9),
        decode_batch_sizes=(1, 4, 16, 32), decode_contexts=(256, 1024),
        per_block_max_tokens=4096, swap_interleave_s=4.0, prefill_interleave_s=8.0),
    ("cpu", False): CalibrationPlan(
        swap_tokens=TokenSweep(16, 65536, 14), prefill_tokens=TokenSweep(32, 8192, 13),
        decode_batch_sizes=(1, 2, 4, 8, 16, 32, 64), decode_contexts=(256, 1024, 4096),
        per_block_max_tokens=16384, swap_interleave_s=15.0, prefill_interleave_s=40.0),
    ("cuda", True): CalibrationPlan(
        swap_tokens=TokenSweep(16, 16384, 10), prefill_tokens=TokenSweep(128, 16384, 9),
        decode_batch_sizes=(1, 8, 32, 128), decode_contexts=(512, 4096),
        per_block_max_tokens=4096, swap_interleave_s=2.0, prefill_interleave_s=2.0),
    ("cuda", False): CalibrationPlan(
        swap_tokens=TokenSweep(16, 65536, 14), prefill_tokens=TokenSweep(128, 32768, 13),
        decode_batch_sizes=(1, 4, 16, 64, 128, 256), decode_contexts=(512, 2048, 8192),
        per_block_max_tokens=8192, swap_interleave_s=5.0, prefill_interleave_s=5.0),
}


def sweep_plan(device: str, quick: bool, plan: CalibrationPlan | None = None) -> CalibrationPlan:
    """`plan`, or by default `PLANS[(device, quick)]` (a variant of it: `dataclasses.replace`)."""
    return PLANS[(device, quick)] if plan is None else plan
