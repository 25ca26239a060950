"""Compare scheduling policies on one workload: the study behind `kvbench compare-policies`.

A policy is written `admission/victim/preemption/predictor`, e.g. `future-kv/lifo/recompute/
history`. The default matrix (`STUDY_POLICIES`) starts with vLLM V1's FCFS as the baseline and
answers, in order: how much does memory-aware admission with a perfect predictor save; how much
survives with realistic predictors; what cost-aware victims and per-victim swap-or-recompute add
on top of it and on top of FCFS. The default workload is the shared Azure 2023 conversation trace
replayed `STUDY_RATE_SCALE` times faster, a load at which FCFS preempts about one request in ten.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from kvbench.io import write_atomic
from kvbench.sim.config import SimConfig, SimCosts
from kvbench.sim.engine import SimResult, simulate
from kvbench.sim.metrics import csv_text, scalar_columns
from kvbench.sim.plots import plot_comparison
from kvbench.sim.workloads import Workload

STUDY_RATE_SCALE = 2.0
STUDY_POLICIES = (
    "fcfs/lifo/recompute/oracle",  # vLLM V1 (the predictor is not used)
    "reserve-max/lifo/recompute/max",
    "future-kv/lifo/recompute/oracle",
    "future-kv/lifo/recompute/history",
    "future-kv/lifo/recompute/noisy",
    "future-kv/cost-aware/recompute/history",
    "future-kv/cost-aware/selector/history",
    "fcfs/cost-aware/recompute/history",
    "fcfs/lifo/selector/history",
    "fcfs/cost-aware/selector/history",
)
POLICY_AXES = ("admission", "victim", "preemption", "predictor")
TABLE_COLUMNS = ("policy", "preemptions", "preempted_requests", "preemptions_removed_pct",
                 "recompute_fraction_pct", "throughput_tokens_per_s", "throughput_change_pct",
                 "useful_utilization", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "e2e_p99_s")


def parse_policy(text: str, base: SimConfig = SimConfig()) -> SimConfig:
    """'future-kv/cost-aware/selector/history' -> `base` with those four policies."""
    parts = [p.strip() for p in text.split("/")]
    if len(parts) != len(POLICY_AXES):
        raise ValueError(f"policy {text!r}: write it as admission/victim/preemption/predictor, "
                         "e.g. future-kv/lifo/recompute/oracle")
    return dataclasses.replace(base, **dict(zip(POLICY_AXES, parts)))


def _run(args: tuple[Workload, SimConfig, SimCosts | None]) -> SimResult:
    return simulate(*args)


def compare_policies(workload: Workload, policies: list[str] | tuple[str, ...] = STUDY_POLICIES,
                     base: SimConfig = SimConfig(), costs: SimCosts | None = None,
                     jobs: int = 1, on_result: Callable[[SimResult], None] | None = None,
                     ) -> list[SimResult]:
    """Simulate `workload` under each policy (in `jobs` processes); results in policy order."""
    configs = [parse_policy(p, base) for p in policies]
    if not configs:
        raise ValueError("no policy to compare: give at least one admission/victim/preemption/"
                         "predictor, e.g. fcfs/lifo/recompute/oracle")
    if jobs <= 1:
        results = []
        for config in configs:
            results.append(simulate(workload, config, costs))
            if on_result:
                on_result(results[-1])
        return results
    with ProcessPoolExecutor(min(jobs, len(configs))) as pool:
        results = []
        for result in pool.map(_run, [(workload, c, costs) for c in configs]):
            results.append(result)
            if on_result:
                on_result(result)
        return results


def comparison_rows(summaries: list[dict]) -> list[dict]:
    """Table rows, each relative to the first policy (the baseline)."""
    base = summaries[0]
    rows = []
    for s in summaries:
        removed = (100 * (1 - s["preemptions"] / base["preemptions"])
                   if base["preemptions"] else None)
        change = (100 * (s["throughput_tokens_per_s"] / base["throughput_tokens_per_s"] - 1)
                  if base["throughput_tokens_per_s"] else None)
        rows.append({**{k: s[k] for k in TABLE_COLUMNS if k in s},
                     "preemptions_removed_pct": removed,
                     "recompute_fraction_pct": 100 * s["recompute_fraction"],
                     "throughput_change_pct": change})
    return [{k: row[k] for k in TABLE_COLUMNS} for row in rows]


def write_comparison(results: list[SimResult], summaries: list[dict], out_dir: str | Path,
                     ) -> list[Path]:
    """compare.json (summaries and table), compare.csv and compare.png in `out_dir`."""
    out_dir = Path(out_dir)
    rows = comparison_rows(summaries)
    document = {"workload": results[0].workload, "model": results[0].model,
                "config": results[0].config.to_dict(), "table": rows, "summaries": summaries}
    paths = [write_atomic(out_dir / "compare.json",
                          json.dumps(document, indent=2) + "\n"),
             write_atomic(out_dir / "compare.csv", csv_text(scalar_columns(summaries)))]
    paths.append(plot_comparison(results, summaries, out_dir / "compare.png"))
    return paths
