"""A sweep's plan: its cells, workload-major and policy-minor, each with the key of its result.

A key hashes what the result depends on, by content: the cell (policy, rate scale, cache size,
seed), its trace's sha256 (not its path: the same spec run from another folder, or with an
absolute path, keys the same cells) or its synthetic mix, the spec's shared settings with the
default model filled in, the profile's sha256, and the code (`code_sha256`: an editable install
after a change runs every cell again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvbench import __version__, hardware
from kvbench.console import stderr_warning
from kvbench.sim.config import DEFAULT_MODEL, SimConfig
from kvbench.sim.sweep.spec import SweepError, SweepSpec
from kvbench.sim.workloads import (
    Workload,
    WorkloadError,
    load_workload,
    resolve_trace,
)

SYNTHETIC = "synthetic:"  # prefix of a synthetic mix among the cells' workload sources


@dataclass(frozen=True)
class Cell:
    source: str  # a trace (path or bundled name), or SYNTHETIC + a mix
    rate_scale: float
    num_gpu_blocks: int | None
    seed: int
    policy: str

    def workload(self, spec: SweepSpec,
                 warn: Callable[[str], None] = stderr_warning) -> Workload:
        synthetic = self.source.startswith(SYNTHETIC)
        source = spec.run_spec().workload
        return load_workload(None if synthetic else self.source,
                             self.source.removeprefix(SYNTHETIC) if synthetic else None,
                             self.rate_scale, source.num_requests, source.max_tokens, self.seed,
                             warn)

    def workload_key(self) -> tuple:
        """Cells with equal keys replay the same workload (a trace ignores the seed)."""
        return (self.source, self.rate_scale,
                self.seed if self.source.startswith(SYNTHETIC) else None)

    def label(self) -> str:
        blocks = ("memory-sized cache" if self.num_gpu_blocks is None
                  else f"{self.num_gpu_blocks} blocks")
        return (f"{self.policy} on {source_label(self.source)} (rate x{self.rate_scale:g}, "
                f"{blocks}, seed {self.seed})")

    def config(self, base: SimConfig) -> SimConfig:
        return base.with_policy(self.policy).replace(num_gpu_blocks=self.num_gpu_blocks,
                                                     seed=self.seed)


def source_label(source: str) -> str:
    """A trace's file name (or bundled name), or the synthetic mix."""
    return source if source.startswith(SYNTHETIC) else Path(source).name


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


def _trace_sha256(trace: Path) -> str:
    try:
        return _sha256(resolve_trace(trace))
    except WorkloadError as exc:
        raise SweepError(str(exc)) from None


def plan_sweep(spec: SweepSpec) -> Plan:
    """Every cell, workload-major and policy-minor, with its key (see the module docstring)."""
    sources = [str(t) for t in spec.traces] + [SYNTHETIC + s for s in spec.synthetic]
    digests = {str(t): _trace_sha256(t) for t in spec.traces}
    shared = {k: v for k, v in spec.settings.items() if k != "profile"}
    profile = spec.run_spec().costs.profile
    if profile is None:
        shared["model"] = shared.get("model") or DEFAULT_MODEL  # as `Costs.resolve` fills it in
    shared["profile_sha256"] = _sha256(Path(profile)) if profile is not None else None
    shared["kvbench"] = __version__
    shared["code_sha256"] = hardware.code_sha256()
    cells, keys, identities = [], [], []
    for source, rate, blocks, seed, policy in itertools.product(
            sources, spec.rate_scales, spec.num_gpu_blocks or [None], spec.seeds, spec.policies):
        cell = Cell(source, rate, blocks, seed, policy)
        identity = {**dataclasses.asdict(cell), "source_sha256": digests.get(source), **shared}
        # a trace by its content alone (not its path), a synthetic mix by its text
        hashed = {**identity, "source": None} if source in digests else identity
        cells.append(cell)
        keys.append(hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:20])
        identities.append(identity)
    return Plan(spec, cells, keys, identities)
