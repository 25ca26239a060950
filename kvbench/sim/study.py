"""Compare scheduling policies on one workload: the study behind `kvbench compare-policies`.

A policy is written `admission/victim/preemption/predictor[@engine]`, e.g. `future-kv/lifo/
recompute/history`. The default matrix (`STUDY_POLICIES`) starts with vLLM 0.32's FCFS as the
baseline (the engine's rules are vLLM 0.32's unless `@vllm-legacy` says otherwise) and the
legacy first-chunk admission rule beside it, then answers, in order: how much does
memory-aware admission with a perfect predictor save; how much survives with realistic
predictors; what cost-aware victims and per-victim swap-or-recompute add on top of it and on top
of FCFS. The default workload is the shared Azure 2023 conversation trace replayed
`STUDY_RATE_SCALE` times faster.

`sim_inputs` assembles a run (workload, configuration, costs) from the options of `kvbench
simulate` and `compare-policies`; `comparison_rows` and `comparison_table` present the results.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from itertools import repeat
from pathlib import Path

from rich.table import Table

from kvbench.hardware import fingerprint_mismatch, provenance
from kvbench.io import write_atomic
from kvbench.profile import load
from kvbench.sim.config import SimConfig, SimCosts
from kvbench.sim.engine import SimResult, simulate
from kvbench.sim.metrics import csv_text, scalar_columns
from kvbench.sim.plots import plot_comparison
from kvbench.sim.workloads import AZURE_CONV_TRACE, Workload, load_workload

STUDY_RATE_SCALE = 2.0
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
POLICY_AXES = ("admission", "victim", "preemption", "predictor")
# The comparison table's columns, with their short headers on the terminal.
TABLE_COLUMNS = {"policy": "policy", "preemptions": "preempt", "preempted_requests": "reqs",
                 "preemptions_removed_pct": "removed%", "recompute_fraction_pct": "recomp%",
                 "throughput_tokens_per_s": "tok/s", "throughput_change_pct": "Δtok/s%",
                 "useful_utilization": "useful", "ttft_p50_s": "TTFT50 s",
                 "ttft_p99_s": "TTFT99 s", "tpot_p50_ms": "TPOT50 ms", "e2e_p99_s": "E2E99 s"}


def sim_inputs(trace: str | Path | None = None, synthetic: str | None = None,
               profile: str | Path | None = None, model: str | None = None,
               hardware: str = SimConfig.hardware, rate_scale: float | None = None,
               num_requests: int | None = None, max_tokens: int | None = None, seed: int = 0,
               study_default: bool = False, warn: Callable[[str], None] = lambda line: None,
               **config) -> tuple[Workload, SimConfig, SimCosts]:
    """The workload, configuration and costs of a run, from the options of `kvbench simulate`
    and `compare-policies`.

    Workload: a trace CSV or a synthetic spec, exactly one; with `study_default`, neither means
    the study's (the Azure conversation trace at `STUDY_RATE_SCALE` unless `rate_scale` says
    otherwise). Costs: a profile file, or analytic ones for `model` (default `SimConfig.model`)
    on `hardware`. The configuration takes the costs' model and block size (the swap model prices
    that block size) and the further SimConfig fields in `config`. A measured profile from other
    hardware than this machine's (`fingerprint_mismatch`) is used, and `warn` gets that line once
    every input has passed its checks; it also gets a line per trace column that is ignored."""
    if profile is not None and model is not None:
        raise ValueError("give either --profile or --model, not both: a profile names its model")
    if study_default and trace is None and synthetic is None:
        trace = AZURE_CONV_TRACE
        rate_scale = STUDY_RATE_SCALE if rate_scale is None else rate_scale
    workload = load_workload(trace, synthetic, 1.0 if rate_scale is None else rate_scale,
                             num_requests, max_tokens, seed, warn)
    prof = load(profile) if profile is not None else None
    costs = (SimCosts.from_profile(prof, hardware) if prof is not None
             else SimCosts.analytic(SimConfig.model if model is None else model, hardware))
    sim_config = SimConfig(model=costs.model.name, hardware=hardware,
                           block_size=costs.costs.block_size, seed=seed, **config)
    if prof is not None and (warning := fingerprint_mismatch(prof.environment)):
        warn(warning)
    return workload, sim_config, costs


def parse_policy(text: str, base: SimConfig = SimConfig()) -> SimConfig:
    """'future-kv/cost-aware/selector/history' -> `base` with those four policies;
    '...@vllm-legacy' also sets the engine."""
    policy, _, engine = text.partition("@")
    parts = [p.strip() for p in policy.split("/")]
    if len(parts) != len(POLICY_AXES):
        raise ValueError(f"policy {text!r}: write it as admission/victim/preemption/predictor"
                         "[@engine], e.g. future-kv/lifo/recompute/oracle")
    fields = dict(zip(POLICY_AXES, parts))
    if engine:
        fields["engine"] = engine.strip()
    return dataclasses.replace(base, **fields)


def parse_policies(text: str | None) -> list[str]:
    """A comma-separated list of policies; None means the study's (`STUDY_POLICIES`)."""
    if text is None:
        return list(STUDY_POLICIES)
    return [p.strip() for p in text.split(",") if p.strip()]


def run_one(workload: Workload, config: SimConfig, costs: SimCosts | None) -> SimResult:
    return simulate(workload, config, costs)


def compare_policies(workload: Workload, policies: list[str] | tuple[str, ...] = STUDY_POLICIES,
                     base_config: SimConfig = SimConfig(), costs: SimCosts | None = None,
                     jobs: int = 1, progress: Callable[[int], None] | None = None,
                     ) -> list[SimResult]:
    """Simulate `workload` under each policy (in `jobs` processes); results in policy order.
    `progress(done)` after each run."""
    configs = [parse_policy(p, base_config) for p in policies]
    if not configs:
        raise ValueError("no policy to compare: give at least one admission/victim/preemption/"
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
    for column, header in TABLE_COLUMNS.items():
        table.add_column(header, justify="left" if column == "policy" else "right",
                         no_wrap=True)
    for row in comparison_rows(summaries):
        table.add_row(*table_cells(row.values()))
    return table


def summary_markdown(summaries: list[dict]) -> str:
    """The same table in Markdown (for results/ and README)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS.values()) + " |",
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
