"""A sweep's files: a file per finished cell in `cells/`, and `sweep.json`, `sweep.csv`,
`sweep.png` over the finished cells; the console tables (one per load level)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.table import Table

from kvbench.io import write_atomic
from kvbench.sim.metrics import METRICS, csv_text, scalar_columns
from kvbench.sim.sweep.plan import Plan
from kvbench.sim.sweep.plot import plot_sweep

SWEEP_JSON, SWEEP_CSV, SWEEP_PNG, CELLS_DIR = "sweep.json", "sweep.csv", "sweep.png", "cells"
TABLE_METRICS = ("preemptions", "recompute_fraction", "throughput_tokens_per_s", "ttft_p99_s",
                 "e2e_p99_s")


def finished_cells(out_dir: Path, plan: Plan) -> dict[str, dict]:
    """The plan's cells already written to `out_dir/cells` (an unreadable file is run again)."""
    records = {}
    for key in plan.keys:
        try:
            records[key] = json.loads((out_dir / CELLS_DIR / f"{key}.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return records


def write_cell(out_dir: Path, key: str, identity: dict, commit: str | None,
               record: dict) -> dict:
    """`cells/<key>.json`: what the key hashes, the commit, and a worker's record; returned as
    a resumed sweep reads it back."""
    text = json.dumps({"cell": identity, "commit": commit, **record})
    write_atomic(out_dir / CELLS_DIR / f"{key}.json", text + "\n")
    return json.loads(text)


def sweep_rows(plan: Plan, records: dict[str, dict]) -> list[dict]:
    return [{"cell_key": key, "source": cell.source, "rate_scale": cell.rate_scale,
             "seed": cell.seed, **records[key]["summary"]}
            for cell, key in zip(plan.cells, plan.keys) if key in records]


def write_tables(out_dir: Path, plan: Plan, rows: list[dict], failures: list[dict],
                 provenance: dict | None = None) -> list[Path]:
    """sweep.json (spec, provenance, progress, failures, rows) and sweep.csv."""
    document = {"spec": plan.spec.model_dump(mode="json"), "provenance": provenance,
                "cells_total": len(plan.cells), "cells_done": len(rows), "failures": failures,
                "rows": rows}
    paths = [write_atomic(out_dir / SWEEP_JSON, json.dumps(document, indent=1) + "\n")]
    if rows:
        paths.append(write_atomic(out_dir / SWEEP_CSV, csv_text(scalar_columns(rows))))
    return paths


class Outputs:
    """Rewrites the tables at most every `refresh_s` seconds, and the figure (slower: seconds
    for a few dozen panels) once ten times its last drawing time has passed, so drawing takes
    at most a tenth of this process's time; both when the sweep ends."""

    def __init__(self, out_dir: Path, plan: Plan, refresh_s: float,
                 provenance: dict | None = None):
        self.out_dir, self.plan, self.refresh_s = out_dir, plan, refresh_s
        self.provenance = provenance
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
            write_tables(self.out_dir, self.plan, rows, failures, self.provenance)
            self.tables_at = now
        if plot and rows:
            plot_sweep(rows, self.out_dir / SWEEP_PNG)
            self.plot_at = time.perf_counter()
            self.plot_s = self.plot_at - now


def policy_means(rows: list[dict]) -> list[dict]:
    """Per load level (rate scale, ascending) and policy (in first-seen order): the number of
    cells and the mean of `TABLE_METRICS` over them (seeds, cache sizes, workloads; None where
    no cell has the value)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    policies = list(dict.fromkeys(row["policy"] for row in rows))
    for row in rows:
        groups[row["rate_scale"], row["policy"]].append(row)
    table = []
    for rate_scale, policy in sorted(groups, key=lambda k: (k[0], policies.index(k[1]))):
        group = groups[rate_scale, policy]
        means = {}
        for metric in TABLE_METRICS:
            values = np.array([r[metric] for r in group if r[metric] is not None], dtype=float)
            means[metric] = float(values.mean()) if values.size else None
        table.append({"rate_scale": rate_scale, "policy": policy, "cells": len(group), **means})
    return table


def policy_tables(rows: list[dict], title: str) -> list[Table]:
    """`policy_means` as a table per load level (as `kvbench report` renders sweep.csv)."""
    headers = ("policy", "cells", *TABLE_METRICS)
    by_scale: dict[float, list[dict]] = defaultdict(list)
    for row in policy_means(rows):
        by_scale[row["rate_scale"]].append(row)
    tables = []
    for scale, means in by_scale.items():
        table = Table(title=f"{title} at rate x{scale:g}")
        for col in headers:
            table.add_column(METRICS[col].label, justify="left" if col == "policy" else "right")
        for row in means:
            table.add_row(*("n/a" if (v := row[col]) is None else f"{v:.4g}"
                            if isinstance(v, float) else str(v) for col in headers))
        tables.append(table)
    return tables
