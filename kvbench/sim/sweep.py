"""Sweeps: policies x workloads x rate scales x cache sizes x seeds, one simulation per cell.

A spec (TOML, or YAML with PyYAML) names the axes and the settings every cell shares:

    policies = ["fcfs/lifo/recompute/oracle", "future-kv/lifo/recompute/history"]
    traces = ["azure_llm_2023_conv.csv"]           # CSV paths, relative to the spec's folder
    synthetic = ["requests=400,rate=20,long-output=0.3"]   # `--synthetic` mixes
    rate_scales = [1.0, 2.0]
    gpu_blocks = [1000, 2000]                      # omit: sized from the GPU's memory
    seeds = [0, 1]
    model = "llama-2-7b"                           # analytic costs; or profile = "x.json"

A cell is exactly `kvbench simulate --trace T (or --synthetic S) --rate-scale R --gpu-blocks G
--seed N` under one policy, with the spec's shared settings. Cells run in this process
(`jobs=1`), in `jobs` processes, or as one Ray task each (`ray_address`), and finish in any
order. This process writes each finished cell at once, atomically, to `<out>/cells/<key>.json`
(workers write nothing, so a cluster needs no shared file system). The key hashes everything
the result depends on: the cell, the shared settings, the trace and profile file contents and
the kvbench version. Running the same spec into the same folder again skips every cell whose
file is there, so an interrupted sweep, or one whose workers died, resumes where it stopped.
`sweep.json`, `sweep.csv` (a row per finished cell, in plan order) and `sweep.png` are
rewritten as cells finish (see `_Outputs`) and when the sweep ends.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import socket
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar

import numpy as np
from matplotlib.figure import Figure
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)
from rich.table import Table

from kvbench import __version__
from kvbench.hardware import get_hardware
from kvbench.io import write_atomic
from kvbench.models import get_model
from kvbench.profile import load
from kvbench.sim.config import SimConfig, SimCosts
from kvbench.sim.metrics import csv_text, scalar_columns, summarize
from kvbench.sim.study import STUDY_POLICIES, parse_policy, run_one
from kvbench.sim.workloads import Workload, load_workload, parse_synthetic_spec

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SWEEP_JSON, SWEEP_CSV, SWEEP_PNG, CELLS_DIR = "sweep.json", "sweep.csv", "sweep.png", "cells"
SYNTHETIC = "synthetic:"  # prefix of a synthetic mix among the cells' workload sources
PLOT_METRICS = (("preemptions", "preemptions"), ("recompute_fraction", "recompute fraction"),
                ("throughput_tokens_per_s", "throughput (tokens/s)"),
                ("ttft_p99_s", "TTFT p99 (s)"))
TABLE_METRICS = ("preemptions", "recompute_fraction", "throughput_tokens_per_s", "ttft_p99_s",
                 "e2e_p99_s")


class SweepError(ValueError):
    """A spec that cannot be run; the message names the file and the field."""


def _distinct(values: list) -> list:
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise ValueError(f"{repeated[0]!r} appears twice")
    return values


def _policy(text: str) -> str:
    parse_policy(text)
    return text


def _synthetic(text: str) -> str:
    parse_synthetic_spec(text)
    return text


T = TypeVar("T")
Axis = Annotated[list[T], AfterValidator(_distinct)]  # an axis of the sweep: distinct values


class SweepSpec(BaseModel):
    """The axes (lists) and the settings every cell shares; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policies: Axis[Annotated[str, AfterValidator(_policy)]] = Field(
        default=list(STUDY_POLICIES), min_length=1)
    traces: Axis[Path] = []
    synthetic: Axis[Annotated[str, AfterValidator(_synthetic)]] = []
    rate_scales: Axis[PositiveFloat] = Field(default=[1.0], min_length=1)
    gpu_blocks: Axis[PositiveInt] = []  # empty: sized from gpu_memory_gib
    seeds: Axis[NonNegativeInt] = Field(default=[0], min_length=1)
    num_requests: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    profile: Path | None = None
    model: str | None = None
    hardware: str = "h100-sxm"
    gpu_memory_gib: PositiveFloat | None = None
    cpu_swap_gib: NonNegativeFloat = 4.0

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if not self.traces and not self.synthetic:
            raise ValueError("give at least one workload: traces = [CSV paths] or synthetic = "
                             "[mixes such as 'requests=400,rate=20']")
        if self.profile is not None and self.model is not None:
            raise ValueError("give either profile or model, not both: a profile names its model")
        if self.model is not None:
            get_model(self.model)
        get_hardware(self.hardware)
        return self


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a TOML (.toml) or YAML (.yaml, .yml) spec; paths in it are relative to
    its folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SweepError(f"cannot read sweep spec {path}: {exc.strerror or exc}") from None
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SweepError(f"{path}: not valid TOML ({exc})") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SweepError(f"{path}: YAML specs need PyYAML (pip install 'kvbench[ray]'), "
                             "or write the spec in TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SweepError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    else:
        raise SweepError(f"{path}: a sweep spec is a .toml, .yaml or .yml file")
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a table of settings, got {type(data).__name__}")
    base = path.parent
    for key in ("traces", "profile"):
        value = data.get(key)
        if isinstance(value, str):
            data[key] = str(base / value)
        elif isinstance(value, list):
            data[key] = [str(base / v) if isinstance(v, str) else v for v in value]
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise SweepError(f"{path}: {problems}") from None


# ---------------------------------------------------------------------------------------------
# The simulator, called in one place (the entry points of kvbench.sim)

def shared_inputs(spec: SweepSpec) -> tuple[SimConfig, SimCosts]:
    """The configuration every cell starts from, and the costs: the spec's profile, or analytic
    costs of the spec's model on its hardware."""
    costs = (SimCosts.from_profile(load(spec.profile), spec.hardware)
             if spec.profile is not None
             else SimCosts.analytic(spec.model or SimConfig.model, spec.hardware))
    return SimConfig(model=costs.model.name, hardware=spec.hardware,
                     block_size=costs.costs.block_size, gpu_memory_gib=spec.gpu_memory_gib,
                     cpu_swap_gib=spec.cpu_swap_gib), costs


def simulate_cell(workload: Workload, config: SimConfig, costs: SimCosts) -> dict:
    """One simulation's summary (`kvbench.sim.metrics.summarize`)."""
    return summarize(run_one(workload, config, costs))


def run_cell(workload: Workload, config: SimConfig, costs: SimCosts) -> dict:
    """What a worker sends back: the summary, its compute time and where it ran."""
    start = time.perf_counter()
    summary = simulate_cell(workload, config, costs)
    return {"summary": summary, "wall_s": time.perf_counter() - start,
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


# ---------------------------------------------------------------------------------------------
# The plan: cells, their keys, their workloads

@dataclass(frozen=True)
class Cell:
    source: str  # a trace path, or SYNTHETIC + a mix
    rate_scale: float
    gpu_blocks: int | None
    seed: int
    policy: str

    def workload(self, spec: SweepSpec) -> Workload:
        synthetic = self.source.startswith(SYNTHETIC)
        return load_workload(None if synthetic else self.source,
                             self.source.removeprefix(SYNTHETIC) if synthetic else None,
                             self.rate_scale, spec.num_requests, spec.max_tokens, self.seed)

    def workload_key(self) -> tuple:
        """Cells with equal keys replay the same workload (a trace ignores the seed)."""
        return (self.source, self.rate_scale,
                self.seed if self.source.startswith(SYNTHETIC) else None)

    def label(self) -> str:
        blocks = "memory-sized cache" if self.gpu_blocks is None else f"{self.gpu_blocks} blocks"
        return (f"{self.policy} on {source_label(self.source)} (rate x{self.rate_scale:g}, "
                f"{blocks}, seed {self.seed})")

    def config(self, base: SimConfig) -> SimConfig:
        return dataclasses.replace(parse_policy(self.policy, base), gpu_blocks=self.gpu_blocks,
                                   seed=self.seed)


@dataclass(frozen=True)
class Plan:
    spec: SweepSpec
    cells: list[Cell]
    keys: list[str]
    identities: list[dict]  # what each key hashes; stored in the cell's file


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise SweepError(f"cannot read {path}: {exc.strerror or exc}") from None


def plan_sweep(spec: SweepSpec) -> Plan:
    """Every cell, workload-major and policy-minor, with its key."""
    sources = [str(t) for t in spec.traces] + [SYNTHETIC + s for s in spec.synthetic]
    digests = {str(t): _sha256(t) for t in spec.traces}
    shared = {k: v for k, v in spec.model_dump(mode="json").items()
              if k in ("num_requests", "max_tokens", "model", "hardware", "gpu_memory_gib",
                       "cpu_swap_gib")}
    shared["profile_sha256"] = _sha256(spec.profile) if spec.profile is not None else None
    shared["kvbench"] = __version__
    cells, keys, identities = [], [], []
    for source, rate, blocks, seed, policy in itertools.product(
            sources, spec.rate_scales, spec.gpu_blocks or [None], spec.seeds, spec.policies):
        cell = Cell(source, rate, blocks, seed, policy)
        identity = {**dataclasses.asdict(cell), "source_sha256": digests.get(source), **shared}
        text = json.dumps(identity, sort_keys=True)
        cells.append(cell)
        keys.append(hashlib.sha256(text.encode()).hexdigest()[:20])
        identities.append(identity)
    return Plan(spec, cells, keys, identities)


def finished_cells(out_dir: Path, plan: Plan) -> dict[str, dict]:
    """The plan's cells already written to `out_dir/cells` (an unreadable file is run again)."""
    records = {}
    for key in plan.keys:
        try:
            records[key] = json.loads((out_dir / CELLS_DIR / f"{key}.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return records


# ---------------------------------------------------------------------------------------------
# Runners: yield (key, record, None) or (key, None, why it failed) as cells finish

Task = tuple[str, Workload, SimConfig]


def _run_local(tasks: list[Task], costs: SimCosts, jobs: int) -> Iterator[tuple]:
    if jobs <= 1 or len(tasks) <= 1:
        for key, workload, config in tasks:
            yield key, run_cell(workload, config, costs), None
        return
    with ProcessPoolExecutor(min(jobs, len(tasks))) as pool:
        futures = {pool.submit(run_cell, w, c, costs): key for key, w, c in tasks}
        for future in as_completed(futures):
            try:
                yield futures[future], future.result(), None
            except BrokenProcessPool:
                yield futures[future], None, "a worker process died"


def _run_ray(tasks: list[Task], costs: SimCosts, address: str,
             retries: int) -> Iterator[tuple]:
    from kvbench.cluster import connect

    if not tasks:
        return
    with connect(address) as ray:
        remote = ray.remote(run_cell).options(num_cpus=1, max_retries=retries)
        costs_ref = ray.put(costs)
        workload_refs = {}  # each workload is sent to the object store once
        pending = {}
        for key, workload, config in tasks:
            if id(workload) not in workload_refs:
                workload_refs[id(workload)] = ray.put(workload)
            pending[remote.remote(workload_refs[id(workload)], config, costs_ref)] = key
        try:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                key = pending.pop(ref)
                try:
                    yield key, ray.get(ref), None
                except ray.exceptions.RayTaskError as exc:  # the simulation itself raised
                    raise exc.cause from exc
                except ray.exceptions.RayError as exc:  # a worker or node died
                    yield key, None, str(exc).strip().splitlines()[0]
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


# ---------------------------------------------------------------------------------------------
# The sweep

@dataclass
class SweepOutcome:
    rows: list[dict]  # finished cells in plan order
    failures: list[dict]  # {"cell", "key", "error"} of the cells that failed in this run
    total: int
    ran: int  # cells simulated in this run
    skipped: int  # cells found finished in out_dir
    wall_s: float

    def lines(self, out_dir: Path) -> list[str]:
        return [f"cells: {self.total} ({self.ran} run now, {self.skipped} already in "
                f"{out_dir}/{CELLS_DIR}, {len(self.failures)} failed) in {self.wall_s:.1f} s",
                f"wrote: {out_dir}/{SWEEP_JSON}, {SWEEP_CSV}, {SWEEP_PNG}, {CELLS_DIR}/"]


def sweep_rows(plan: Plan, records: dict[str, dict]) -> list[dict]:
    return [{"cell_key": key, "source": cell.source, "rate_scale": cell.rate_scale,
             "seed": cell.seed, **records[key]["summary"]}
            for cell, key in zip(plan.cells, plan.keys) if key in records]


def write_tables(out_dir: Path, plan: Plan, rows: list[dict], failures: list[dict]) -> list[Path]:
    """sweep.json (spec, progress, failures, rows) and sweep.csv."""
    document = {"spec": plan.spec.model_dump(mode="json"), "cells_total": len(plan.cells),
                "cells_done": len(rows), "failures": failures, "rows": rows}
    paths = [write_atomic(out_dir / SWEEP_JSON, json.dumps(document, indent=1) + "\n")]
    if rows:
        paths.append(write_atomic(out_dir / SWEEP_CSV, csv_text(scalar_columns(rows))))
    return paths


class _Outputs:
    """Rewrites the tables at most every `refresh_s` seconds, and the figure (slower: seconds
    for a few dozen panels) once ten times its last drawing time has passed, so drawing takes
    at most a tenth of this process's time; both when the sweep ends."""

    def __init__(self, out_dir: Path, plan: Plan, refresh_s: float):
        self.out_dir, self.plan, self.refresh_s = out_dir, plan, refresh_s
        self.tables_at = self.plot_at = time.perf_counter()
        self.plot_s = 0.0

    def update(self, records: dict[str, dict], failures: list[dict], final: bool = False) -> None:
        now = time.perf_counter()
        tables = final or now - self.tables_at >= self.refresh_s
        plot = final or now - self.plot_at >= max(self.refresh_s, 10 * self.plot_s)
        if not (tables or plot):
            return
        rows = sweep_rows(self.plan, records)
        if tables:
            write_tables(self.out_dir, self.plan, rows, failures)
            self.tables_at = now
        if plot and rows:
            plot_sweep(rows, self.out_dir / SWEEP_PNG)
            self.plot_at = time.perf_counter()
            self.plot_s = self.plot_at - now


def run_sweep(spec: SweepSpec, out_dir: str | Path, jobs: int = 1, ray_address: str | None = None,
              retries: int = 1, refresh_s: float = 2.0,
              on_cell: Callable[[int, int, Cell, str | None], None] | None = None,
              ) -> SweepOutcome:
    """Run the cells of `spec` not yet in `out_dir`; see the module docstring.

    `ray_address` (see `kvbench.cluster`) runs one Ray task per cell, retried `retries` times
    if its worker dies; else `jobs` local processes. `on_cell(done, total, cell, error)` is
    called as each cell finishes (`done` counts the skipped ones too)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    plan = plan_sweep(spec)
    records = finished_cells(out_dir, plan)
    skipped = len(records)
    base, costs = shared_inputs(spec)
    by_key = dict(zip(plan.keys, zip(plan.cells, plan.identities)))
    workloads: dict[tuple, Workload] = {}
    tasks = []
    for cell, key in zip(plan.cells, plan.keys):
        if key not in records:
            if cell.workload_key() not in workloads:
                workloads[cell.workload_key()] = cell.workload(spec)
            tasks.append((key, workloads[cell.workload_key()], cell.config(base)))
    failures: list[dict] = []
    outputs = _Outputs(out_dir, plan, refresh_s)
    runner = (_run_ray(tasks, costs, ray_address, retries) if ray_address is not None
              else _run_local(tasks, costs, jobs))
    try:
        with closing(runner):
            for key, record, error in runner:
                cell, identity = by_key[key]
                if error is None:
                    text = json.dumps({"cell": identity, **record})
                    write_atomic(out_dir / CELLS_DIR / f"{key}.json", text + "\n")
                    records[key] = json.loads(text)  # as a resumed sweep reads it back
                else:
                    failures.append({"cell": identity, "key": key, "error": error})
                if on_cell:
                    on_cell(len(records) + len(failures), len(plan.cells), cell, error)
                outputs.update(records, failures)
    finally:
        outputs.update(records, failures, final=True)
    rows = sweep_rows(plan, records)
    return SweepOutcome(rows, failures, len(plan.cells), len(records) - skipped,
                        skipped, time.perf_counter() - start)


def policy_means(rows: list[dict]) -> list[dict]:
    """Per policy (in first-seen order): the number of cells and the mean of `TABLE_METRICS`
    over them (None where no cell has the value)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["policy"]].append(row)
    table = []
    for policy, group in groups.items():
        means = {}
        for metric in TABLE_METRICS:
            values = np.array([r[metric] for r in group if r[metric] is not None], dtype=float)
            means[metric] = float(values.mean()) if values.size else None
        table.append({"policy": policy, "cells": len(group), **means})
    return table


def policy_table(rows: list[dict], title: str) -> Table:
    """`policy_means` as a table."""
    means = policy_means(rows)
    headers = {"policy": "policy", "cells": "cells", "preemptions": "preempt",
               "recompute_fraction": "recomp frac", "throughput_tokens_per_s": "tok/s",
               "ttft_p99_s": "TTFT99 s", "e2e_p99_s": "E2E99 s"}
    table = Table(title=title)
    for col, header in headers.items():
        table.add_column(header, justify="left" if col == "policy" else "right")
    for row in means:
        table.add_row(*("n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
                        for v in row.values()))
    return table


def source_label(source: str) -> str:
    """A trace's file name, or the synthetic mix."""
    return source if source.startswith(SYNTHETIC) else Path(source).name


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
            for row, (metric, label) in enumerate(PLOT_METRICS):
                means = [np.mean([r[metric] for r in values[(source, blocks, policy, s)]
                                  if r[metric] is not None] or [np.nan]) for s in scales]
                axes[row, col].plot(scales, means, marker="o", ms=3, label=policy)
                axes[row, col].set_ylabel(label if col == 0 else "")
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


def scale_markdown(report: dict) -> str:
    """A sweep-scale benchmark report (benchmarks/bench_sweep_scale.py) as a Markdown table:
    the same sweep with --jobs 1, --jobs 2 and on Ray (README's Fleet section)."""
    env = report["environment"]
    lines = [f"{report['cells']} cells on {env['device_name']}, Ray {report['ray']}, kvbench "
             f"{env['kvbench']} ({env['commit']})", "",
             "| mode | wall s | speed-up | simulating s | overhead ms/cell | load avg |",
             "|---|---|---|---|---|---|"]
    for m in report["modes"]:
        lines.append(f"| {m['mode']} | {m['wall_s']:.2f} | {m['speedup']:.2f}x | "
                     f"{m['compute_s']:.2f} | {m['overhead_per_cell_ms']:.0f} | "
                     f"{m['load_average_1min_before']:.1f} |")
    ray = report["modes"][-1]
    lines += ["", f"Ray alone: start {ray['start_s']:.1f} s, an empty task "
                  f"{ray['empty_task_ms']:.2f} ms at full throughput, "
                  f"{ray['empty_round_trip_ms']:.2f} ms one at a time (median)."]
    return "\n".join(lines)
