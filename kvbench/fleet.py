"""`kvbench fleet calibrate`: one measured profile per device type and model, on a Ray cluster.

Every node that qualifies (`cuda`: it has a GPU; `cpu`: it has a CPU) answers a small task
pinned to it with its fingerprint (`kvbench.hardware.fingerprint`); nodes with the same device
slug are one device type. For each device type and model, the `kvbench calibrate` pipeline runs
as one task pinned to a node of that type, holding one GPU (cuda) or all of the node's CPUs
(cpu: nothing else scheduled by Ray runs beside the measurement); a type's models are spread
over its nodes. The caller writes each profile to `<out_dir>/<device slug>-<model>.json`, with
the samples and the plot beside it, as `kvbench calibrate` does; the fingerprint inside is the
node's. Progress comes back as events per node, model and phase: one as the phase begins, then
one at most every `PLAIN_INTERVAL_S` with its latest figure.

A calibration that fails, or whose node disappears, is reported and retried once on another
live node of the same type; the other profiles are kept. A profile is current, and skipped
unless `force`, when it was measured for the same model, block size and mode (quick or full)
in the same environment: the same fingerprint (device, driver, CUDA, torch, triton, Python,
kvbench version) apart from the git commit. A profile whose swap is a version 1 round trip
split evenly (`kvbench.profile.upgrade_v1`), not swap-out and swap-in fitted apart, is never
current.

The CUDA path has not yet run on a GPU (none lent so far); the CPU path is tested on a local
Ray cluster.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from kvbench.calibration.pipeline import (
    CalibrationRun,
    calibrate,
    calibration_dtype,
    plan_calibration,
)
from kvbench.calibration.plans import CalibrationPlan
from kvbench.cluster import LOCAL, ClusterError, connect
from kvbench.errors import KvbenchError
from kvbench.hardware import fingerprint, fingerprint_slug, slugify
from kvbench.models import ModelSpec
from kvbench.profile import V1_SPLIT, ModelInfo, ProfileError, load
from kvbench.progress import PLAIN_INTERVAL_S

PROBE_TIMEOUT_S = 120.0  # a node whose fingerprint takes longer (GPU busy, node lost) is left out
POLL_S = 0.5  # how often progress is collected while calibrations run


@dataclass(frozen=True)
class FleetEvent:
    node: str
    model: str
    phase: str  # probe, current, start, a calibration phase (swap, prefill, decode), done, failed
    text: str

    def line(self) -> str:
        return f"{self.node:24} {self.model:16} {self.phase:8} {self.text}"


@dataclass(frozen=True)
class FleetNode:
    node_id: str
    address: str
    num_cpus: int
    environment: dict  # the node's fingerprint

    @property
    def slug(self) -> str:
        return fingerprint_slug(self.environment)

    @property
    def label(self) -> str:
        return f"{self.address}/{self.node_id[:6]}"


@dataclass
class FleetResult:
    device_slug: str
    model: str
    status: str  # calibrated, current or failed
    path: Path
    node: str | None = None
    seconds: float | None = None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "path": str(self.path)}


def results_table(results: list[FleetResult], title: str) -> Table:
    table = Table(title=title)
    for col in ("device", "model", "status", "node", "seconds", "profile"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for r in results:
        table.add_row(r.device_slug, r.model, r.status, r.node or "-",
                      "-" if r.seconds is None else f"{r.seconds:.0f}", str(r.path))
    return table


def profile_path(out_dir: Path, device_slug: str, spec: ModelSpec) -> Path:
    return Path(out_dir) / f"{device_slug}-{slugify(spec.name)}.json"


def without_commit(environment: dict) -> dict:
    return {k: v for k, v in environment.items() if k != "commit"}


def is_current(path: Path, environment: dict, spec: ModelSpec, block_size: int,
               quick: bool) -> bool:
    """Whether the profile at `path` is what a calibration on a node with `environment` would
    replace (see the module docstring); False when there is none or it cannot be read."""
    try:
        prof = load(path, warn=lambda line: None)  # a version 1 file is replaced, not used
    except ProfileError:
        return False
    asked = prof.extra.get("dtype_choice", {}).get("asked", prof.dtype)  # before the CPU's pick
    return (prof.source == "measured" and V1_SPLIT not in prof.swap_out.fit.method
            and prof.model.model_copy(update={"dtype": asked}) == ModelInfo(**spec.to_dict())
            and prof.config.get("block_size") == block_size and prof.config.get("quick") == quick
            and without_commit(prof.environment) == without_commit(environment))


def calibrate_on_node(spec: ModelSpec, device: str, block_size: int, quick: bool,
                      plan: CalibrationPlan | None, explicit_dtype: bool, progress, node: str
                      ) -> CalibrationRun:
    """The Ray task: `calibrate` as `kvbench calibrate` runs it (this node's native dtype unless
    `explicit_dtype`, sizes cut to the time plan), sending (node, model, phase, text) to the
    `progress` queue when a phase begins, then at most every PLAIN_INTERVAL_S."""
    sent_s: dict[str, float] = {}  # when each phase last sent

    def on_point(phase: str, text: str, start: bool = False) -> None:
        if phase not in sent_s or time.monotonic() - sent_s[phase] >= PLAIN_INTERVAL_S:
            sent_s[phase] = time.monotonic()
            progress.put((node, spec.name, phase, text))

    spec, choice = calibration_dtype(spec, device, explicit_dtype)
    memory_plan, time_plan = plan_calibration(spec, device, block_size, quick, plan)
    if choice is not None:
        progress.put((node, spec.name, "dtype", choice.line()))
    progress.put((node, spec.name, "plan", "; ".join(time_plan.lines())))
    return calibrate(spec, device, block_size=block_size, quick=quick, on_point=on_point,
                     plan=plan, memory_plan=memory_plan, time_plan=time_plan,
                     dtype_choice=choice)


def _pinned(node_id: str, soft: bool = False):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id, soft=soft)


def probe_nodes(ray, device: str, emit: Callable[[FleetEvent], None]) -> list[FleetNode]:
    """The live nodes that can calibrate `device`, each with its fingerprint."""
    resource = "GPU" if device == "cuda" else "CPU"
    candidates = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource, 0) >= 1]
    if not candidates:
        hint = "; use --device cpu to calibrate CPUs" if device == "cuda" else ""
        raise ClusterError(f"no live node with a {resource} in the Ray cluster{hint}")
    probe = ray.remote(fingerprint)
    refs = {probe.options(scheduling_strategy=_pinned(n["NodeID"]), num_cpus=0,
                          num_gpus=1 if device == "cuda" else 0, max_retries=0).remote(device): n
            for n in candidates}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    nodes = []
    for ref in ready:
        n = refs[ref]
        label = f"{n['NodeManagerAddress']}/{n['NodeID'][:6]}"
        try:
            environment = ray.get(ref)
        except ray.exceptions.RayError as exc:
            emit(FleetEvent(label, "-", "failed", f"probe: {_first_line(exc)}"))
            continue
        node = FleetNode(n["NodeID"], n["NodeManagerAddress"],
                         int(n["Resources"].get("CPU", 0)), environment)
        emit(FleetEvent(node.label, "-", "probe", f"{node.slug} ({environment['device_name']})"))
        nodes.append(node)
    for ref in late:
        n = refs[ref]
        ray.cancel(ref, force=True)
        emit(FleetEvent(f"{n['NodeManagerAddress']}/{n['NodeID'][:6]}", "-", "failed",
                        f"probe: no answer in {PROBE_TIMEOUT_S:g} s; left out"))
    if not nodes:
        raise ClusterError("no node answered (see the lines above); nothing to calibrate")
    return nodes


def _first_line(exc: BaseException) -> str:
    """What went wrong, in one line: a task's own exception, or Ray's (worker or node died)."""
    cause = getattr(exc, "cause", None)  # RayTaskError: the exception the task raised
    if isinstance(cause, BaseException):
        exc = cause
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


@dataclass
class _Job:
    spec: ModelSpec
    result: FleetResult
    tried: list[str] = field(default_factory=list)  # node ids
    started: float = 0.0


def calibrate_fleet(specs: list[ModelSpec], device: str = "cuda", address: str = LOCAL,
                    block_size: int = 16, quick: bool = False,
                    out_dir: str | Path = Path("results/profiles"), force: bool = False,
                    plan: CalibrationPlan | None = None, explicit_dtype: bool = False,
                    on_event: Callable[[FleetEvent], None] = lambda event: None,
                    ) -> list[FleetResult]:
    """Calibrate every model on every device type of the cluster at `address` (see
    `kvbench.cluster`); results per device type, then model. `plan` replaces the sweep sizes
    as in `kvbench.calibration.pipeline.calibrate`; each CPU node calibrates in its native dtype
    unless `explicit_dtype` (the specs' dtype was asked for)."""
    if device not in ("cuda", "cpu"):
        raise KvbenchError(f"unknown device {device!r}; use cuda (every node with a GPU) or cpu")
    out_dir = Path(out_dir)
    with connect(address) as ray:
        from ray.util.queue import Queue

        types: dict[str, list[FleetNode]] = {}
        for node in probe_nodes(ray, device, on_event):
            types.setdefault(node.slug, []).append(node)
        jobs = []
        for slug, members in types.items():
            for i, spec in enumerate(specs):
                job = _Job(spec, FleetResult(slug, spec.name, "failed",
                                             profile_path(out_dir, slug, spec)))
                jobs.append(job)
                node = members[i % len(members)]
                if not force and is_current(job.result.path, node.environment, spec,
                                            block_size, quick):
                    job.result.status = "current"
                    on_event(FleetEvent(node.label, spec.name, "current",
                                        f"{job.result.path} (--force measures again)"))
                    continue
                job.tried.append(node.node_id)
        # Progress flows back to the caller's node, which outlives any other: pinned there
        # (hard), so losing a worker node never takes the queue with it.
        progress = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": _pinned(
            ray.get_runtime_context().get_node_id(), soft=False)})
        task = ray.remote(calibrate_on_node)
        nodes = {n.node_id: n for members in types.values() for n in members}
        pending = {}

        def submit(job: _Job) -> None:
            node = nodes[job.tried[-1]]
            resources = ({"num_gpus": 1, "num_cpus": 1} if device == "cuda"
                          else {"num_cpus": node.num_cpus})
            ref = task.options(scheduling_strategy=_pinned(node.node_id), max_retries=0,
                               **resources).remote(job.spec, device, block_size, quick, plan,
                                                   explicit_dtype, progress, node.label)
            pending[ref] = job
            job.started = time.perf_counter()
            on_event(FleetEvent(node.label, job.spec.name, "start",
                                f"{'quick ' if quick else ''}{device} calibration"))

        def drain() -> None:
            while not progress.empty():
                on_event(FleetEvent(*progress.get_nowait()))

        for job in jobs:
            if job.result.status != "current":
                submit(job)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            drain()
            for ref in ready:
                job = pending.pop(ref)
                node = nodes[job.tried[-1]]
                try:
                    run = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    job.result.errors.append(f"{node.label}: {_first_line(exc)}")
                    on_event(FleetEvent(node.label, job.spec.name, "failed", _first_line(exc)))
                    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
                    others = [n.node_id for n in types[job.result.device_slug]
                              if n.node_id in alive and n.node_id not in job.tried]
                    if len(job.tried) == 1 and others:
                        job.tried.append(others[0])
                        submit(job)
                    continue
                run.write(job.result.path)
                job.result.status = "calibrated"
                job.result.node = node.label
                job.result.seconds = time.perf_counter() - job.started
                on_event(FleetEvent(node.label, job.spec.name, "done",
                                    f"{job.result.seconds:.0f} s -> {job.result.path}"))
        drain()
    return [job.result for job in jobs]
