"""Compare scheduling policies on one workload: the study behind `kvbench compare-policies`.

A policy is written `admission/victim/preemption/predictor[@engine]`, e.g. `future-kv/lifo/
recompute/history`. The default matrix (`STUDY_POLICIES`) starts with vLLM 0.32's FCFS as the
baseline (the engine's rules are vLLM 0.32's unless `@vllm-legacy` says otherwise) and the
legacy first-chunk admission rule beside it, then answers, in order: how much does
memory-aware admission with a perfect predictor save; how much survives with realistic
predictors; what cost-aware victims and per-victim swap-or-recompute add on top of it and on top
of FCFS. The default workload is the shared Azure 2023 conversation trace replayed
`STUDY_RATE_SCALE` (kvbench/sim/run.py) times faster.

A run's inputs come from a `RunSpec` (kvbench/sim/run.py); `comparison_rows` and
`comparison_table` present the results.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from itertools import repeat
from pathlib import Path

from rich.table import Table

from kvbench.errors import KvbenchError
from kvbench.hardware import provenance
from kvbench.io import write_atomic
from kvbench.sim.config import Costs, SimConfig
from kvbench.sim.engine import simulate
from kvbench.sim.metrics import METRICS, csv_text, scalar_columns
from kvbench.sim.plots import plot_comparison
from kvbench.sim.result import SimResult
from kvbench.sim.workloads import Workload

STUDY_POLICIES = (
    "fcfs/lifo/recompute/oracle",  # vLLM 0.32 as it is (the predictor is not used)
    "fcfs/lifo/recompute/oracle@vllm-legacy",  # the first-chunk admission rule, for comparison
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
# The comparison table's columns (named by `METRICS`).
TABLE_COLUMNS = ("policy", "preemptions", "preempted_requests", "preemptions_removed_pct",
                 "recompute_fraction_pct", "throughput_tokens_per_s", "throughput_change_pct",
                 "useful_utilization", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "e2e_p99_s")


def parse_policies(text: str | None) -> list[str]:
    """A comma-separated list of policies; None means the study's (`STUDY_POLICIES`)."""
    if text is None:
        return list(STUDY_POLICIES)
    return [p.strip() for p in text.split(",") if p.strip()]


def run_one(workload: Workload, config: SimConfig, costs: Costs | None) -> SimResult:
    return simulate(workload, config, costs)


def compare_policies(workload: Workload, policies: list[str] | tuple[str, ...] = STUDY_POLICIES,
                     base_config: SimConfig = SimConfig(), costs: Costs | None = None,
                     jobs: int = 1, progress: Callable[[int], None] | None = None,
                     ) -> list[SimResult]:
    """Simulate `workload` under each policy (in `jobs` processes); results in policy order.
    `progress(done)` after each run."""
    configs = [base_config.with_policy(p) for p in policies]
    if not configs:
        raise KvbenchError("no policy to compare: give at least one admission/victim/preemption/"
                         "predictor, e.g. fcfs/lifo/recompute/oracle")
    results = []
    with ProcessPoolExecutor(min(jobs, len(configs))) if jobs > 1 else nullcontext() as pool:
        mapper = pool.map if pool else map
        for result in mapper(run_one, repeat(workload), configs, repeat(costs)):
            results.append(result)
            if progress:
                progress(len(results))
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


def comparison_table(results: list[SimResult], summaries: list[dict]) -> Table:
    """The comparison for a terminal: `comparison_rows` under short headers, 4 digits."""
    return summary_table(summaries, f"{results[0].workload['name']} · {results[0].model} · "
                                    f"{summaries[0]['gpu_blocks']} GPU blocks")


def summary_table(summaries: list[dict], title: str) -> Table:
    """`comparison_rows` of any summaries with the table's keys (a simulation's, a replay's)."""
    table = Table(title=title)
    for column in TABLE_COLUMNS:
        table.add_column(METRICS[column].label, justify="left" if column == "policy"
                         else "right", no_wrap=column == "policy")  # labels may wrap
    for row in comparison_rows(summaries):
        table.add_row(*table_cells(row.values()))
    return table


def summary_markdown(summaries: list[dict]) -> str:
    """The same table in Markdown (for results/ and README)."""
    lines = ["| " + " | ".join(METRICS[c].label for c in TABLE_COLUMNS) + " |",
             "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(table_cells(row.values())) + " |"
              for row in comparison_rows(summaries)]
    return "\n".join(lines) + "\n"


def table_cells(values) -> list[str]:
    """A table row's cells: 4 significant digits, n/a for a missing value."""
    return ["n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
            for v in values]


def write_comparison(results: list[SimResult], summaries: list[dict], out_dir: str | Path,
                     ) -> list[Path]:
    """compare.json (summaries, table and `provenance`), compare.csv and compare.png in
    `out_dir`."""
    out_dir = Path(out_dir)
    rows = comparison_rows(summaries)
    document = {"workload": results[0].workload, "model": results[0].model,
                "config": results[0].config.to_dict(), "table": rows, "summaries": summaries,
                "provenance": provenance()}
    paths = [write_atomic(out_dir / "compare.json",
                          json.dumps(document, indent=2) + "\n"),
             write_atomic(out_dir / "compare.csv", csv_text(scalar_columns(summaries)))]
    paths.append(plot_comparison(results, summaries, out_dir / "compare.png"))
    return paths
