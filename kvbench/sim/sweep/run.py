"""Running a sweep: the cells not yet in the output folder, in this process, in local
processes or as Ray tasks; each finished cell written at once by this process."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from kvbench import hardware
from kvbench.console import stderr_warning
from kvbench.sim.config import Costs, SimConfig
from kvbench.sim.metrics import summarize
from kvbench.sim.study import run_one
from kvbench.sim.sweep.outputs import (
    CELLS_DIR,
    SWEEP_CSV,
    SWEEP_JSON,
    SWEEP_PNG,
    Outputs,
    finished_cells,
    sweep_rows,
    write_cell,
)
from kvbench.sim.sweep.plan import Cell, plan_sweep
from kvbench.sim.sweep.spec import SweepSpec
from kvbench.sim.workloads import Workload

# ---------------------------------------------------------------------------------------------
# The simulator, called in one place (the entry points of kvbench.sim)


def shared_inputs(spec: SweepSpec, warn: Callable[[str], None] = lambda line: None
                  ) -> tuple[SimConfig, Costs]:
    """The configuration every cell starts from, and the costs (`RunSpec.configure`)."""
    return spec.run_spec().configure(warn)


def simulate_cell(workload: Workload, config: SimConfig, costs: Costs) -> dict:
    """One simulation's summary (`kvbench.sim.metrics.summarize`)."""
    return summarize(run_one(workload, config, costs))


def run_cell(workload: Workload, config: SimConfig, costs: Costs) -> dict:
    """What a worker sends back: the summary, its compute time and where it ran."""
    start = time.perf_counter()
    summary = simulate_cell(workload, config, costs)
    return {"summary": summary, "wall_s": time.perf_counter() - start,
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


# ---------------------------------------------------------------------------------------------
# Runners: yield (key, record, None) or (key, None, why it failed) as cells finish

Task = tuple[str, Workload, SimConfig]


def _run_local(tasks: list[Task], costs: Costs, jobs: int) -> Iterator[tuple]:
    if jobs <= 1 or len(tasks) <= 1:
        for key, workload, config in tasks:
            yield key, run_cell(workload, config, costs), None
        return
    pool = ProcessPoolExecutor(min(jobs, len(tasks)), initializer=_leave_sigint_to_the_parent)
    done = False
    try:
        futures = {pool.submit(run_cell, w, c, costs): key for key, w, c in tasks}
        for future in as_completed(futures):
            try:
                yield futures[future], future.result(), None
            except BrokenProcessPool:
                yield futures[future], None, "a worker process died"
        done = True
    finally:
        if not done:  # Ctrl-C, or the caller stopped listening: stop the running cells too
            # (through the pool's private table: terminate_workers() is Python 3.14's)
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def _leave_sigint_to_the_parent() -> None:
    """A worker ignores Ctrl-C: the parent stops it (a worker's own KeyboardInterrupt prints a
    traceback, and one between two cells can leave the pool waiting forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_ray(tasks: list[Task], costs: Costs, address: str,
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


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (or any KeyboardInterrupt) during a sweep, raised once the finished cells'
    outputs are written: still a KeyboardInterrupt, and it says how many cells are kept."""

    def __init__(self, kept: int, total: int, out_dir: Path):
        super().__init__(kept, total, out_dir)
        self.kept, self.total, self.out_dir = kept, total, out_dir

    def line(self) -> str:
        return (f"sweep interrupted: {self.kept} of {self.total} cells kept in "
                f"{self.out_dir}/{CELLS_DIR}; run the same command again to resume")


def run_sweep(spec: SweepSpec, out_dir: str | Path, jobs: int = 1, ray_address: str | None = None,
              retries: int = 1, refresh_s: float = 2.0,
              on_cell: Callable[[int, int, Cell, str | None], None] | None = None,
              log: Callable[[str], None] = lambda line: None,
              warn: Callable[[str], None] = stderr_warning) -> SweepOutcome:
    """Run the cells of `spec` not yet in `out_dir`; see `kvbench.sim.sweep`.

    `ray_address` (see `kvbench.cluster`) runs one Ray task per cell, retried `retries` times
    if its worker dies; else `jobs` local processes. `log` gets a line once the sweep is
    planned (cells reused, cells to run), `warn` the trace loaders' warnings; `on_cell(done,
    total, cell, error)` is called as each cell finishes (`done` counts the skipped ones too).
    A KeyboardInterrupt writes the finished cells' outputs and becomes `SweepInterrupted`."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    plan = plan_sweep(spec)
    records = finished_cells(out_dir, plan)
    skipped = len(records)
    log(f"sweep: {len(plan.cells)} cells, {skipped} reused from {out_dir}/{CELLS_DIR}, "
        f"{len(plan.cells) - skipped} to run")
    base, costs = shared_inputs(spec, warn)
    by_key = dict(zip(plan.keys, zip(plan.cells, plan.identities)))
    workloads: dict[tuple, Workload] = {}
    tasks = []
    for cell, key in zip(plan.cells, plan.keys):
        if key not in records:
            if cell.workload_key() not in workloads:
                workloads[cell.workload_key()] = cell.workload(spec, warn)
            tasks.append((key, workloads[cell.workload_key()], cell.config(base)))
    failures: list[dict] = []
    provenance = hardware.provenance()
    outputs = Outputs(out_dir, plan, refresh_s, provenance)
    interrupted = False
    runner = (_run_ray(tasks, costs, ray_address, retries) if ray_address is not None
              else _run_local(tasks, costs, jobs))
    try:
        with closing(runner):
            for key, record, error in runner:
                cell, identity = by_key[key]
                if error is None:
                    records[key] = write_cell(out_dir, key, identity, provenance["commit"],
                                              record)
                else:
                    failures.append({"cell": identity, "key": key, "error": error})
                if on_cell:
                    on_cell(len(records) + len(failures), len(plan.cells), cell, error)
                outputs.update(records, failures)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        outputs.update(records, failures, final=True)
    if interrupted:
        raise SweepInterrupted(len(records), len(plan.cells), out_dir)
    rows = sweep_rows(plan, records)
    return SweepOutcome(rows, failures, len(plan.cells), len(records) - skipped,
                        skipped, time.perf_counter() - start)
