"""Figures of one run (KV use over time, TTFT CDF) and of a policy comparison, as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from kvbench.sim.requests import FINISHED
from kvbench.sim.result import SimResult


def _ttft_cdf(ax, result: SimResult, label: str) -> None:
    req = result.requests
    done = req.state == FINISHED
    ttft_s = np.sort(req.first_token_s[done] - req.arrival_s[done])
    if ttft_s.size:
        ax.plot(ttft_s, np.arange(1, ttft_s.size + 1) / ttft_s.size, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, which="both", alpha=0.3)


def plot_run(result: SimResult, path: str | Path) -> Path:
    fig = Figure(figsize=(11, 4), layout="constrained")
    kv_ax, cdf_ax = fig.subplots(1, 2)
    kv_ax.plot(result.timeline_s, result.timeline_kv_blocks, lw=0.6, label="in use")
    kv_ax.axhline(result.num_gpu_blocks, color="red", ls="--", lw=1,
                  label=f"capacity ({result.num_gpu_blocks} blocks)")
    kv_ax.set_xlabel("simulated time (s)")
    kv_ax.set_ylabel("KV blocks")
    kv_ax.legend(loc="lower right")
    _ttft_cdf(cdf_ax, result, result.config.policy_name)
    fig.suptitle(f"{result.config.policy_name} · {result.model} · {result.workload['name']}")
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_comparison(results: list[SimResult], summaries: list[dict], path: str | Path) -> Path:
    fig = Figure(figsize=(13, 5), layout="constrained")
    cdf_ax, bar_ax = fig.subplots(1, 2, width_ratios=(1.3, 1))
    for result in results:
        _ttft_cdf(cdf_ax, result, result.config.policy_name)
    cdf_ax.legend(fontsize=7, loc="upper left")
    cdf_ax.set_title("TTFT CDF")
    names = [s["policy"] for s in summaries][::-1]
    fractions = [100 * s["recompute_fraction"] for s in summaries][::-1]
    bars = bar_ax.barh(names, fractions, color="tab:red")
    for bar, s in zip(bars, summaries[::-1]):
        swapped = f" ({s['swap_preemptions']} swapped)" if s["swap_preemptions"] else ""
        bar_ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {s['preemptions']} preemptions{swapped}", va="center", fontsize=7)
    bar_ax.set_xlabel("recompute fraction (% of FLOPs)")
    bar_ax.tick_params(axis="y", labelsize=7)
    bar_ax.set_title("recomputation per policy")
    bar_ax.set_xlim(0, max(fractions + [0.1]) * 1.45)
    fig.suptitle(f"{results[0].model} · {results[0].workload['name']}")
    fig.savefig(path, dpi=120)
    return Path(path)
