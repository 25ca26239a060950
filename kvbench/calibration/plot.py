"""PNG of a measured profile: measured points against the fitted curves, crossover marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kvbench.profile import Profile  # noqa: E402


def plot_profile(profile: Profile, path: str | Path) -> Path:
    costs = profile.cost_model()
    fig, (ax_cost, ax_bw) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, section, color in (("swap", profile.swap, "tab:blue"),
                                 ("recompute", profile.recompute, "tab:red")):
        m = section.measurements
        n = np.asarray(m.num_tokens)
        held = np.asarray(m.heldout, dtype=bool)
        ax_cost.scatter(n[~held], np.asarray(m.latency_ms)[~held], color=color,
                        label=f"{name} measured")
        ax_cost.scatter(n[held], np.asarray(m.latency_ms)[held], color=color, marker="x",
                        label=f"{name} held out")
    for name, section, curve, color in (("swap fit (round trip)", profile.swap, costs.swap_ms,
                                         "tab:blue"),
                                        ("recompute fit", profile.recompute, costs.recompute_ms,
                                         "tab:red")):
        grid = np.unique(np.geomspace(max(section.fit.min_tokens, 1), section.fit.max_tokens,
                                      200).round())
        ax_cost.plot(grid, curve(grid), color=color, label=name)
    if profile.crossover_tokens:
        ax_cost.axvline(profile.crossover_tokens, color="gray", linestyle="--",
                        label=f"crossover {profile.crossover_tokens} tokens")
    ax_cost.set(xscale="log", yscale="log", xlabel="tokens", ylabel="latency_ms",
                title=f"{profile.model.name} on {profile.environment.get('device_name')}")
    ax_cost.legend(fontsize=8)

    for impl, data in profile.extra.get("swap_impls", {}).items():
        ax_bw.plot(data["num_tokens"], data["round_trip_bandwidth_gbps"], marker="o", label=impl)
    ceiling = profile.extra.get("ceiling_gbps", {})
    if ceiling:
        ax_bw.axhline(min(ceiling.values()), color="gray", linestyle="--",
                      label=f"contiguous copy ceiling {min(ceiling.values()):.1f} GB/s")
    ax_bw.set(xscale="log", xlabel="tokens", ylabel="bandwidth_gbps (round trip)",
              title=f"KV swap copy, block size {profile.swap.block_size}")
    ax_bw.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")  # atomic: a reader never sees half a PNG
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
