"""`kvbench` command line: thin commands over the library. Results on stdout, progress on stderr."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvbench import __version__
from kvbench.hardware import (
    HARDWARE,
    device_slug,
    fingerprint,
    get_hardware,
    resolve_device,
    slugify,
)
from kvbench.models import MODELS, from_hf_config, get_model
from kvbench.profile import Profile, analytic_profile, load, save, write_atomic
from kvbench.selector import select_preemption_strategy

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Swap or recompute? Measure, fit and choose how to preempt KV caches.")
profile_app = typer.Typer(no_args_is_help=True, help="Inspect profiles.")
app.add_typer(profile_app, name="profile")
out = Console(soft_wrap=True, markup=False, highlight=False,
              width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def user_errors(fn):
    """A user mistake prints one line on stderr and exits 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, OSError) as exc:
            err.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"kvbench {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """kvbench: swap-vs-recompute preemption costs, measured and fitted."""


def parse_tokens(tokens: list[str]) -> list[int]:
    values = []
    for i, text in enumerate(tokens):
        try:
            values.append(int(text, 10))
        except ValueError:
            raise ValueError(f"request {i}: token count {text!r} is not a non-negative "
                             "integer") from None
    return values


def resolve_profile(profile: Optional[Path], model: Optional[str], hardware: str,
                    block_size: int, dtype: Optional[str], tp: int, force: bool = False,
                    **hw_overrides) -> Profile:
    """A profile from a file (checked against --model when both are given), or an analytic
    one for a model preset on a hardware preset."""
    if profile is not None:
        given = [k for k, v in hw_overrides.items() if v is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} sets analytic costs (--model "
                             "without --profile); a profile carries its own measured costs")
        prof = load(profile)
        prof.check_matches(model=model, force=force)
        return prof
    if model is None:
        raise ValueError("give --profile PATH or --model NAME (see `kvbench models`)")
    return analytic_profile(get_model(model, dtype=dtype, tp=tp),
                            get_hardware(hardware, **hw_overrides), block_size=block_size)


@app.command()
@user_errors
def select(
    tokens: list[str] = typer.Argument(..., help="Current token count of each request."),
    profile: Optional[Path] = typer.Option(None, help="Profile JSON from `kvbench calibrate`."),
    model: Optional[str] = typer.Option(None, help="Model preset for analytic costs."),
    hardware: str = typer.Option("h100-sxm", help=f"Hardware preset: {', '.join(HARDWARE)}."),
    h2d_gbps: Optional[float] = typer.Option(None, help="Host-to-device link, GB/s."),
    d2h_gbps: Optional[float] = typer.Option(None, help="Device-to-host link, GB/s."),
    transfer_latency_ms: Optional[float] = typer.Option(None, help="Fixed cost per transfer."),
    peak_tflops: Optional[float] = typer.Option(None, help="Dense matrix rate, TFLOP/s."),
    achieved_fraction: Optional[float] = typer.Option(None, help="Share of peak reached."),
    block_size: int = typer.Option(16, help="KV block size in tokens."),
    dtype: Optional[str] = typer.Option(None, help="KV/weight dtype (default: the model's)."),
    tp: int = typer.Option(1, help="Tensor-parallel degree."),
    force: bool = typer.Option(False, help="Use a profile made for another model."),
    as_json: bool = typer.Option(False, "--json", help="Print the selector's dict as JSON."),
) -> None:
    """Choose swap or recompute for each request and print both costs."""
    prof = resolve_profile(profile, model, hardware, block_size, dtype, tp, force,
                           h2d_gbps=h2d_gbps, d2h_gbps=d2h_gbps,
                           transfer_latency_ms=transfer_latency_ms, peak_tflops=peak_tflops,
                           achieved_fraction=achieved_fraction)
    counts = parse_tokens(tokens)
    result = select_preemption_strategy(counts, prof)
    valid_max = max(prof.swap.fit.max_tokens, prof.recompute.fit.max_tokens)
    if counts and max(counts) > valid_max:
        err.print(f"warning: {max(counts)} tokens is beyond the profile's measured range "
                  f"(up to {valid_max}); costs there are extrapolated", highlight=False)
    if as_json:
        out.print_json(json.dumps(result)) if sys.stdout.isatty() else print(json.dumps(result))
        return
    table = Table(title=f"{prof.model.name} · {prof.environment.get('device_name')} "
                        f"({prof.source})")
    for col in ("tokens", "swap_ms", "recompute_ms", "choice"):
        table.add_column(col, justify="left" if col == "choice" else "right")
    for n, s, r, c in zip(counts, result["swap_costs_ms"], result["recompute_costs_ms"],
                          result["strategies"]):
        table.add_row(str(n), f"{s:.4f}", f"{r:.4f}", c)
    out.print(table)
    out.print(f"total_cost_ms: {result['total_cost_ms']:.4f}")
    if prof.crossover_tokens:
        out.print(f"crossover_tokens: {prof.crossover_tokens} (swap is cheaper from here on)")


@app.command()
def models() -> None:
    """List model presets with their KV bytes per token."""
    table = Table(title="model presets")
    for col in ("name", "layers", "hidden", "heads", "kv_heads", "head_dim", "dtype",
                "kv_bytes_per_token", "params_b"):
        table.add_column(col, justify="left" if col in ("name", "dtype") else "right")
    for spec in MODELS.values():
        params_b = (spec.non_embedding_params + 2 * spec.vocab_size * spec.hidden_size) / 1e9
        table.add_row(spec.name, str(spec.num_layers), str(spec.hidden_size),
                      str(spec.num_heads), str(spec.num_kv_heads), str(spec.head_dim),
                      spec.dtype, f"{spec.kv_bytes_per_token:,.0f}", f"{params_b:.2f}")
    out.print(table)


def _formulas(prof: Profile) -> tuple[str, str, str | None]:
    """The fitted swap, recompute and (if present) decode models, one line each."""
    s, r, d = prof.swap, prof.recompute, prof.decode
    decode = (f"decode_step_ms(B, T) = {d.d0_ms:.6g} + {d.d1_ms_per_seq:.6g}·B + "
              f"{d.d2_ms_per_seq_token:.6g}·B·T" if d else None)
    return (f"swap_ms(n) = {s.fixed_ms:.6g} + {s.ms_per_token:.6g}·n + {s.ms_per_block:.6g}·"
            f"ceil(n/{s.block_size})",
            f"recompute_ms(n) = {r.fixed_ms:.6g} + {r.ms_per_token:.6g}·n + "
            f"{r.ms_per_token_sq:.6g}·n²", decode)


def _fit_line(name: str, fit) -> str:
    r2 = "n/a" if fit.r2 is None else f"{fit.r2:.4f}"
    if fit.r2_unweighted is not None:
        r2 += f" (unweighted {fit.r2_unweighted:.4f})"
    mape = "n/a" if fit.heldout_mape is None else f"{100 * fit.heldout_mape:.1f}%"
    return (f"{name}: R² {r2}, held-out error {mape}, valid {fit.min_tokens}-{fit.max_tokens} "
            f"tokens ({fit.method})")


@profile_app.command("show")
@user_errors
def profile_show(path: Path = typer.Argument(..., help="Profile JSON.")) -> None:
    """Summarise a profile: coefficients, fit quality, crossover."""
    prof = load(path)
    env = prof.environment
    out.print(f"profile: {path}")
    out.print(f"source: {prof.source}, created {prof.created_at}, kvbench {prof.kvbench_version}")
    out.print(f"device: {env.get('device_name')} (commit {env.get('commit')}, torch "
              f"{env.get('torch')}, triton {env.get('triton')})")
    out.print(f"model: {prof.model.name}, {prof.dtype}, tp={prof.model.tp}, "
              f"{prof.model.spec().kv_bytes_per_token:,.0f} KV bytes/token")
    s, r = prof.swap, prof.recompute
    swap, recompute, decode = _formulas(prof)
    out.print(swap + (f"  [impl {s.impl}]" if s.impl else ""))
    out.print(recompute)
    if decode:
        out.print(decode)
    out.print(_fit_line("swap fit", s.fit))
    out.print(_fit_line("recompute fit", r.fit))
    crossover = prof.crossover_tokens
    out.print(f"crossover_tokens: {crossover if crossover else 'none (recompute always cheaper)'}")


DEFAULT_MODEL = {"cuda": "llama-3-8b", "cpu": "qwen2.5-0.5b"}


class PhaseProgress:
    """One progress line per phase on stderr, showing the latest measured figure."""

    def __init__(self, progress: Progress):
        self.progress, self.tasks = progress, {}

    def __call__(self, phase: str, text: str) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=None)
        self.progress.update(self.tasks[phase], advance=1, description=f"{phase:9} {text}")


def progress_bar() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"),
                    TextColumn("[{task.completed} points]"), TimeElapsedColumn(), console=err,
                    transient=False)


def print_calibration(prof: Profile, paths: list[Path]) -> None:
    s, r, x = prof.swap, prof.recompute, prof.extra
    out.print(f"profile: {paths[0]}  (samples {paths[1].name}, plot {paths[2].name})")
    out.print(f"device: {prof.environment['device_name']}; model {prof.model.name} "
              f"({prof.dtype}, {prof.model.spec().kv_bytes_per_token:,.0f} KV bytes/token)")
    for name, fit in (("swap", s.fit), ("recompute", r.fit)):
        out.print(_fit_line(f"{name} fit", fit))
    swap, recompute, decode = _formulas(prof)
    out.print(f"{swap}   [fastest impl: {s.impl}]")
    out.print(f"{recompute}   [attention alone: {x['attention']['ms_per_token_sq']:.6g}·n²]")
    if decode:
        out.print(f"{decode}   [R² {prof.decode.r2:.4f}]")
    ceiling = x["ceiling_gbps"]
    out.print(f"copy ceiling (one contiguous {x['ceiling_bytes'] / 2**20:,.0f} MiB copy): "
              f"out {ceiling['out']:.1f} GB/s, in {ceiling['in']:.1f} GB/s")
    for impl, data in x["swap_impls"].items():
        best = max(data["round_trip_bandwidth_gbps"])
        share = best / (2 / (1 / ceiling["out"] + 1 / ceiling["in"]))
        out.print(f"  {impl:9} peak achieved {best:.1f} GB/s round trip "
                  f"({100 * share:.0f}% of ceiling)")
    crossover = prof.crossover_tokens
    out.print(f"crossover_tokens: {crossover if crossover else 'none (recompute always cheaper)'}")
    for reason in x["stopped"].values():
        out.print(f"note: sweep ended early: {reason}")


@app.command("calibrate")
@user_errors
def calibrate_cmd(
    device: str = typer.Option("auto", help="auto (GPU if present, else CPU), cuda or cpu."),
    model: Optional[str] = typer.Option(None, help="Model preset (default: llama-3-8b on "
                                                  "CUDA, qwen2.5-0.5b on CPU)."),
    config_json: Optional[Path] = typer.Option(None, help="Hugging Face config.json instead."),
    block_size: int = typer.Option(16, min=1, help="KV block size in tokens."),
    dtype: Optional[str] = typer.Option(None, help="dtype (default: the model's)."),
    quick: bool = typer.Option(False, help="Fewer, smaller sizes (CPU: under a minute)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Profile path (default "
                                            "results/profiles/<device>-<model>.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile JSON."),
) -> None:
    """Measure swap and prefill on this machine, fit the cost models, write the profile."""
    from kvbench.calibration.pipeline import calibrate
    from kvbench.calibration.plot import plot_profile
    from kvbench.doctor import require_calibration_fits

    dev = resolve_device(device)
    if config_json is not None and model is not None:
        raise ValueError("give either --model or --config-json, not both")
    spec = (from_hf_config(config_json, dtype=dtype) if config_json is not None
            else get_model(model or DEFAULT_MODEL[dev], dtype=dtype))
    path = out_path or Path("results/profiles") / f"{device_slug(dev)}-{slugify(spec.name)}.json"
    require_calibration_fits(spec, dev, block_size, quick)  # refuse before allocating
    try:
        with progress_bar() as progress:
            run = calibrate(spec, dev, block_size=block_size, quick=quick,
                            on_point=PhaseProgress(progress))
    except KeyboardInterrupt:
        err.print(f"interrupted: nothing written; {path} is as it was")
        raise typer.Exit(130) from None
    samples_path = write_atomic(path.with_suffix(".samples.json"),
                                json.dumps(run.samples, indent=1))
    save(run.profile, path)
    plot_path = plot_profile(run.profile, path.with_suffix(".png"))
    for warning in run.warnings:
        err.print(f"warning: {warning}", highlight=False)
    if as_json:
        print(run.profile.to_json())
    else:
        print_calibration(run.profile, [path, samples_path, plot_path])


@app.command("validate")
@user_errors
def validate_cmd(
    profile: Path = typer.Option(..., help="Measured profile to check."),
    device: str = typer.Option("auto", help="auto, cuda or cpu: must be the profile's."),
    count: int = typer.Option(6, min=2, help="How many fresh token counts to measure."),
    force: bool = typer.Option(False, help="Validate on another device anyway."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Measure fresh swap and recompute points; report decision agreement and errors."""
    from kvbench.calibration.validate import validate

    prof = load(profile)
    with progress_bar() as progress:
        report = validate(prof, resolve_device(device), count=count, force=force,
                          on_point=PhaseProgress(progress))
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    table = Table(title=f"validate {profile} on {resolve_device(device)}")
    for col in ("tokens", "swap pred ms", "swap meas ms", "recompute pred ms",
                "recompute meas ms", "selector", "measured"):
        table.add_column(col, justify="right")
    for row in zip(report.num_tokens, report.swap_predicted_ms, report.swap_measured_ms,
                   report.recompute_predicted_ms, report.recompute_measured_ms,
                   report.predicted_choice, report.measured_choice):
        table.add_row(str(row[0]), *(f"{v:.3f}" for v in row[1:5]), row[5], row[6])
    out.print(table)
    out.print(f"decision agreement: {100 * report.agreement:.0f}%; prediction error: swap "
              f"{100 * report.swap_mape:.1f}%, recompute {100 * report.recompute_mape:.1f}%")


# ---------------------------------------------------------------------------------------------
# Scheduler simulator (kvbench.sim): thin commands over kvbench.sim and kvbench.sim.study

SIM_TRACE = typer.Option(None, "--trace", help="Trace CSV: Azure 2023 (TIMESTAMP, ContextTokens, "
                         "GeneratedTokens) or arrival_s, prompt_tokens, output_tokens[, "
                         "max_tokens].")
SIM_SYNTHETIC = typer.Option(None, "--synthetic", help="Synthetic mix instead, e.g. 'requests="
                             "500,rate=8,arrivals=gamma,cv=2,long-prompt=0.3,long-output=0.2'.")
SIM_PROFILE = typer.Option(None, "--profile", help="Profile JSON (calibrated costs).")
SIM_MODEL = typer.Option(None, "--model", help="Model preset for analytic costs (default "
                         "llama-2-7b).")
SIM_HARDWARE = typer.Option("h100-sxm", "--hardware", help="Hardware preset for analytic costs.")
SIM_NUM_REQUESTS = typer.Option(None, "--num-requests", min=1,
                                help="Only the first N requests.")
SIM_MAX_TOKENS = typer.Option(None, "--max-tokens", min=1, help="Generation limit of every "
                              "request (default: the trace's longest output).")
SIM_GPU_BLOCKS = typer.Option(None, "--gpu-blocks", min=1, help="KV blocks on the GPU (default: "
                              "from --gpu-memory-gib x 0.9 minus the weights).")
SIM_GPU_MEMORY = typer.Option(None, "--gpu-memory-gib", min=0.0, help="GPU memory, GiB "
                              "(default: the hardware preset's, 80 for an H100).")
SIM_CPU_SWAP = typer.Option(4.0, "--cpu-swap-gib", min=0.0, help="CPU swap space, GiB.")
SIM_SEED = typer.Option(0, "--seed", min=0, help="Seed of synthetic workloads and noisy "
                        "predictions.")
SIM_JSON = typer.Option(False, "--json", help="Print the summary as JSON.")


def _sim_inputs(trace, synthetic, profile, model, hardware, rate_scale, num_requests,
                max_tokens, seed):
    """The workload and the profile (calibrated, or analytic for the model) of a sim command."""
    from kvbench.sim.engine import SimConfig
    from kvbench.sim.workloads import load_workload

    if profile is not None and model is not None:
        raise ValueError("give either --profile or --model, not both: a profile names its model")
    workload = load_workload(trace, synthetic, rate_scale, num_requests, max_tokens, seed)
    prof = resolve_profile(profile, None if profile else model or SimConfig.model, hardware,
                           16, None, 1)
    return workload, prof


def _sim_progress(label: str, unit: str) -> Progress:
    return Progress(SpinnerColumn(), TextColumn(label),
                    TextColumn("{task.completed}/{task.total} " + unit), TimeElapsedColumn(),
                    console=err, transient=True, disable=not err.is_terminal)


@app.command("simulate")
@user_errors
def simulate_cmd(
    trace: Optional[Path] = SIM_TRACE,
    synthetic: Optional[str] = SIM_SYNTHETIC,
    profile: Optional[Path] = SIM_PROFILE,
    model: Optional[str] = SIM_MODEL,
    hardware: str = SIM_HARDWARE,
    admission: str = typer.Option("fcfs", help="fcfs, reserve-max or future-kv."),
    victim: str = typer.Option("lifo", help="lifo, lcf or cost-aware."),
    preemption: str = typer.Option("recompute", help="recompute, swap or selector."),
    predictor: str = typer.Option("oracle", help="oracle, noisy, history or max."),
    rate_scale: float = typer.Option(1.0, help="Replay the trace this many times faster."),
    num_requests: Optional[int] = SIM_NUM_REQUESTS,
    max_tokens: Optional[int] = SIM_MAX_TOKENS,
    gpu_blocks: Optional[int] = SIM_GPU_BLOCKS,
    gpu_memory_gib: Optional[float] = SIM_GPU_MEMORY,
    cpu_swap_gib: float = SIM_CPU_SWAP,
    headroom: float = typer.Option(0.0, help="future-kv: fraction of the cache kept free."),
    max_long_requests: Optional[int] = typer.Option(
        None, min=0, help="future-kv: at most this many requests predicted to generate 512+ "
        "tokens at once."),
    noise_sigma: float = typer.Option(0.5, help="noisy: sigma of the log-normal error."),
    history_quantile: float = typer.Option(0.5, help="history: quantile of recent outputs."),
    seed: int = SIM_SEED,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Write summary.json, summary.csv,"
                                           " requests.csv, timeline.csv and run.png here."),
    as_json: bool = SIM_JSON,
) -> None:
    """Simulate one serving replica under one scheduling policy."""
    from kvbench.sim.engine import SimConfig, simulate
    from kvbench.sim.metrics import summarize, write_results
    from kvbench.sim.plots import plot_run

    workload, prof = _sim_inputs(trace, synthetic, profile, model, hardware, rate_scale,
                                 num_requests, max_tokens, seed)
    config = SimConfig(admission=admission, victim=victim, preemption=preemption,
                       predictor=predictor, model=prof.model.name, hardware=hardware,
                       block_size=prof.swap.block_size, gpu_blocks=gpu_blocks,
                       gpu_memory_gib=gpu_memory_gib, cpu_swap_gib=cpu_swap_gib,
                       headroom_fraction=headroom,
                       max_long_requests=max_long_requests, noise_sigma=noise_sigma,
                       history_quantile=history_quantile, seed=seed)
    with _sim_progress(config.policy_name, "requests") as progress:
        task = progress.add_task("simulate", total=workload.num_requests)
        result = simulate(workload, config, prof,
                          progress=lambda done: progress.update(task, completed=done))
    summary = summarize(result)
    if out_dir is not None:
        write_results(result, out_dir, summary)
        plot_run(result, out_dir / "run.png")
    if as_json:
        print(json.dumps(summary))
        return
    s = summary
    out.print(f"policy: {s['policy']}")
    out.print(f"workload: {s['workload']} ({s['requests']} requests)")
    out.print(f"model: {s['model']} ({s['profile_source']} costs); {s['gpu_blocks']} GPU blocks, "
              f"{s['cpu_swap_blocks']} CPU swap blocks of {s['kv_block_bytes'] / 2**20:.2f} MiB")
    out.print(f"completed: {s['completed']} ({s['rejected']} rejected, {s['unfinished']} "
              "unfinished)")
    out.print(f"preemptions: {s['preemptions']} ({s['swap_preemptions']} swapped, "
              f"{s['recompute_preemptions']} recomputed) of {s['preempted_requests']} requests")
    out.print(f"recompute_fraction: {100 * s['recompute_fraction']:.3f}% of FLOPs "
              f"({s['recompute_tokens']} tokens recomputed)")
    out.print(f"throughput_tokens_per_s: {s['throughput_tokens_per_s']:.1f} over "
              f"{s['makespan_s']:.1f} s")
    out.print(f"gpu_utilization: {100 * s['gpu_utilization']:.1f}% busy, "
              f"{100 * s['useful_utilization']:.1f}% useful (ceiling 100%)")
    for name, unit in (("ttft", "s"), ("tpot", "ms"), ("tpot_div_n", "ms"), ("e2e", "s")):
        values = [s[f"{name}_{k}_{unit}"] for k in ("p50", "p90", "p99")]
        out.print(f"{name}_{unit}: " + ("n/a" if values[0] is None else
                                        " ".join(f"p{p} {v:.4g}" for p, v in
                                                 zip((50, 90, 99), values))))
    out.print(f"max_kv_blocks_used: {s['max_kv_blocks_used']} of {s['gpu_blocks']}")
    if s["livelock"]:
        out.print(f"livelock: {s['livelock']['reason']}")
    if s["rejected"]:
        first = next(iter(s["rejections"].items()))
        out.print(f"rejected: request {first[0]}: {first[1]}")
    if out_dir is not None:
        out.print(f"wrote: {out_dir}/")


@app.command("compare-policies")
@user_errors
def compare_policies_cmd(
    trace: Optional[Path] = SIM_TRACE,
    synthetic: Optional[str] = SIM_SYNTHETIC,
    policies: Optional[str] = typer.Option(None, help="Comma-separated admission/victim/"
                                           "preemption/predictor (default: the study's ten)."),
    profile: Optional[Path] = SIM_PROFILE,
    model: Optional[str] = SIM_MODEL,
    hardware: str = SIM_HARDWARE,
    rate_scale: Optional[float] = typer.Option(
        None, help="Replay the trace this many times faster (default 1; 2 for the default "
        "Azure trace)."),
    num_requests: Optional[int] = SIM_NUM_REQUESTS,
    max_tokens: Optional[int] = SIM_MAX_TOKENS,
    gpu_blocks: Optional[int] = SIM_GPU_BLOCKS,
    gpu_memory_gib: Optional[float] = SIM_GPU_MEMORY,
    cpu_swap_gib: float = SIM_CPU_SWAP,
    seed: int = SIM_SEED,
    jobs: int = typer.Option(1, min=1, help="Policies simulated in parallel processes."),
    out_dir: Path = typer.Option(Path("sim-compare"), "--out", help="Where compare.json, "
                                 "compare.csv and compare.png go."),
    as_json: bool = SIM_JSON,
) -> None:
    """Run a matrix of policies on one workload (default: the shared Azure 2023 trace)."""
    from kvbench.sim.engine import SimConfig
    from kvbench.sim.metrics import summarize
    from kvbench.sim.study import (
        STUDY_POLICIES,
        STUDY_RATE_SCALE,
        compare_policies,
        comparison_rows,
        write_comparison,
    )
    from kvbench.sim.workloads import AZURE_CONV_TRACE

    if trace is None and synthetic is None:
        trace = AZURE_CONV_TRACE
        rate_scale = STUDY_RATE_SCALE if rate_scale is None else rate_scale
    workload, prof = _sim_inputs(trace, synthetic, profile, model, hardware,
                                 1.0 if rate_scale is None else rate_scale, num_requests,
                                 max_tokens, seed)
    names = [p.strip() for p in policies.split(",") if p.strip()] if policies else STUDY_POLICIES
    base = SimConfig(model=prof.model.name, hardware=hardware, block_size=prof.swap.block_size,
                     gpu_blocks=gpu_blocks, gpu_memory_gib=gpu_memory_gib,
                     cpu_swap_gib=cpu_swap_gib, seed=seed)
    with _sim_progress("compare-policies", "policies") as progress:
        task = progress.add_task("compare", total=len(names))
        results = compare_policies(workload, names, base, prof, jobs,
                                   on_result=lambda _: progress.advance(task))
    summaries = [summarize(r) for r in results]
    write_comparison(results, summaries, out_dir)
    rows = comparison_rows(summaries)
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title=f"{results[0].workload['name']} · {results[0].model} · "
                        f"{summaries[0]['gpu_blocks']} GPU blocks")
    headers = {"policy": "policy", "preemptions": "preempt", "preempted_requests": "reqs",
               "preemptions_removed_pct": "removed%", "recompute_fraction_pct": "recomp%",
               "throughput_tokens_per_s": "tok/s", "throughput_change_pct": "Δtok/s%",
               "useful_utilization": "useful", "ttft_p50_s": "TTFT50 s",
               "ttft_p99_s": "TTFT99 s", "tpot_p50_ms": "TPOT50 ms", "e2e_p99_s": "E2E99 s"}
    for col in rows[0]:
        table.add_column(headers[col], justify="left" if col == "policy" else "right",
                         no_wrap=True)
    for row in rows:
        table.add_row(*("n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
                        for v in row.values()))
    out.print(table)
    out.print(f"wrote: {out_dir}/compare.json, compare.csv, compare.png")

@app.command("report")
@user_errors
def report_cmd(results: Path = typer.Option(Path("results"), help="Results folder.")) -> None:
    """Regenerate results/README.md from the committed baselines and profiles."""
    from kvbench.report import write_report

    out.print(f"wrote {write_report(results)}")


@app.command("machine")
@user_errors
def machine_cmd(
    device: str = typer.Option("auto", help="auto, cuda or cpu."),
    slug: bool = typer.Option(False, "--slug", help="Print only the file-name-safe name."),
) -> None:
    """Print this machine's fingerprint (device, driver, versions, commit) as JSON."""
    dev = resolve_device(device)
    print(device_slug(dev) if slug else json.dumps(fingerprint(dev), indent=2))


@app.command("doctor")
@user_errors
def doctor_cmd(
    device: str = typer.Option("auto", help="auto, cuda or cpu: the device to calibrate on."),
    model: Optional[str] = typer.Option(None, help="Model whose calibration to size (default "
                                                  "as for calibrate)."),
    block_size: int = typer.Option(16, min=1, help="KV block size in tokens."),
    quick: bool = typer.Option(False, help="Size the --quick calibration."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Say whether this machine is ready to calibrate (exit 1 when a check fails)."""
    from kvbench import doctor

    dev = resolve_device(device)
    checks = doctor.run_checks(get_model(model or DEFAULT_MODEL[dev]), dev, block_size, quick)
    if as_json:
        print(json.dumps(doctor.as_dicts(checks), indent=1))
    else:
        out.print(doctor.table(checks), markup=True)
        out.print("ready" if doctor.ready(checks) else "not ready: see the failed checks")
    if not doctor.ready(checks):
        raise typer.Exit(1)


def main() -> None:
    """Console entry: click's usage errors become one line too (exit 2), not a usage box."""
    try:
        code = app(standalone_mode=False)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise  # not a click usage error: a bug, keep its traceback
        if type(exc).__name__ == "NoArgsIsHelpError":
            app(["--help"], standalone_mode=False)
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx else ""
        err.print(f"error: {exc.format_message()}{hint}")
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
