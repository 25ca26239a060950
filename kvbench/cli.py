"""`kvbench` command line: thin commands over the library. Results on stdout, progress on stderr."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from kvbench import __version__
from kvbench.hardware import HARDWARE, get_hardware
from kvbench.models import MODELS, get_model
from kvbench.profile import Profile, analytic_profile, load
from kvbench.selector import select_preemption_strategy

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Swap or recompute? Measure, fit and choose how to preempt KV caches.")
profile_app = typer.Typer(no_args_is_help=True, help="Inspect profiles.")
app.add_typer(profile_app, name="profile")
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)


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
                    block_size: int, dtype: Optional[str], tp: int, **hw_overrides) -> Profile:
    """A profile from a file, or an analytic one for a model preset on a hardware preset."""
    if profile is not None and model is not None:
        raise ValueError("give either --profile or --model, not both")
    if profile is not None:
        return load(profile)
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
    as_json: bool = typer.Option(False, "--json", help="Print the selector's dict as JSON."),
) -> None:
    """Choose swap or recompute for each request and print both costs."""
    prof = resolve_profile(profile, model, hardware, block_size, dtype, tp,
                           h2d_gbps=h2d_gbps, d2h_gbps=d2h_gbps,
                           transfer_latency_ms=transfer_latency_ms, peak_tflops=peak_tflops,
                           achieved_fraction=achieved_fraction)
    counts = parse_tokens(tokens)
    result = select_preemption_strategy(counts, prof)
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


def _fit_line(name: str, fit) -> str:
    r2 = "n/a" if fit.r2 is None else f"{fit.r2:.4f}"
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
    out.print(f"swap_ms(n) = {s.fixed_ms:.6g} + {s.ms_per_token:.6g}·n + {s.ms_per_block:.6g}·"
              f"ceil(n/{s.block_size})" + (f"  [impl {s.impl}]" if s.impl else ""))
    out.print(f"recompute_ms(n) = {r.fixed_ms:.6g} + {r.ms_per_token:.6g}·n + "
              f"{r.ms_per_token_sq:.6g}·n²")
    if prof.decode:
        d = prof.decode
        out.print(f"decode_step_ms(B, T) = {d.d0_ms:.6g} + {d.d1_ms_per_seq:.6g}·B + "
                  f"{d.d2_ms_per_seq_token:.6g}·B·T")
    out.print(_fit_line("swap fit", s.fit))
    out.print(_fit_line("recompute fit", r.fit))
    crossover = prof.crossover_tokens
    out.print(f"crossover_tokens: {crossover if crossover else 'none (recompute always cheaper)'}")


def main() -> None:
    app()
