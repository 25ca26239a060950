"""Run-to-run stability of `kvbench calibrate`, judged by what a user relies on (issue 20).

benchmarks/stability.py runs the same calibration several times and keeps a row per run
(`run_row`); `judge` checks the rows against three criteria, each with the bound GOAL:

(a) held-out error: every run's swap-out, swap-in and recompute fits within GOAL on their
    held-out points;
(b) decisions: the selector's choice (swap when its cost is no more than recompute's, as
    `CostModel.price` decides for `select_preemption_strategy`) the same in every run at
    NUM_LENGTHS log-spaced lengths inside every run's measured range;
(c) costs: the predicted swap (the round trip) and recompute costs at those lengths within GOAL
    of each other across the runs once divided by the machine's speed in the same run: the
    mean of the reference workload timed before and after it (`extra.machine` of the profile).

The machine's own speed moves between runs (19-40% on a shared 2-core VM), and no fit can remove
that: a run on a machine 30% slower rightly predicts costs 30% higher. (c) divides it out; the
undivided spread is reported beside it.

Rows keep the phases of the profiles they came from: rows of version 1 profiles (saved before
swap-out and swap-in were fitted apart) have one `swap` phase, the round trip; `judge` reads
either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvbench.costmodel import CostModel
from kvbench.profile import parse

GOAL = 0.10
COEFFICIENTS = {"swap_out": ("fixed_ms", "ms_per_token", "ms_per_block"),
                "swap_in": ("fixed_ms", "ms_per_token", "ms_per_block"),
                "recompute": ("fixed_ms", "ms_per_token", "ms_per_token_sq")}
PREDICT_AT = (64, 1024, 8192)  # the table's predicted costs
NUM_LENGTHS = 64


def spread(values) -> float:
    """(max - min) / median; 0 for a number that is the same in every run."""
    values = np.asarray(values, dtype=np.float64)
    median = float(np.median(values))
    return 0.0 if np.ptp(values) == 0 else float(np.ptp(values) / abs(median)) if median else np.inf


def fitted_phases(row: dict) -> list[str]:
    """The fitted phases a row has a held-out error for (`COEFFICIENTS`, or a v1 row's)."""
    return [key.removesuffix("_heldout") for key in row if key.endswith("_heldout")]


def run_row(profile: dict) -> dict:
    """What a run's profile JSON contributes to its row: held-out errors, coefficients, predicted
    costs at PREDICT_AT and the reference workload's time before and after (the table's
    numbers), then `costs` (the selector's coefficient dict) and `fit_tokens` (each fit's valid
    range, [min, max]), from which `judge` prices any length again."""
    prof = parse(profile)
    costs = prof.cost_model()
    row = {}
    for phase, keys in COEFFICIENTS.items():
        section = getattr(prof, phase)
        row[f"{phase}_heldout"] = section.fit.heldout_mape
        row.update({f"{phase}.{k}": getattr(section, k) for k in keys})
    for n in PREDICT_AT:
        row[f"swap_ms({n})"] = float(costs.swap_ms(n))
        row[f"recompute_ms({n})"] = float(costs.recompute_ms(n))
    for when in ("before", "after"):
        row[f"machine.{when}.reference_ms"] = prof.extra["machine"][when]["reference_ms"]
    row["costs"] = costs.to_dict()
    row["fit_tokens"] = {phase: [getattr(prof, phase).fit.min_tokens,
                                 getattr(prof, phase).fit.max_tokens] for phase in COEFFICIENTS}
    return row


@dataclass(frozen=True)
class Stability:
    """The three criteria over a set of runs. Rows saved before issue 20 have no `costs`:
    then `lengths` is None and (b) and (c) are not judged."""

    heldout_worst: dict[str, float]  # phase -> its largest held-out error over the runs
    lengths: np.ndarray | None  # token counts inside every run's measured range
    differ_at: list[int]  # the lengths at which the runs' decisions differ
    spread_per_speed: dict[str, float]  # phase -> worst spread over lengths of cost / speed
    spread_raw: dict[str, float]  # phase -> worst spread over lengths of cost itself

    @property
    def heldout_ok(self) -> bool:
        return all(worst <= GOAL for worst in self.heldout_worst.values())

    @property
    def decisions_ok(self) -> bool:
        return not self.differ_at

    @property
    def costs_ok(self) -> bool:
        return all(worst <= GOAL for worst in self.spread_per_speed.values())


def judge(runs: list[dict]) -> Stability:
    """(a), (b) and (c) over `runs` (rows of `run_row` and more)."""
    heldout = {phase: max(r[f"{phase}_heldout"] for r in runs) for phase in fitted_phases(runs[0])}
    if "costs" not in runs[0]:
        return Stability(heldout, None, [], {}, {})
    low = max(span[0] for r in runs for span in r["fit_tokens"].values())
    high = min(span[1] for r in runs for span in r["fit_tokens"].values())
    lengths = np.unique(np.round(np.geomspace(low, high, NUM_LENGTHS)).astype(np.int64))
    swap, recompute, use_swap = (np.stack(a) for a in zip(
        *(CostModel.from_dict(r["costs"]).price(lengths) for r in runs)))  # runs x lengths
    differ_at = lengths[(use_swap != use_swap[0]).any(axis=0)].tolist()
    # the machine's speed in each run, a column (runs x 1) to divide each run's costs by
    reference_ms = np.array([[(r["machine.before.reference_ms"]
                               + r["machine.after.reference_ms"]) / 2] for r in runs])

    def worst(costs: np.ndarray) -> float:
        return max(spread(at_length) for at_length in costs.T)

    phases = {"swap": swap, "recompute": recompute}
    return Stability(heldout, lengths, differ_at,
                     {phase: worst(costs / reference_ms) for phase, costs in phases.items()},
                     {phase: worst(costs) for phase, costs in phases.items()})
