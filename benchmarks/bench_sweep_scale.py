"""Sweep scaling: the same 24-cell sweep (2 policies x 2 rate scales x 3 cache sizes x 2 seeds
of a 200-request synthetic mix) in one process (`--jobs 1`), in two processes (`--jobs 2`) and
as Ray tasks on a local Ray instance with 2 CPUs. Every mode must give the numbers of `--jobs 1`.

    wall_s               time.perf_counter around `run_sweep`, from planning to the last file
                         (for Ray, with the instance already started: `start_s` is beside it)
    compute_s            sum over cells of the simulation's own time, measured in the worker
    speedup              wall_s of --jobs 1 / wall_s of the mode (ceiling: slots, 2 here)
    overhead_per_cell_ms (wall_s x slots - compute_s) / cells: slot time not spent simulating
                         (dispatch, transfer, writing cell files, idle slots at the tail)
    empty_task_ms        Ray alone: 200 empty tasks on 2 CPUs, wall / 200 (throughput)
    empty_round_trip_ms  Ray alone: median of 20 one-at-a-time `ray.get(f.remote())`

`python benchmarks/bench_sweep_scale.py` writes results/fleet/<machine>-sweep-scale.json, and
with `--markdown JSON` prints a committed one as the table README shows; pytest runs it once as
a benchmark (its figures in extra_info).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kvbench.cluster import import_ray
from kvbench.hardware import device_slug, fingerprint
from kvbench.io import write_atomic
from kvbench.report import scale_markdown
from kvbench.sim.sweep import CELLS_DIR, SweepSpec, run_sweep

SPEC = SweepSpec(
    policies=["fcfs/lifo/recompute/oracle", "future-kv/cost-aware/selector/history"],
    synthetic=["requests=200,rate=10,long-prompt=0.3,long-output=0.3,short-output-tokens=64,"
               "long-output-tokens=256,max-tokens=512"],
    rate_scales=[1.0, 2.0], num_gpu_blocks=[250, 400, 600], seeds=[0, 1])
NUM_CPUS = 2
EMPTY_TASKS, ROUND_TRIPS = 200, 20


def _mode(name: str, slots: int, out_dir: Path, **where) -> tuple[dict, list[dict]]:
    load_before = os.getloadavg()[0]
    outcome = run_sweep(SPEC, out_dir, **where)
    assert outcome.failures == [] and outcome.ran == outcome.total == 24
    compute_s = sum(json.loads(p.read_text())["wall_s"]
                    for p in (out_dir / CELLS_DIR).glob("*.json"))
    return {"mode": name, "slots": slots, "wall_s": outcome.wall_s, "compute_s": compute_s,
            "overhead_per_cell_ms": 1e3 * (outcome.wall_s * slots - compute_s) / outcome.total,
            "load_average_1min_before": load_before,
            "load_average_1min_after": os.getloadavg()[0]}, outcome.rows


def _ray_alone(ray) -> dict:
    @ray.remote(num_cpus=1)
    def empty() -> None:
        return None

    ray.get([empty.remote() for _ in range(NUM_CPUS)])  # workers up
    start = time.perf_counter()
    ray.get([empty.remote() for _ in range(EMPTY_TASKS)])
    throughput_ms = 1e3 * (time.perf_counter() - start) / EMPTY_TASKS
    trips = []
    for _ in range(ROUND_TRIPS):
        start = time.perf_counter()
        ray.get(empty.remote())
        trips.append(1e3 * (time.perf_counter() - start))
    return {"empty_task_ms": throughput_ms, "empty_round_trip_ms": statistics.median(trips),
            "empty_round_trip_ms_samples": trips}


def measure(work_dir: Path) -> dict:
    """The three modes on `SPEC`, in order; raises if any differs from --jobs 1."""
    modes = []
    base, reference = _mode("jobs 1", 1, work_dir / "jobs1", jobs=1)
    modes.append(base)
    two, rows = _mode("jobs 2", 2, work_dir / "jobs2", jobs=2)
    assert rows == reference, "--jobs 2 differs from --jobs 1"
    modes.append(two)
    ray = import_ray(loopback=True)
    start = time.perf_counter()
    ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    start_s = time.perf_counter() - start
    try:
        on_ray, rows = _mode(f"ray local {NUM_CPUS} CPUs", NUM_CPUS, work_dir / "ray",
                             ray_address="local")
        assert rows == reference, "Ray differs from --jobs 1"
        modes.append({**on_ray, "start_s": start_s, **_ray_alone(ray)})
    finally:
        start = time.perf_counter()
        ray.shutdown()
        modes[-1]["shutdown_s"] = time.perf_counter() - start
    for mode in modes:
        mode["speedup"] = base["wall_s"] / mode["wall_s"]
    return {"benchmark": "sweep scale", "spec": SPEC.model_dump(mode="json"), "cells": 24,
            "environment": fingerprint("cpu"), "ray": ray.__version__, "modes": modes,
            "note": "shared 2-core machine: other jobs may have run at the same time (see the "
                    "load averages)"}


def test_sweep_scale(benchmark, tmp_path):
    pytest.importorskip("ray")
    report = benchmark.pedantic(measure, args=(tmp_path,), rounds=1, iterations=1)
    benchmark.extra_info.update({m["mode"]: {k: v for k, v in m.items() if "samples" not in k}
                                 for m in report["modes"]})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/fleet") /
                        f"{device_slug('cpu')}-sweep-scale.json")
    parser.add_argument("--markdown", type=Path, metavar="JSON",
                        help="Print a committed result as a Markdown table; measure nothing.")
    args = parser.parse_args()
    if args.markdown:
        print(scale_markdown(json.loads(args.markdown.read_text())))
        sys.exit()
    out = args.out
    with tempfile.TemporaryDirectory() as tmp:
        report = measure(Path(tmp))
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    print(scale_markdown(report))
    print(f"wrote {out}", file=sys.stderr)
