"""A sweep's figure: each policy's mean over seeds against the rate scale."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from kvbench.sim.metrics import METRICS
from kvbench.sim.sweep.plan import source_label

PLOT_METRICS = ("preemptions", "recompute_fraction", "throughput_tokens_per_s", "ttft_p99_s")


def plot_sweep(rows: list[dict], path: str | Path) -> Path:
    """A column per workload and cache size, a row per metric; each line a policy's mean over
    seeds against the rate scale."""
    facets = list(dict.fromkeys((r["source"], r["gpu_blocks"]) for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    values: dict[tuple, list] = defaultdict(list)
    for r in rows:
        values[(r["source"], r["gpu_blocks"], r["policy"], r["rate_scale"])].append(r)
    # Fixed margins in inches (room for the titles and, on the right, the legend): a
    # constrained layout would draw the figure twice.
    width, height = 3.4 * len(facets) + 3.2, 2.2 * len(PLOT_METRICS) + 1.2
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.8 / width, right=1 - 3.0 / width, bottom=0.5 / height,
                        top=1 - 1.05 / height, wspace=0.35, hspace=0.3)
    axes = np.asarray(fig.subplots(len(PLOT_METRICS), len(facets), squeeze=False,
                                   sharex="col"))
    for col, (source, blocks) in enumerate(facets):
        for policy in policies:
            scales = sorted({k[3] for k in values if k[:3] == (source, blocks, policy)})
            for row, metric in enumerate(PLOT_METRICS):
                means = [np.mean([r[metric] for r in values[(source, blocks, policy, s)]
                                  if r[metric] is not None] or [np.nan]) for s in scales]
                axes[row, col].plot(scales, means, marker="o", ms=3, label=policy)
                axes[row, col].set_ylabel(METRICS[metric].label if col == 0 else "")
        title = textwrap.fill(source_label(source), 48)
        axes[0, col].set_title(f"{title}\n{blocks} GPU blocks", fontsize=7)
        axes[-1, col].set_xlabel("rate scale")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=6, loc="upper right")
    fig.suptitle("sweep: mean over seeds", fontsize=9)
    fig.savefig(path, dpi=110)
    return Path(path)
