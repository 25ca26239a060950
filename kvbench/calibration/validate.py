"""`kvbench validate`: check a profile against fresh measurements on the same device.

At token counts the calibration did not use (geometric midpoints of its sweep), measure a real
swap-out and swap-in (the profile's copy impl; their sum is the round trip the selector prices)
and a real recompute: a full prefill through all
`num_layers` layers, each with its own weights, then the LM head. Calibration timed one layer and
multiplied; this runs the whole stack, so it checks that shortcut too. Reports the selector's
decision agreement with the measured cheaper strategy and the prediction errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from rich.table import Table

from kvbench.calibration.decoder import DecoderLayer, LMHead, random_hidden, rotary_tables
from kvbench.calibration.fitting import mape
from kvbench.calibration.sweeps import OnPoint, swap_sweep
from kvbench.calibration.timing import measure
from kvbench.profile import Profile, ProfileError
from kvbench.selector import select_preemption_strategy


@dataclass
class ValidationReport:
    """Predicted and measured costs (ms) at each token count; the swap round trip (what the
    selector and the measured choice compare with recompute) is the sum of its two ways."""

    num_tokens: list[int]
    swap_out_predicted_ms: list[float]
    swap_out_measured_ms: list[float]
    swap_in_predicted_ms: list[float]
    swap_in_measured_ms: list[float]
    recompute_predicted_ms: list[float]
    recompute_measured_ms: list[float]
    predicted_choice: list[str]
    measured_choice: list[str]

    @property
    def swap_predicted_ms(self) -> list[float]:
        return np.add(self.swap_out_predicted_ms, self.swap_in_predicted_ms).tolist()

    @property
    def swap_measured_ms(self) -> list[float]:
        return np.add(self.swap_out_measured_ms, self.swap_in_measured_ms).tolist()

    @property
    def agreement(self) -> float:
        return float(np.mean(np.array(self.predicted_choice) == np.array(self.measured_choice)))

    @property
    def swap_mape(self) -> float:
        return mape(self.swap_measured_ms, self.swap_predicted_ms)

    @property
    def swap_out_mape(self) -> float:
        return mape(self.swap_out_measured_ms, self.swap_out_predicted_ms)

    @property
    def swap_in_mape(self) -> float:
        return mape(self.swap_in_measured_ms, self.swap_in_predicted_ms)

    @property
    def recompute_mape(self) -> float:
        return mape(self.recompute_measured_ms, self.recompute_predicted_ms)

    def to_dict(self) -> dict:
        return {**self.__dict__, "swap_predicted_ms": self.swap_predicted_ms,
                "swap_measured_ms": self.swap_measured_ms, "agreement": self.agreement,
                "swap_mape": self.swap_mape, "swap_out_mape": self.swap_out_mape,
                "swap_in_mape": self.swap_in_mape, "recompute_mape": self.recompute_mape}

    COLUMNS = ("tokens", "out pred ms", "out meas ms", "in pred ms", "in meas ms",
               "swap pred ms", "swap meas ms", "recompute pred ms", "recompute meas ms",
               "selector", "measured")

    def rows(self) -> list[list[str]]:
        """Predicted and measured costs (ms) and choices, one row per token count, as text."""
        costs = zip(self.swap_out_predicted_ms, self.swap_out_measured_ms,
                    self.swap_in_predicted_ms, self.swap_in_measured_ms, self.swap_predicted_ms,
                    self.swap_measured_ms, self.recompute_predicted_ms,
                    self.recompute_measured_ms)
        return [[str(n), *(f"{v:.3f}" for v in ms), chosen, measured]
                for n, ms, chosen, measured in zip(self.num_tokens, costs, self.predicted_choice,
                                                   self.measured_choice)]

    def table(self, title: str) -> Table:
        """`rows` under `COLUMNS`, for the terminal."""
        table = Table(title=title)
        for col in self.COLUMNS:
            table.add_column(col, justify="right")
        for row in self.rows():
            table.add_row(*row)
        return table

    def summary_line(self) -> str:
        return (f"decision agreement: {100 * self.agreement:.0f}%; prediction error: swap "
                f"{100 * self.swap_mape:.1f}% (out {100 * self.swap_out_mape:.1f}%, in "
                f"{100 * self.swap_in_mape:.1f}%), recompute {100 * self.recompute_mape:.1f}%")


def fresh_sizes(sizes: list[int], count: int) -> list[int]:
    """Geometric midpoints of consecutive calibrated sizes, thinned to about `count`."""
    s = np.asarray(sorted(sizes), dtype=np.float64)
    mids = sorted({int(round(x)) for x in np.sqrt(s[:-1] * s[1:])} - set(sizes))
    step = max(1, len(mids) // count)
    return mids[::step][:count]


def check_device(profile: Profile, device: str, force: bool = False) -> None:
    if profile.source != "measured":
        raise ProfileError("validate needs a measured profile (this one is analytic)")
    profile.check_matches(device=device, force=force)


def full_prefill_ms(profile: Profile, device: str, sizes: list[int], on_point: OnPoint,
                    seed: int = 1) -> list[float]:
    """Median time of a whole-model prefill (distinct weights per layer) at each size."""
    on_point("recompute", f"{len(sizes)} sizes up to n={max(sizes)}, whole model", start=True)
    spec = profile.model.spec()
    gen = torch.Generator().manual_seed(seed)
    layers = [DecoderLayer(spec, device, gen) for _ in range(spec.num_layers)]
    head = LMHead(spec, device, gen)

    def run(x, cos, sin):
        for layer in layers:
            x = layer.prefill(x, cos, sin)
        return head(x[-1:])

    times = []
    for n in sizes:
        x = random_hidden(n, spec, device, gen)
        cos, sin = rotary_tables(n, spec.head_dim, device, x.dtype)
        with torch.inference_mode():
            times.append(measure(lambda: run(x, cos, sin), device, warmup=1, reps=3,
                                 budget_ms=3000).median_ms)
        on_point("recompute", f"n={n}: {times[-1]:.1f} ms")
    return times


def validate(profile: Profile, device: str, count: int = 6, force: bool = False,
             on_point: OnPoint = lambda phase, text, start=False: None) -> ValidationReport:
    check_device(profile, device, force)
    spec = profile.model.spec()
    common = sorted(set(profile.recompute.measurements.num_tokens)
                    | {n for n in profile.swap_out.measurements.num_tokens
                       if n <= profile.recompute.fit.max_tokens})
    sizes = fresh_sizes(common, count)
    impl = profile.swap.impl or "torch"
    swap = swap_sweep(spec, device, profile.swap.block_size, sizes, (impl,), on_point, seed=1,
                      pool_tokens=profile.swap_out.fit.max_tokens)  # the calibration's cache size
    swap_ms = swap.round_trip_ms(impl).tolist()
    sizes = swap.out[impl].sizes
    recompute_ms = full_prefill_ms(profile, device, sizes, on_point)
    chosen = select_preemption_strategy(sizes, profile)
    costs = profile.cost_model()
    return ValidationReport(
        num_tokens=sizes,
        swap_out_predicted_ms=costs.swap_out_ms(sizes).tolist(),
        swap_out_measured_ms=swap.out[impl].median_ms.tolist(),
        swap_in_predicted_ms=costs.swap_in_ms(sizes).tolist(),
        swap_in_measured_ms=swap.into[impl].median_ms.tolist(),
        recompute_predicted_ms=costs.recompute_ms(sizes).tolist(),
        recompute_measured_ms=recompute_ms,
        predicted_choice=chosen["strategies"],
        measured_choice=["swap" if s <= r else "recompute" for s, r in zip(swap_ms,
                                                                          recompute_ms)],
    )
