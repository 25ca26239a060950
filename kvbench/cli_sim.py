"""`kvbench simulate`, `compare-policies`, `sweep` and `replay`: the simulator's commands, their
options generated from the spec dataclasses (kvbench/cli_options.py). `kvbench.cli.app` takes
this module's `app`'s commands as its own: the same error contract (one `error:` line for a
`KvbenchError`)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from kvbench.cli_options import COSTS, KNOBS, POLICY, REPLICA, RUN, WORKLOAD, given, with_options
from kvbench.console import echo, err, out
from kvbench.errors import KvbenchError
from kvbench.io import check_out_dir
from kvbench.progress import Reporter
from kvbench.sim.engines import FIELDS as REPLICA_FIELDS
from kvbench.sim.run import CostSource

OUT_DIR = typer.Option(None, "--out", help="Folder for the result files.")
AS_JSON = typer.Option(False, "--json", help="Print the result as JSON.")
RAY_ADDRESS_HELP = ("'local' (a private Ray instance on this machine), 'auto' (the cluster "
                    "`ray start` began here) or HOST:PORT of a head node.")
app = typer.Typer(rich_markup_mode=None)  # its commands join kvbench.cli.app's (no group)


def warn(line: str) -> None:
    err.print(f"warning: {line}")


@app.command("simulate")
@with_options(WORKLOAD, COSTS, POLICY, REPLICA, KNOBS, RUN)
def simulate_cmd(out_dir: Optional[Path] = OUT_DIR, as_json: bool = AS_JSON, **options) -> None:
    """Simulate one serving replica under one scheduling policy (files: summary.json,
    summary.csv, requests.csv, timeline.csv, run.png in --out)."""
    from kvbench.sim import metrics
    from kvbench.sim.engine import simulate
    from kvbench.sim.plots import plot_run
    from kvbench.sim.run import RunSpec

    if out_dir is not None:
        check_out_dir(out_dir)
    workload, config, costs = RunSpec.from_options(**given(options)).resolve(warn=warn)
    with Reporter(err, "simulate", "requests", transient=True) as progress:
        result = simulate(workload, config, costs, progress=lambda done: progress.count(
            config.policy_name, done, workload.num_requests))
    summary = metrics.summarize(result)
    if out_dir is not None:
        metrics.write_results(result, out_dir, summary)
        plot_run(result, out_dir / "run.png")
    if as_json:
        print(json.dumps(summary))
        return
    echo(metrics.summary_lines(summary) + ([f"wrote: {out_dir}/"] if out_dir else []))


@app.command("compare-policies")
@with_options(WORKLOAD, COSTS, REPLICA, KNOBS, RUN)
def compare_policies_cmd(
    policies: Optional[str] = typer.Option(None, help="Comma-separated admission/victim/"
                                           "preemption/predictor[@engine] (default: the "
                                           "study's matrix, `kvbench.sim.study`)."),
    jobs: int = typer.Option(1, min=1, help="Policies simulated in parallel processes."),
    out_dir: Path = typer.Option(Path("sim-compare"), "--out", help="Where compare.json, "
                                 "compare.csv and compare.png go."),
    as_json: bool = AS_JSON, **options) -> None:
    """Run a matrix of policies on one workload (default: the bundled Azure 2023 trace at
    2x)."""
    from kvbench.sim.metrics import summarize
    from kvbench.sim.run import RunSpec
    from kvbench.sim.study import (
        compare_policies,
        comparison_rows,
        comparison_table,
        parse_policies,
        write_comparison,
    )

    check_out_dir(out_dir)
    workload, base, costs = RunSpec.from_options(**given(options)).resolve(True, warn)
    names = parse_policies(policies)
    with Reporter(err, "compare-policies", "policies", transient=True) as progress:
        results = compare_policies(workload, names, base, costs, jobs,
                                   progress=lambda done: progress.count("", done, len(names)))
    summaries = [summarize(r) for r in results]
    write_comparison(results, summaries, out_dir)
    if as_json:
        print(json.dumps(comparison_rows(summaries)))
        return
    out.print(comparison_table(results, summaries))
    out.print(f"wrote: {out_dir}/compare.json, compare.csv, compare.png")


@app.command("sweep")
def sweep_cmd(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="Sweep spec (TOML or YAML): "
                                     "policies x traces x rate scales x cache sizes x seeds, and "
                                     "any `simulate` option every cell shares."),
    out_dir: Path = typer.Option(..., "--out", help="Where cells/, sweep.json, sweep.csv and "
                                 "sweep.png go; run again to resume."),
    jobs: int = typer.Option(1, min=1, help="Cells simulated in parallel local processes."),
    ray_address: Optional[str] = typer.Option(None, "--ray", help="One Ray task per cell: "
                                              f"{RAY_ADDRESS_HELP}"),
    as_json: bool = AS_JSON,
) -> None:
    """Run a sweep's cells, one simulation each, resumable in --out (tables per load level;
    `kvbench report` renders sweep.csv into the docs)."""
    from kvbench.sim.sweep import (
        SweepInterrupted,
        load_spec,
        policy_means,
        policy_tables,
        run_sweep,
    )

    check_out_dir(out_dir)
    spec = load_spec(spec_path)
    try:
        with Reporter(err, "sweep", "cells", transient=True) as progress:

            def on_cell(done, total, cell, error):
                progress.count("", done, total)
                if error:
                    err.print(f"cell failed: {cell.label()}: {error}")

            outcome = run_sweep(spec, out_dir, jobs=jobs, ray_address=ray_address,
                                on_cell=on_cell, log=err.print, warn=warn)
    except SweepInterrupted as exc:
        err.print(exc.line())
        raise typer.Exit(130) from None
    if as_json:
        print(json.dumps({"cells_total": outcome.total, "ran": outcome.ran,
                          "skipped": outcome.skipped, "failures": outcome.failures,
                          "wall_s": outcome.wall_s, "policies": policy_means(outcome.rows)}))
    else:
        for table in policy_tables(outcome.rows, f"sweep {spec_path}: mean over cells"):
            out.print(table)
        out.print("\n".join(outcome.lines(out_dir)))
    if outcome.failures:
        err.print(f"error: {len(outcome.failures)} cells failed; run the same command again "
                  "to run them (finished cells are kept)")
        raise typer.Exit(1)


def _replay_mechanisms(workload, settings, out_dir: Path, profile, as_json: bool) -> None:
    from kvbench.io import write_atomic
    from kvbench.vllm.mechanisms import replay_mechanisms
    from kvbench.vllm.replay_table import mechanisms_markdown

    replica = settings.replica
    if not replica.num_cpu_blocks:
        raise KvbenchError("give --num-cpu-blocks: the host pool of the mechanisms, in blocks")
    with Reporter(err, "replay", "requests", transient=True) as progress:
        step_time, replayed, simulated = replay_mechanisms(
            workload, settings, replica.num_cpu_blocks, out_dir / "records", profile,
            replica.hardware, progress=lambda label, done: progress.count(
                label, done, workload.num_requests))
    document = {"command": shlex.join(["kvbench", *sys.argv[1:]]),
                "workload": workload.describe(), "settings": settings.document(),
                "host_blocks": replica.num_cpu_blocks, "step_time": step_time,
                "replayed": replayed, "simulated": simulated}
    write_atomic(out_dir / "mechanisms.json", json.dumps(document, indent=1) + "\n")
    markdown = "\n".join(mechanisms_markdown(document)) + "\n"
    write_atomic(out_dir / "mechanisms.md", markdown)
    if as_json:
        print(json.dumps(document))
        return
    out.print(markdown)
    out.print(f"wrote: {out_dir}/mechanisms.json, mechanisms.md, records/")


@app.command("replay")
@with_options(WORKLOAD, (CostSource, "Costs", ("model",)), REPLICA)
def replay_cmd(
    policies: Optional[str] = typer.Option(None, help="Comma-separated admission/victim/"
                                           "recompute/predictor (default: five)."),
    model: Optional[Path] = typer.Option(None, help="Folder with a config.json; dummy weights "
                                         "(default: kvbench's tiny Llama)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Default: results/replay/"
                                           "<device>-<model>."),
    mechanisms: bool = typer.Option(False, "--mechanisms", help="Instead of policies: vLLM's "
                                    "recompute, vLLM's offloading, kvbench swap and kvbench "
                                    "write-through, with a host pool of --num-cpu-blocks."),
    as_json: bool = AS_JSON, **options) -> None:
    """Replay a trace through a real vLLM engine (vLLM's scheduler, then each kvbench policy;
    engine vllm-0.32-cpu's settings unless given; --num-gpu-blocks is required)."""
    from kvbench.sim.engines import ReplicaSpec
    from kvbench.sim.run import RunSpec, WorkloadSource
    from kvbench.sim.study import parse_policies
    from kvbench.sim.workloads import AZURE_CONV_TRACE
    from kvbench.vllm import unavailable_reason

    if reason := unavailable_reason():
        raise KvbenchError(f"kvbench replay {reason}")
    from kvbench.vllm.replay import REPLAY_POLICIES, ReplayEngine, default_out_dir, replay

    run = RunSpec.from_options(**given(options))
    if run.config.replica.num_gpu_blocks is None:
        raise KvbenchError("give --num-gpu-blocks: the replayed engine's KV cache, in blocks")
    replica = ReplicaSpec.named("vllm-0.32-cpu", **{
        k: v for k, v in given(options).items() if k in REPLICA_FIELDS and k != "engine"})
    source = run.workload
    default_trace = None if source.synthetic else str(AZURE_CONV_TRACE)
    workload = WorkloadSource(source.trace or default_trace, source.synthetic,
                              source.rate_scale, source.num_requests, source.max_tokens,
                              source.seed).load(warn=warn)
    settings = ReplayEngine(replica, seed=source.seed, **({"model": model} if model else {}))
    out_dir = out_dir or default_out_dir(settings)
    if mechanisms:
        return _replay_mechanisms(workload, settings, out_dir, run.costs.profile, as_json)
    with Reporter(err, "replay", "requests", transient=True) as progress:
        result = replay(workload, settings, parse_policies(policies) if policies else
                        REPLAY_POLICIES, out_dir / "records", run.costs.profile,
                        replica.hardware, progress=lambda label, done: progress.count(
                            label, done, workload.num_requests))
    command = shlex.join(["kvbench", *sys.argv[1:]])
    result.write(out_dir, command)
    if as_json:
        print(json.dumps(result.document(command)))
        return
    for table in result.tables():
        out.print(table)
    out.print(f"wrote: {out_dir}/replay.json, replay.md, records/")
