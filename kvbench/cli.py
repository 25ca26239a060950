"""`kvbench` command line: thin commands over the library. Results on stdout, progress on stderr.

A user mistake prints one `error:` line and exits 2: the library reports bad input as a
`KvbenchError` and an unreadable or unwritable path raises OSError; anything else is a bug and
keeps its traceback. The simulator's commands are in kvbench/cli_sim.py.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from kvbench import __version__
from kvbench.cli_sim import RAY_ADDRESS_HELP
from kvbench.cli_sim import app as sim_app
from kvbench.console import echo, err, out
from kvbench.errors import KvbenchError
from kvbench.hardware import (
    HARDWARE,
    device_slug,
    fingerprint,
    fingerprint_mismatch,
    resolve_device,
)
from kvbench.models import presets_table
from kvbench.profile import extrapolation_warning, load, resolve, summary_lines
from kvbench.progress import Reporter
from kvbench.selector import select_preemption_strategy, selection_table

USER_ERRORS = (KvbenchError, OSError)


class Commands(TyperGroup):
    """The root group: a user mistake in any command prints one line on stderr and exits 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            err.print(f"error: {exc}")
            raise typer.Exit(2) from None


app = typer.Typer(cls=Commands, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Swap or recompute? Measure, fit and choose how to preempt KV caches.")
app.add_typer(sim_app)  # simulate, compare-policies, sweep, replay (kvbench/cli_sim.py)
profile_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect profiles.")
app.add_typer(profile_app, name="profile")


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
            raise KvbenchError(f"request {i}: token count {text!r} is not a non-negative "
                             "integer") from None
    return values


@app.command(context_settings={"ignore_unknown_options": True})  # `select -5`: a count
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
    block_size: Optional[int] = typer.Option(None, help="KV block size in tokens (default 16)."),
    dtype: Optional[str] = typer.Option(None, help="KV/weight dtype (default: the model's)."),
    tp: Optional[int] = typer.Option(None, help="Tensor-parallel degree (default 1)."),
    force: bool = typer.Option(False, help="Use a profile made for another model."),
    as_json: bool = typer.Option(False, "--json", help="Print the selector's dict as JSON."),
) -> None:
    """Choose swap or recompute for each request and print both costs."""
    prof = resolve(profile, model, hardware, block_size, dtype, tp, force, h2d_gbps=h2d_gbps,
                   d2h_gbps=d2h_gbps, transfer_latency_ms=transfer_latency_ms,
                   peak_tflops=peak_tflops, achieved_fraction=achieved_fraction)
    counts = parse_tokens(tokens)
    result = select_preemption_strategy(counts, prof)
    if warning := fingerprint_mismatch(prof.environment):
        err.print(f"warning: {warning}")
    if warning := extrapolation_warning(prof, counts):
        err.print(f"warning: {warning}")
    if as_json:
        out.print_json(json.dumps(result)) if sys.stdout.isatty() else print(json.dumps(result))
        return
    out.print(selection_table(counts, result, f"{prof.model.name} · "
                              f"{prof.environment.get('device_name')} ({prof.source})"))
    out.print(f"total_cost_ms: {result['total_cost_ms']:.4f}")
    if prof.crossover_tokens:
        out.print(f"crossover_tokens: {prof.crossover_tokens} (swap is cheaper from here on)")


@app.command()
def models() -> None:
    """List model presets with their KV bytes per token."""
    out.print(presets_table())


@profile_app.command("show")
def profile_show(path: Path = typer.Argument(..., help="Profile JSON.")) -> None:
    """Summarise a profile: coefficients, fit quality, crossover."""
    echo(summary_lines(load(path), path))


@app.command("calibrate")
def calibrate_cmd(
    device: str = typer.Option("auto", help="auto (GPU if present, else CPU), cuda or cpu."),
    model: Optional[str] = typer.Option(None, help="Model preset (default: llama-3-8b on "
                                                  "CUDA, qwen2.5-0.5b on CPU)."),
    config_json: Optional[Path] = typer.Option(None, help="Hugging Face config.json instead."),
    block_size: int = typer.Option(16, min=1, help="KV block size in tokens."),
    dtype: Optional[str] = typer.Option(None, help="dtype (default: the model's; on CPU "
                                        "float32 where the CPU lacks native bfloat16)."),
    quick: bool = typer.Option(False, help="Fewer, smaller sizes, planned to take 90 s at "
                                           "most (a full run: 10 min)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Profile path (default "
                                            "results/profiles/<device>-<model>.json)."),
    force: bool = typer.Option(False, help="Write the profile there even if a fit misses the "
                                           "quality bar (held-out error over 10%)."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile JSON."),
) -> None:
    """Measure swap and prefill on this machine, fit the cost models, write the profile.

    A profile whose swap or recompute fit misses the quality bar is written beside the path, as
    <name>.rejected.json, and the command exits 1 (unless --force)."""
    from kvbench.calibration.pipeline import (
        calibrate,
        calibration_dtype,
        calibration_model,
        calibration_summary,
        check_inputs,
        default_profile_path,
        plan_calibration,
        rejected_path,
    )

    dev = resolve_device(device)
    spec = calibration_model(dev, model, config_json, dtype)
    path = check_inputs(spec, out_path or default_profile_path(dev, spec))  # before any probe
    spec, choice = calibration_dtype(spec, dev, explicit=dtype is not None)
    memory_plan, time_plan = plan_calibration(spec, dev, block_size, quick)  # seconds of probes
    if choice is not None:  # said once the plans stand: a refusal above is its one line
        err.print(f"dtype: {choice.line()}")
        if choice.warning:
            err.print(f"warning: {choice.warning}")
    for note in memory_plan.notes:
        err.print(f"note: memory: {note}")
    for line in time_plan.lines():
        err.print(f"plan: {line}")
    err.print(f"plan: memory: {memory_plan.line()}")
    try:
        with Reporter(err, "calibrate", "points") as progress:
            run = calibrate(spec, dev, block_size=block_size, quick=quick,
                            on_point=progress.on_point, memory_plan=memory_plan,
                            time_plan=time_plan, dtype_choice=choice)
    except KeyboardInterrupt:
        err.print(f"interrupted: nothing written; {path} is as it was")
        raise typer.Exit(130) from None
    target = path if run.passed or force else rejected_path(path)
    try:
        paths = run.write(target)
    except KeyboardInterrupt:
        err.print(f"interrupted while writing: {target} and its samples are a matching pair, "
                  "the earlier or the new one")
        raise typer.Exit(130) from None
    for warning in run.warnings + (run.failures if force else []):
        err.print(f"warning: {warning}")
    if as_json:
        print(run.profile.to_json())
    else:
        echo(calibration_summary(run.profile, paths))
    if target != path:
        err.print(f"error: the profile missed its quality bar ({'; '.join(run.failures)}): "
                  f"written to {target}, {path} is as it was; calibrate again on a quiet "
                  "machine, or pass --force to accept it")
        raise typer.Exit(1)


@app.command("validate")
def validate_cmd(
    profile: Path = typer.Option(..., help="Measured profile to check."),
    device: str = typer.Option("auto", help="auto, cuda or cpu: must be the profile's."),
    count: int = typer.Option(6, min=2, help="How many fresh token counts to measure."),
    force: bool = typer.Option(False, help="Validate on another device anyway."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Measure fresh swap and recompute points; report decision agreement and errors."""
    from kvbench.calibration.validate import validate

    prof, dev = load(profile), resolve_device(device)
    with Reporter(err, "validate", "points") as progress:
        report = validate(prof, dev, count=count, force=force, on_point=progress.on_point)
    if warning := fingerprint_mismatch(prof.environment, dev):
        err.print(f"warning: {warning}")
    if as_json:  # with the command, so a saved report says how it was made
        print(json.dumps({**report.to_dict(), "command": shlex.join(["kvbench", *sys.argv[1:]])}))
        return
    out.print(report.table(f"validate {profile} on {dev}"))
    out.print(report.summary_line())


@app.command("report")
def report_cmd(results: Path = typer.Option(Path("results"), help="Results folder."),
               readme: Path = typer.Option(Path("README.md"), help="README whose `<!-- report: "
                                           "... -->` blocks are rewritten, with those of the "
                                           "docs/*.md pages beside it (skipped if absent)."),
               ) -> None:
    """Regenerate results/README.md and the result blocks of README.md and docs/*.md."""
    from kvbench.report import result_pages, update_readme, write_report

    if not results.is_dir():
        raise KvbenchError(f"no results folder at {results}: run it from the project root or "
                         "give --results")
    out.print(f"wrote {write_report(results)}")
    for page in result_pages(readme):
        out.print(f"wrote {update_readme(page, readme.parent)}")


@app.command("machine")
def machine_cmd(
    device: str = typer.Option("auto", help="auto, cuda or cpu."),
    slug: bool = typer.Option(False, "--slug", help="Print only the file-name-safe name."),
) -> None:
    """Print this machine's fingerprint (device, CPU family/model/stepping and ISA, driver,
    versions, commit) as JSON."""
    dev = resolve_device(device)
    print(device_slug(dev) if slug else json.dumps(fingerprint(dev), indent=2))


# ---------------------------------------------------------------------------------------------
# Beyond one machine (kvbench[ray]): kvbench.fleet and kvbench.sim.sweep

fleet_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Calibrate every device type of a Ray cluster.")
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("calibrate")
def fleet_calibrate_cmd(
    address: str = typer.Option("local", help=f"Ray cluster: {RAY_ADDRESS_HELP}"),
    device: str = typer.Option("cuda", help="cuda (every node with a GPU) or cpu (every node)."),
    models: Optional[list[str]] = typer.Option(None, "--model", help="Model preset; repeat for "
                                               "several (default: llama-3-8b on CUDA, "
                                               "qwen2.5-0.5b on CPU)."),
    block_size: int = typer.Option(16, min=1, help="KV block size in tokens."),
    dtype: Optional[str] = typer.Option(None, help="dtype (default: the model's)."),
    quick: bool = typer.Option(False, help="Fewer, smaller sizes (CPU: under a minute)."),
    out_dir: Path = typer.Option(Path("results/profiles"), "--out-dir", help="Where "
                                 "<device>-<model>.json, .samples.json and .png go."),
    force: bool = typer.Option(False, help="Measure again where a profile is current."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcomes as JSON."),
) -> None:
    """Calibrate each model on each device type of a Ray cluster; gather the profiles here."""
    from kvbench.calibration.pipeline import DEFAULT_MODEL
    from kvbench.fleet import calibrate_fleet, results_table
    from kvbench.models import get_model

    specs = [get_model(m, dtype=dtype) for m in models or [DEFAULT_MODEL.get(device, "")]]
    results = calibrate_fleet(specs, device, address, block_size, quick, out_dir, force,
                              explicit_dtype=dtype is not None,
                              on_event=lambda event: err.print(event.line()))
    if as_json:
        print(json.dumps([r.to_dict() for r in results]))
    else:
        out.print(results_table(results, f"fleet calibrate ({device})"))
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        err.print(f"failed: {r.device_slug} {r.model}: {'; '.join(r.errors)}")
    if failed:
        raise typer.Exit(1)


@app.command("doctor")
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
    from kvbench.calibration.pipeline import DEFAULT_MODEL
    from kvbench.models import get_model

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
    """Console entry: usage mistakes print one line too (exit 2), not a usage box."""
    try:
        code = app(prog_name="kvbench", standalone_mode=False)
    except TyperException as exc:  # click's errors, raised while parsing the command line
        message = exc.format_message()
        if type(exc).__name__ == "NoArgsIsHelpError":  # a group run bare: its help, once
            print(message)
        elif message:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx else ""
            err.print(f"error: {message}{hint}")
        sys.exit(exc.exit_code)
    except typer.Abort:  # end of input at a prompt
        err.print("error: aborted")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
