"""Per-request and aggregate metrics of a simulation, written as JSON and CSV.

Latencies per completed request (n output tokens):

* ttft_s   first token time - arrival;
* tpot_ms  (e2e - ttft) / (n - 1), vLLM's benchmark convention (requests with n > 1 only);
* tpot_div_n_ms (e2e - ttft) / n, the other convention (every request);
* e2e_s    finish - arrival.

Aggregates: p50/p90/p99 and mean of each; `throughput_tokens_per_s` (output tokens of completed
requests per second of makespan, the time from the first arrival to the end of the run);
`gpu_utilization` (busy time / makespan) and `useful_utilization` (busy time without
recomputation and swap transfers / makespan); `recompute_fraction` (FLOPs spent recomputing
dropped KV / all FLOPs). Per request: `preemption_frequency` (preemptions per output token),
`recompute_tokens`, `wasted_flops` (FLOPs of its recomputation), `swapped_bytes` (KV bytes
moved between GPU and CPU, both directions: swaps, and write-through stores and loads),
`loaded_tokens` (KV loaded back from the CPU), `stored_tokens` (KV copied to the CPU by
write-through offloading) and `prefix_hit_tokens` (tokens the prefix cache gave it, over all its
admissions). With prefix caching, `prefix_hit_rate` is the tokens the prefix cache gave over the
tokens admissions looked up (each admission looks up the request's known tokens).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvbench.hardware import provenance
from kvbench.io import write_atomic
from kvbench.sim.requests import FINISHED, STATE_NAMES
from kvbench.sim.result import SimResult


@dataclass(frozen=True)
class Metric:
    """How every table, page and plot names and formats one summary number (`fmt`: a format
    spec, or "pct" for a fraction shown as a percentage)."""

    label: str
    fmt: str = ".4g"

    def format(self, value) -> str:
        if value is None or value == "":
            return "–"
        if isinstance(value, str):
            return value
        value = float(value)
        return f"{100 * value:.2f}" if self.fmt == "pct" else f"{value:{self.fmt}}"


# The one table of summary numbers' names (`summarize`'s keys, and the comparison's): the
# terminal tables, Markdown (kvbench report, replay.md), sweep tables and plots all read it.
METRICS = {
    "policy": Metric("policy", "s"),
    "cells": Metric("cells", ".0f"),
    "preemptions": Metric("preemptions", ".0f"),
    "preempted_requests": Metric("preempted reqs", ".0f"),
    "preemptions_removed_pct": Metric("removed %", ".1f"),
    "recompute_fraction": Metric("recompute % of FLOPs", "pct"),
    "recompute_fraction_pct": Metric("recompute % of FLOPs", ".2f"),
    "throughput_tokens_per_s": Metric("tok/s", ".2f"),
    "throughput_change_pct": Metric("Δ tok/s %", ".1f"),
    "useful_utilization": Metric("useful", ".3f"),
    "ttft_p50_s": Metric("TTFT p50 s", ".2f"),
    "ttft_p99_s": Metric("TTFT p99 s", ".1f"),
    "tpot_p50_ms": Metric("TPOT p50 ms", ".1f"),
    "e2e_p99_s": Metric("E2E p99 s", ".1f"),
}
PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft_s", "tpot_ms", "tpot_div_n_ms", "e2e_s")
NESTED_KEYS = ("livelock", "rejections")
SUMMARY_FILE, SUMMARY_CSV, REQUESTS_CSV, TIMELINE_CSV = (
    "summary.json", "summary.csv", "requests.csv", "timeline.csv")


def request_metrics(result: SimResult) -> dict[str, np.ndarray]:
    """One array per column, indexed by request id (NaN where a value does not exist)."""
    req = result.requests
    n = req.output_tokens
    ttft_s = req.first_token_s - req.arrival_s
    e2e_s = req.finish_s - req.arrival_s
    decode_s = e2e_s - ttft_s
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot_ms = np.where(n > 1, decode_s * 1e3 / (n - 1), np.nan)
    return {
        "request_id": np.arange(req.size),
        "status": np.array(STATE_NAMES, dtype=object)[req.state],
        "arrival_s": req.arrival_s,
        "prompt_tokens": req.prompt_tokens,
        "output_tokens": n,
        "max_tokens": req.max_tokens,
        "predicted_output_tokens": req.predicted_output_tokens,
        "generated_tokens": req.generated_tokens,
        "first_token_s": req.first_token_s,
        "finish_s": req.finish_s,
        "ttft_s": ttft_s,
        "tpot_ms": tpot_ms,
        "tpot_div_n_ms": decode_s * 1e3 / n,
        "e2e_s": e2e_s,
        "num_preemptions": req.num_preemptions,
        "preemption_frequency": req.num_preemptions / n,
        "num_swaps": req.num_swaps,
        "recompute_tokens": req.recompute_tokens,
        "wasted_flops": req.wasted_flops,
        "swapped_bytes": req.swapped_bytes,
        "loaded_tokens": req.loaded_tokens,
        "stored_tokens": req.stored_tokens,
        "prefix_hit_tokens": req.prefix_hit_tokens,
        "reject_reason": np.array([req.reject_reason.get(i, "") for i in range(req.size)],
                                  dtype=object),
    }


def latency_stats(name: str, values: np.ndarray) -> dict[str, float | None]:
    """Mean and percentiles of the finite values: `ttft_s` -> ttft_mean_s, ttft_p50_s, ..."""
    values = values[np.isfinite(values)]
    stem, unit = name.rsplit("_", 1)
    if not values.size:
        return {f"{stem}_{key}_{unit}": None for key in ("mean", *[f"p{p}" for p in PERCENTILES])}
    out = {f"{stem}_mean_{unit}": float(values.mean())}
    for p, value in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
        out[f"{stem}_p{p}_{unit}"] = float(value)
    return out


def summarize(result: SimResult) -> dict:
    """The aggregate summary: a flat dict of plain values (JSON-ready)."""
    req = result.requests
    per_request = request_metrics(result)
    done = req.state == FINISHED
    makespan_s = result.end_s - float(req.arrival_s[0])
    output_tokens = int(req.output_tokens[done].sum())
    preemptions = int(req.num_preemptions.sum())
    swaps = int(req.num_swaps.sum())
    busy_s = result.busy_ms / 1e3
    useful_s = (result.busy_ms - result.recompute_ms - result.swap_ms) / 1e3
    summary = {
        "policy": result.config.policy_name,
        "admission": result.config.policy.admission,
        "victim": result.config.policy.victim,
        "preemption": result.config.policy.preemption,
        "predictor": result.config.policy.predictor,
        "workload": result.workload["name"],
        "model": result.model,
        "profile_source": result.profile_source,
        "requests": int(req.size),
        "completed": int(done.sum()),
        "rejected": len(req.reject_reason),
        "unfinished": int(req.size - done.sum() - len(req.reject_reason)),
        "preemptions": preemptions,
        "preempted_requests": int(np.count_nonzero(req.num_preemptions)),
        "swap_preemptions": swaps,
        "recompute_preemptions": preemptions - swaps,
        "recompute_tokens": int(req.recompute_tokens.sum()),
        "recompute_fraction": result.recompute_flops / result.flops if result.flops else 0.0,
        "wasted_flops": result.recompute_flops,
        "total_flops": result.flops,
        "swapped_bytes": float(req.swapped_bytes.sum()),
        "loaded_tokens": int(req.loaded_tokens.sum()),
        "swap_fallbacks": int(req.swap_fallbacks.sum()),
        "prefix_hit_tokens": int(req.prefix_hit_tokens.sum()),
        "prefix_hit_rate": (float(req.prefix_hit_tokens.sum() / req.prefix_query_tokens.sum())
                            if req.prefix_query_tokens.any() else None),
        "throughput_tokens_per_s": output_tokens / makespan_s if makespan_s else 0.0,
        "throughput_requests_per_s": int(done.sum()) / makespan_s if makespan_s else 0.0,
        "makespan_s": makespan_s,
        "busy_s": busy_s,
        "recompute_s": result.recompute_ms / 1e3,
        "swap_s": result.swap_ms / 1e3,
        # min(): busy time and makespan are sums of the same step times in different orders
        "gpu_utilization": min(1.0, busy_s / makespan_s) if makespan_s else 0.0,
        "useful_utilization": min(1.0, useful_s / makespan_s) if makespan_s else 0.0,
        "max_kv_blocks_used": result.max_kv_blocks_used,
        "gpu_blocks": result.num_gpu_blocks,
        "cpu_swap_blocks": result.num_cpu_blocks,
        "kv_block_bytes": result.block_bytes,
        "steps": result.steps,
    }
    for name in LATENCIES:
        summary.update(latency_stats(name, per_request[name][done]))
    summary["livelock"] = result.livelock
    summary["rejections"] = dict(list(req.reject_reason.items())[:10])
    return summary


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def csv_text(columns: dict[str, np.ndarray | list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*[[_cell(v) for v in np.asarray(col).tolist()]
                           for col in columns.values()]))
    return buf.getvalue()


def scalar_columns(summaries: list[dict]) -> dict[str, list]:
    """Summaries as CSV columns: scalars only (livelock and rejections stay in the JSON)."""
    keys = [k for k in summaries[0] if k not in NESTED_KEYS]
    return {k: [s[k] if s[k] is not None else float("nan") for s in summaries] for k in keys}


def write_results(result: SimResult, out_dir: str | Path, summary: dict | None = None) -> Path:
    """summary.json (with `provenance`), summary.csv, requests.csv and timeline.csv in
    `out_dir`."""
    out_dir = Path(out_dir)
    summary = summary if summary is not None else summarize(result)
    document = {"summary": summary, "config": result.config.to_dict(),
                "workload": result.workload, "provenance": provenance()}
    write_atomic(out_dir / SUMMARY_FILE, json.dumps(document, indent=2) + "\n")
    write_atomic(out_dir / SUMMARY_CSV, csv_text(scalar_columns([summary])))
    write_atomic(out_dir / REQUESTS_CSV, csv_text(request_metrics(result)))
    write_atomic(out_dir / TIMELINE_CSV, csv_text({
        "time_s": result.timeline_s, "kv_blocks_used": result.timeline_kv_blocks,
        "running_requests": result.timeline_running}))
    return out_dir


def summary_lines(s: dict) -> list[str]:
    """What `kvbench simulate` prints: one line per figure of a `summarize` dict."""
    lines = [
        f"policy: {s['policy']}",
        f"workload: {s['workload']} ({s['requests']} requests)",
        f"model: {s['model']} ({s['profile_source']} costs); {s['gpu_blocks']} GPU blocks, "
        f"{s['cpu_swap_blocks']} CPU swap blocks of {s['kv_block_bytes'] / 2**20:.2f} MiB",
        f"completed: {s['completed']} ({s['rejected']} rejected, {s['unfinished']} unfinished)",
        f"preemptions: {s['preemptions']} ({s['swap_preemptions']} swapped, "
        f"{s['recompute_preemptions']} recomputed) of {s['preempted_requests']} requests",
        f"recompute_fraction: {100 * s['recompute_fraction']:.3f}% of FLOPs "
        f"({s['recompute_tokens']} tokens recomputed)",
        f"throughput_tokens_per_s: {s['throughput_tokens_per_s']:.1f} over "
        f"{s['makespan_s']:.1f} s",
        f"gpu_utilization: {100 * s['gpu_utilization']:.1f}% busy, "
        f"{100 * s['useful_utilization']:.1f}% useful (ceiling 100%)",
    ]
    for name, unit in (("ttft", "s"), ("tpot", "ms"), ("tpot_div_n", "ms"), ("e2e", "s")):
        values = [s[f"{name}_p{p}_{unit}"] for p in PERCENTILES]
        lines.append(f"{name}_{unit}: " + ("n/a" if values[0] is None else " ".join(
            f"p{p} {v:.4g}" for p, v in zip(PERCENTILES, values))))
    lines.append(f"max_kv_blocks_used: {s['max_kv_blocks_used']} of {s['gpu_blocks']}")
    if s["livelock"]:
        lines.append(f"livelock: {s['livelock']['reason']}")
    if s["rejected"]:
        request, reason = next(iter(s["rejections"].items()))
        lines.append(f"rejected: request {request}: {reason}")
    return lines
