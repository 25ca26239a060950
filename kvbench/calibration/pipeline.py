"""`kvbench calibrate`: sweep, fit, and build the measured profile.

Phases: swap copies (every impl, plus the contiguous-copy ceiling), prefill (one layer of the
model's shape × num_layers + LM head, attention alone beside it), decode steps. Before anything
is allocated the inputs and the output path are checked (`check_inputs`) and the sizes are fitted
to free memory (`calibration_plan`, kvbench/calibration/memory.py); the swap and prefill points
are measured again in interleaved rounds and the machine is checked before and after
(kvbench/calibration/schedule.py). Swap-out and swap-in are timed and fitted apart. Each fit
holds out a share of the sizes and reports R² and held-out error; a swap-out, swap-in or
recompute fit over `MAX_HELDOUT_MAPE` fails the profile's quality bar.
The profile uses the fastest copy impl and records the others. The CUDA plans have not yet run
on a GPU (none lent so far).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from kvbench import __version__
from kvbench.calibration import fitting
from kvbench.calibration.decoder import torch_dtype
from kvbench.calibration.dtype import DtypeChoice, choose_cpu_dtype
from kvbench.calibration.memory import MIN_POINTS, MemoryPlan, MemoryPlanError, fit_plan
from kvbench.calibration.plans import CalibrationPlan, sweep_plan
from kvbench.calibration.plot import plot_profile
from kvbench.calibration.schedule import (
    Point,
    busy_reason,
    interleave,
    machine_check,
    recording,
)
from kvbench.calibration.sweeps import (
    OnPoint,
    Sweep,
    decode_sweep,
    is_out_of_memory,
    prefill_sweep,
    swap_sweep,
)
from kvbench.calibration.timeplan import PhaseClock, TimePlan, fit_budget
from kvbench.costmodel import CostModel
from kvbench.errors import KvbenchError
from kvbench.hardware import device_slug, fingerprint, slugify
from kvbench.io import check_writable, remove_stale_temp_files, write_atomic
from kvbench.limits import MAX_TOKENS
from kvbench.models import ModelSpec, from_hf_config, get_model
from kvbench.ops.kv_copy import copy_impls
from kvbench.profile import (
    DecodeSection,
    FitQuality,
    Measurements,
    ModelInfo,
    Profile,
    ProfileError,
    RecomputeSection,
    SwapInSection,
    SwapOutSection,
    SwapSection,
    crossover_line,
    fit_line,
    formula_lines,
    load,
    now_iso,
    problems,
    round_trip_ceiling_gbps,
    save,
)

MAX_HELDOUT_MAPE = 0.10
QUALITY_FITS = ("swap_out", "swap_in", "recompute")  # held-out error within MAX_HELDOUT_MAPE
MAX_DRIFT = 0.10  # reference workload before vs after: more is a warning
STALE_TEMP_S = 60.0  # a temp file this old beside a profile is a killed write's, not a live one
DEFAULT_MODEL = {"cuda": "llama-3-8b", "cpu": "qwen2.5-0.5b"}


def calibration_model(device: str, model: str | None = None, config_json: str | Path | None = None,
                      dtype: str | None = None) -> ModelSpec:
    """The model to calibrate: a preset, a local Hugging Face config.json, or the device's
    default (`DEFAULT_MODEL`)."""
    if config_json is not None and model is not None:
        raise KvbenchError("give either --model or --config-json, not both")
    if config_json is not None:
        return from_hf_config(config_json, dtype=dtype)
    return get_model(DEFAULT_MODEL[device] if model is None else model, dtype=dtype)


def default_profile_path(device: str, spec: ModelSpec) -> Path:
    """results/profiles/<machine slug>-<model>.json"""
    return Path("results/profiles") / f"{device_slug(device)}-{slugify(spec.name)}.json"


def check_inputs(spec: ModelSpec, path: str | Path) -> Path:
    """Everything a calibration is given, checked before it measures anything: the model fits
    the profile's schema, its dtype can be timed, and the profile and its plot can be written at
    `path` (the folder is made; the samples go beside them). Returns `path`."""
    try:
        ModelInfo(**spec.to_dict())
    except ValidationError as exc:
        raise KvbenchError(f"model {spec.name!r}: {problems(exc)}") from None
    torch_dtype(spec)
    path = Path(path)
    for target in (path, path.with_suffix(".png")):
        check_writable(target)
    return path


def calibration_plan(spec: ModelSpec, device: str, block_size: int = 16, quick: bool = False,
                     plan: CalibrationPlan | None = None,
                     available: dict[str, int] | None = None) -> MemoryPlan:
    """The sizes of `plan` (default: `PLANS[(device, quick)]`) that fit in memory
    (`kvbench.calibration.memory`): MemoryPlanError, one line, if too few fit."""
    if not 1 <= block_size <= MAX_TOKENS:
        raise KvbenchError(f"block size must be from 1 to {MAX_TOKENS} tokens, got {block_size}")
    plan = sweep_plan(device, quick, plan)
    memory_plan = fit_plan(spec, device, block_size, plan.swap_tokens.sizes(),
                           plan.prefill_tokens.sizes(), plan.decode_batch_sizes,
                           plan.decode_contexts, available)
    memory_plan.per_block_max_tokens = plan.per_block_max_tokens
    return memory_plan


def calibration_dtype(spec: ModelSpec, device: str, explicit: bool
                      ) -> tuple[ModelSpec, DtypeChoice | None]:
    """On CPU, `spec` in the dtype this CPU runs natively unless `explicit` (kvbench/calibration/
    dtype.py), and why; on CUDA `spec` as it is."""
    if device != "cpu":
        return spec, None
    choice = choose_cpu_dtype(spec, explicit)
    return dataclasses.replace(spec, dtype=choice.dtype), choice


def swap_impls(device: str) -> tuple[str, ...]:
    """The copy impls the swap sweep times (Triton only compiled, on CUDA)."""
    return tuple(i for i in copy_impls(device) if device == "cuda" or i != "triton")


def plan_time(spec: ModelSpec, device: str, memory_plan: MemoryPlan, block_size: int = 16,
              quick: bool = False, plan: CalibrationPlan | None = None) -> TimePlan:
    """The memory plan's sizes cut to the time budget (kvbench/calibration/timeplan.py), from a
    second of probes; TimePlanError (one line) when even the smallest plan takes too long."""
    interleave_s = sweep_plan(device, quick, plan).interleave_s
    return fit_budget(spec, device, block_size, memory_plan, interleave_s, quick,
                      swap_impls(device))


def plan_calibration(spec: ModelSpec, device: str, block_size: int = 16, quick: bool = False,
                     plan: CalibrationPlan | None = None) -> tuple[MemoryPlan, TimePlan]:
    """The memory plan and the time plan cut from it, for `spec` in its final dtype, as
    `kvbench calibrate`, `kvbench doctor` and a fleet node decide them (a second of probes);
    MemoryPlanError or TimePlanError (one line) for a calibration that cannot run."""
    memory_plan = calibration_plan(spec, device, block_size, quick, plan)
    return memory_plan, plan_time(spec, device, memory_plan, block_size, quick, plan)


def rejected_path(path: str | Path) -> Path:
    """Where a profile that missed its quality bar goes instead of `path`: beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rejected.json")


def samples_path(path: str | Path, profile: Profile) -> Path:
    """Where the raw samples of the profile at `path` are: named by their content hash, which
    the profile records, so a profile never names samples that are not its own."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{profile.extra['samples_sha256'][:16]}.samples.json")


@dataclass
class CalibrationRun:
    profile: Profile
    samples_json: str  # the raw samples, serialized; the profile records their sha256
    warnings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # of the quality bar: see QUALITY_FITS

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def samples(self) -> dict:
        return json.loads(self.samples_json)

    def write(self, path: str | Path) -> list[Path]:
        """The samples (`samples_path`), then the profile at `path`, then its plot (.png), each
        written atomically; returns the three paths, profile first.

        The samples file is new (its name is its content hash) and in place before the profile
        that names it replaces the old one: a reader sees the old pair or the new pair, never a
        mix. Afterwards samples no profile names, and temp files an interrupted write left
        (older than `STALE_TEMP_S`), are removed."""
        path = Path(path)
        samples = write_atomic(samples_path(path, self.profile), self.samples_json)
        save(self.profile, path)
        plot = plot_profile(self.profile, path.with_suffix(".png"))
        remove_stale_files(path)
        return [path, samples, plot]


def remove_stale_files(path: Path) -> None:
    """Beside the profile at `path`: samples files it does not name (an older profile's, or a
    write interrupted before its profile), and temp files older than `STALE_TEMP_S`."""
    try:
        keep = samples_path(path, load(path)).name
    except (ProfileError, KeyError):
        return  # not a profile this version wrote: leave its folder alone
    stem = re.escape(path.stem)
    samples = re.compile(rf"{stem}(\.[0-9a-f]{{16}})?\.samples\.json")
    ours = re.compile(rf"\.({re.escape(path.name)}|{stem}\.png|{stem}\.[0-9a-f]{{16}}"
                      rf"\.samples\.json)\.[0-9a-f]+\.tmp")
    for stale in path.parent.iterdir():
        if samples.fullmatch(stale.name) and stale.name != keep:
            stale.unlink(missing_ok=True)
    remove_stale_temp_files([p for p in path.parent.iterdir() if ours.fullmatch(p.name)],
                            STALE_TEMP_S)


def _fit_quality(fit: fitting.Fit, sizes: list[int]) -> FitQuality:
    return FitQuality(r2=fit.r2, r2_unweighted=fit.r2_unweighted,
                      heldout_mape=fit.heldout_mape, min_tokens=min(sizes),
                      max_tokens=max(sizes), method="nnls, relative error")


def _measurements(sizes, latency_ms, spread_ms, heldout) -> Measurements:
    return Measurements(num_tokens=list(sizes), latency_ms=np.asarray(latency_ms).tolist(),
                        spread_ms=np.asarray(spread_ms).tolist(), heldout=heldout.tolist())


def _sweep(phase: str, run):
    """Run one sweep; an out-of-memory error before its first point (weights, swap space) is
    reported in one line, as the end of that sweep."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is the machine's limit
        if not is_out_of_memory(exc):
            raise
        raise MemoryPlanError(f"{phase} sweep ran out of memory before its first point "
                              f"({str(exc).splitlines()[0]}); free memory or pick a "
                              "smaller model") from None


def _points_of(points: list[Point], *sweeps: Sweep) -> list[Point]:
    """The recorded points whose timings these sweeps hold (not, e.g., the copy ceiling's or
    the LM head's, which the sweeps turned into numbers already)."""
    held = {id(t) for sweep in sweeps for t in sweep.timings}
    return [p for p in points if id(p[2]) in held]


def _enough_points(phase: str, count: int, stopped: str | None) -> None:
    if count < MIN_POINTS[phase]:
        raise MemoryPlanError(f"{phase} sweep ended early ({stopped}) after {count} points; "
                              f"{MIN_POINTS[phase]} are needed to fit: free memory or pick a "
                              "smaller model")


def calibrate(spec: ModelSpec, device: str, block_size: int = 16, quick: bool = False,
              on_point: OnPoint = lambda phase, text, start=False: None, seed: int = 0,
              plan: CalibrationPlan | None = None, memory_plan: MemoryPlan | None = None,
              time_plan: TimePlan | None = None, dtype_choice: DtypeChoice | None = None,
              ) -> CalibrationRun:
    """Measure swap, prefill and decode on `device` for `spec`, fit, and return the profile.

    `memory_plan` gives the sizes (default: `calibration_plan(spec, device, block_size, quick,
    plan)`), `time_plan` (`plan_time`) the sizes and interleaved budgets that fit a time budget
    instead; the profile records its estimates beside each phase's measured seconds, and
    `dtype_choice` (`choose_cpu_dtype`) why the dtype. A sweep that still runs out of memory ends
    there and the profile records why; one left with too few points to fit is a
    MemoryPlanError."""
    if memory_plan is None:
        memory_plan = calibration_plan(spec, device, block_size, quick, plan)
    interleave_s = sweep_plan(device, quick, plan).interleave_s
    if time_plan is not None:
        memory_plan = time_plan.memory_plan(memory_plan)
        interleave_s = time_plan.sizes.interleave_s
    torch.manual_seed(seed)
    clock = PhaseClock()
    machine = {"before": machine_check(device)}
    impls = swap_impls(device)
    with recording() as points:
        swap = _sweep("swap", lambda: swap_sweep(
            spec, device, block_size, memory_plan.swap_sizes, impls, on_point, seed,
            per_block_max_tokens=memory_plan.per_block_max_tokens))
    # The profile takes the impl fastest over the sizes every impl ran (per_block may stop early),
    # among those that covered the whole sweep, by the first look; its points are then measured
    # in interleaved rounds.
    counts = {impl: len(swap.out[impl].sizes) for impl in impls}
    common = min(counts.values())
    full = [impl for impl in impls if counts[impl] == max(counts.values())]
    best = min(full, key=lambda impl: float(swap.round_trip_ms(impl)[:common].sum()))
    schedule = {"swap": interleave(_points_of(points, swap.out[best], swap.into[best]),
                                   interleave_s["swap"], seed).to_dict()}
    del points  # the swap space: freed before the prefill weights arrive
    swap_sizes = swap.out[best].sizes
    _enough_points("swap", len(swap_sizes), swap.out[best].stopped)
    swap_held = fitting.holdout_mask(len(swap_sizes))
    directions = {"swap_out": swap.out[best], "swap_in": swap.into[best]}
    # The sweep copies whole blocks: its time is a function of ceil(n / block_size) alone, so
    # the per-token column (n, nearly collinear with it) is left out; its coefficient is 0.
    swap_fits = {phase: fitting.fit_nnls(
        fitting.swap_design(swap_sizes, block_size, phase).without(f"{phase}_ms_per_token"),
        sweep.median_ms, swap_held) for phase, sweep in directions.items()}
    clock.lap("swap")

    with recording() as points:
        prefill = _sweep("prefill", lambda: prefill_sweep(
            spec, device, memory_plan.prefill_sizes, on_point, seed))
    schedule["prefill"] = interleave(_points_of(points, prefill.layer, prefill.attention),
                                     interleave_s["prefill"], seed).to_dict()
    del points
    _enough_points("prefill", len(prefill.sizes), prefill.layer.stopped)
    pre_held = fitting.holdout_mask(len(prefill.sizes))
    pre_fit = fitting.fit_nnls(fitting.recompute_design(prefill.sizes), prefill.total_ms,
                               pre_held)
    attn_fit = fitting.fit_nnls(fitting.recompute_design(prefill.attention.sizes),
                                prefill.attention.median_ms)
    clock.lap("prefill")

    batches, contexts = memory_plan.decode_batches, memory_plan.decode_contexts
    decode = _sweep("decode", lambda: decode_sweep(spec, device, batches, contexts, on_point,
                                                    seed))
    _enough_points("decode", len(decode.step_ms), decode.stopped)
    clock.lap("decode")
    machine["after"] = machine_check(device)
    machine["drift"] = machine["after"]["reference_ms"] / machine["before"]["reference_ms"] - 1
    dec_held = fitting.holdout_mask(len(decode.step_ms), every=3)
    dec_fit = fitting.fit_nnls(fitting.decode_design(decode.batch_size, decode.context_tokens),
                               decode.step_ms, dec_held)

    samples_json = json.dumps({"swap_out": {i: s.to_dict() for i, s in swap.out.items()},
                               "swap_in": {i: s.to_dict() for i, s in swap.into.items()},
                               "prefill_layer": prefill.layer.to_dict(),
                               "attention": prefill.attention.to_dict(),
                               "decode": decode.__dict__}, indent=1)
    costs = CostModel(**swap_fits["swap_out"].coefficients, **swap_fits["swap_in"].coefficients,
                      swap_out_ms_per_token=0.0, swap_in_ms_per_token=0.0,
                      block_size=block_size, **pre_fit.coefficients)
    fits = {**swap_fits, "recompute": pre_fit, "decode": dec_fit}
    misses = {name: f"{name} held-out error {100 * fit.heldout_mape:.1f}% exceeds "
                    f"{100 * MAX_HELDOUT_MAPE:.0f}%"
              for name, fit in fits.items()
              if fit.heldout_mape is not None and fit.heldout_mape > MAX_HELDOUT_MAPE}
    failures = [misses[name] for name in QUALITY_FITS if name in misses]
    warnings = [text for name, text in misses.items() if name not in QUALITY_FITS]
    warnings += [f"the machine was busy {when} calibrating ({reason})"
                 for when in ("before", "after") if (reason := busy_reason(machine[when]))]
    if abs(machine["drift"]) > MAX_DRIFT:
        warnings.append(f"the reference workload ran {100 * abs(machine['drift']):.0f}% "
                        f"{'slower' if machine['drift'] > 0 else 'faster'} after calibrating than "
                        "before: the machine changed under the measurement")
    swap_sections = {section.PHASE: section.from_costs(
        costs, fit=_fit_quality(swap_fits[section.PHASE], swap_sizes),
        measurements=_measurements(swap_sizes, directions[section.PHASE].median_ms,
                                   directions[section.PHASE].spread_ms, swap_held))
        for section in (SwapOutSection, SwapInSection)}
    stopped = {"swap": swap.out[best].stopped, "prefill": prefill.layer.stopped,
               "decode": decode.stopped}
    profile = Profile(
        created_at=now_iso(), kvbench_version=__version__, source="measured", dtype=spec.dtype,
        environment=fingerprint(device), model=ModelInfo(**spec.to_dict()),
        config={"device": device, "block_size": block_size, "quick": quick, "seed": seed,
                "swap_sizes": swap_sizes, "prefill_sizes": prefill.sizes,
                "decode_batch_sizes": batches, "decode_contexts": contexts,
                "prefill_scope": "one decoder layer x num_layers + final norm and LM head "
                                 "for the last token"},
        swap=SwapSection(block_size=block_size, impl=best), **swap_sections,
        recompute=RecomputeSection.from_costs(
            costs, fit=_fit_quality(pre_fit, prefill.sizes),
            measurements=_measurements(prefill.sizes, prefill.total_ms, prefill.total_spread_ms,
                                       pre_held)),
        decode=DecodeSection(**dec_fit.coefficients, r2=dec_fit.r2,
                             heldout_mape=dec_fit.heldout_mape),
        crossover_tokens=costs.crossover_tokens(),
        extra={
            "swap_impls": {impl: {
                "num_tokens": swap.out[impl].sizes,
                "out_ms": swap.out[impl].median_ms.tolist(),
                "in_ms": swap.into[impl].median_ms.tolist(),
                "round_trip_bandwidth_gbps": (2 * spec.kv_bytes_per_token
                                              * np.asarray(swap.out[impl].sizes)
                                              / swap.round_trip_ms(impl) / 1e6).tolist(),
            } for impl in impls},
            "ceiling_gbps": swap.ceiling_gbps,
            "ceiling_bytes": swap.ceiling_bytes,
            "attention": {"impl": prefill.attention_impl, "config": prefill.attention_config,
                          "num_tokens": prefill.attention.sizes,
                          "latency_ms": prefill.attention.median_ms.tolist(),
                          "ms_per_token_sq": attn_fit.coefficients["recompute_ms_per_token_sq"],
                          "r2": attn_fit.r2},
            "lm_head_ms": prefill.lm_head_ms,
            "decode_points": {"batch_size": decode.batch_size,
                              "context_tokens": decode.context_tokens,
                              "step_ms": decode.step_ms, "heldout": dec_held.tolist()},
            "stopped": {k: v for k, v in stopped.items() if v},
            "warnings": warnings,
            "quality": {"max_heldout_mape": MAX_HELDOUT_MAPE, "fits": list(QUALITY_FITS),
                        "passed": not failures, "failures": failures},
            "memory_plan": memory_plan.to_dict(),
            "phase_seconds": clock.seconds,
            **({"time_plan": time_plan.to_dict()} if time_plan else {}),
            **({"dtype_choice": dtype_choice.to_dict()} if dtype_choice else {}),
            "schedule": schedule,
            "machine": machine,
            "samples_sha256": hashlib.sha256(samples_json.encode()).hexdigest(),
        },
    )
    return CalibrationRun(profile, samples_json, warnings, failures)


def calibration_summary(profile: Profile, paths: list[Path]) -> list[str]:
    """What `kvbench calibrate` prints: where it wrote, fit quality, the fitted models, how close
    each copy impl came to the contiguous-copy ceiling (round trip and each direction), the
    crossover, sweeps cut short."""
    x = profile.extra
    swap, swap_out, swap_in, recompute, decode = formula_lines(profile)
    ceiling, kv_bytes = x["ceiling_gbps"], profile.model.spec().kv_bytes_per_token
    lines = [
        f"profile: {paths[0]}  (samples {paths[1].name}, plot {paths[2].name})",
        f"device: {profile.environment['device_name']}; model {profile.model.name} "
        f"({profile.dtype}, {kv_bytes:,.0f} KV bytes/token)",
        *([f"dtype: {DtypeChoice.from_dict(x['dtype_choice']).line()}"]
          if "dtype_choice" in x else []),
        *(fit_line(f"{phase} fit", fit) for phase, fit in profile.fits().items()),
        f"{swap}   [fastest impl: {profile.swap.impl}]",
        swap_out,
        swap_in,
        f"{recompute}   [attention alone: {x['attention']['ms_per_token_sq']:.6g}·n²]",
        *([f"{decode}   [R² {profile.decode.r2:.4f}]"] if decode else []),
        f"copy ceiling (one contiguous {x['ceiling_bytes'] / 2**20:,.0f} MiB copy): "
        f"out {ceiling['out']:.1f} GB/s, in {ceiling['in']:.1f} GB/s",
    ]
    for impl, data in x["swap_impls"].items():
        best = max(data["round_trip_bandwidth_gbps"])
        share = best / round_trip_ceiling_gbps(profile)
        bytes_moved = kv_bytes * np.asarray(data["num_tokens"], dtype=np.float64)
        peaks = {way: float(np.max(bytes_moved / np.asarray(data[f"{way}_ms"]) / 1e6))
                 for way in ("out", "in")}
        each_way = ", ".join(f"{way} {gbps:.1f} GB/s ({100 * gbps / ceiling[way]:.0f}%)"
                             for way, gbps in peaks.items())
        lines.append(f"  {impl:9} peak achieved {best:.1f} GB/s round trip "
                     f"({100 * share:.0f}% of ceiling); {each_way}")
    lines.append(crossover_line(profile))
    if "time_plan" in x:
        lines.append(time_line(x["time_plan"]["estimate_s"], x["phase_seconds"]))
    if "machine" in x:
        lines.append(machine_line(x["machine"], x["schedule"]))
    return lines + [f"note: sweep ended early: {reason}" for reason in x["stopped"].values()]


def time_line(estimate_s: dict[str, float], measured_s: dict[str, float]) -> str:
    """Each phase's measured seconds beside the time plan's estimate."""
    phases = ", ".join(f"{phase} {measured_s[phase]:.0f} s (planned {estimate_s[phase]:.0f})"
                       for phase in measured_s)
    return f"time: {phases}"


def machine_line(machine: dict, schedule: dict) -> str:
    """How quiet the machine was (reference workload before and after, load) and how the swap
    and prefill points were measured (interleaved rounds, worst spread left)."""
    before, after = machine["before"], machine["after"]
    load = "" if before["load_1m"] is None else (
        f", load {before['load_1m']:.1f} -> {after['load_1m']:.1f} on {before['cpu_count']} "
        "cores")
    rounds = ", ".join(f"{phase} {s['rounds']} rounds (worst spread "
                       f"{100 * s['max_rel_spread']:.0f}%)" for phase, s in schedule.items())
    speedup = "".join(f", {c['threads']} threads {c['parallel_speedup']:.1f}x one {when}"
                      for when, c in (("before", before), ("after", after))
                      if c.get("parallel_speedup") is not None)
    return (f"machine: reference {before['reference_ms']:.2f} ms ±{100 * before['rel_spread']:.0f}%"
            f" before, {after['reference_ms']:.2f} ms ±{100 * after['rel_spread']:.0f}% after "
            f"({100 * machine['drift']:+.0f}%{load}{speedup}); interleaved: {rounds}")
