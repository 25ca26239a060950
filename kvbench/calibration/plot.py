"""PNG of a measured profile: measured points against the fitted curves (swap-out, swap-in,
their round trip, recompute), crossover marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kvbench.profile import FitQuality, Profile  # noqa: E402


def fit_grid(fit: FitQuality) -> np.ndarray:
    """Token counts to draw a fitted curve at: log-spaced over the fit's valid range."""
    return np.unique(np.geomspace(max(fit.min_tokens, 1), fit.max_tokens, 200).round())


def plot_profile(profile: Profile, path: str | Path) -> Path:
    costs = profile.cost_model()
    fig, (ax_cost, ax_bw) = plt.subplots(1, 2, figsize=(12, 4.5))
    phases = (("swap_out", profile.swap_out, costs.swap_out_ms, "tab:blue"),
              ("swap_in", profile.swap_in, costs.swap_in_ms, "tab:green"),
              ("recompute", profile.recompute, costs.recompute_ms, "tab:red"))
    for name, section, curve, color in phases:
        m = section.measurements
        n = np.asarray(m.num_tokens)
        held = np.asarray(m.heldout, dtype=bool)
        ax_cost.scatter(n[~held], np.asarray(m.latency_ms)[~held], color=color, s=12,
                        label=f"{name} measured")
        ax_cost.scatter(n[held], np.asarray(m.latency_ms)[held], color=color, marker="x",
                        label=f"{name} held out")
        grid = fit_grid(section.fit)
        ax_cost.plot(grid, curve(grid), color=color, label=f"{name} fit")
    grid = fit_grid(profile.swap_out.fit)  # the round trip: what the selector weighs
    ax_cost.plot(grid, costs.swap_ms(grid), color="tab:purple", linestyle=":",
                 label="swap round trip (out + in)")
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
