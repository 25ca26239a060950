"""A run's inputs in one shape (`RunSpec`): the workload's source, the costs' source, the replica,
the policy and its knobs. `kvbench simulate`, `compare-policies`, a sweep's cells, replay and
the differential harness all parse their options into one and `resolve` it the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvbench.errors import KvbenchError
from kvbench.fields import option
from kvbench.sim.config import RUN_FIELDS, Costs, SimConfig
from kvbench.sim.engines import FIELDS as REPLICA_FIELDS
from kvbench.sim.policies import KNOB_FIELDS, POLICY_AXES
from kvbench.sim.workloads import AZURE_CONV_TRACE, Workload, load_workload

STUDY_RATE_SCALE = 2.0  # the study's default workload: the Azure conversation trace, 2x


@dataclass(frozen=True)
class WorkloadSource:
    """A trace file or a synthetic mix (`kvbench.sim.workloads`), exactly one; with neither,
    the study's (`study_default`): the Azure conversation trace at `STUDY_RATE_SCALE`."""

    trace: str | None = option(None, "Trace: a bundled name (azure-conv-2023, "
                               "mooncake-synthetic), a CSV (Azure 2023 columns, or arrival_s, "
                               "prompt_tokens, output_tokens[, max_tokens]) or a JSONL whose "
                               "prompts share prefixes (Mooncake's hash_ids, or "
                               "prompt_token_ids).")
    synthetic: str | None = option(None, "Synthetic mix instead, e.g. requests=500,rate=8,"
                                   "arrivals=gamma,cv=2,long-prompt=0.3,long-output=0.2; mixes "
                                   "that share prefixes: multi-turn:sessions=200,turns=4 or "
                                   "system-prompt:requests=1000,prompts=8.")
    rate_scale: float | None = option(None, "Replay the trace this many times faster.")
    num_requests: int | None = option(None, "Only the first N requests.")
    max_tokens: int | None = option(None, "Generation limit of every request (default: the "
                                    "trace's longest output).")
    seed: int = 0

    def load(self, study_default: bool = False,
             warn: Callable[[str], None] = lambda line: None) -> Workload:
        """The workload; `warn` gets a line per trace column that is ignored."""
        trace, rate_scale = self.trace, self.rate_scale
        if study_default and trace is None and self.synthetic is None:
            trace = AZURE_CONV_TRACE
            rate_scale = STUDY_RATE_SCALE if rate_scale is None else rate_scale
        return load_workload(trace, self.synthetic, 1.0 if rate_scale is None else rate_scale,
                             self.num_requests, self.max_tokens, self.seed, warn)


@dataclass(frozen=True)
class CostSource:
    """A profile file (measured costs), or a model preset priced on the replica's hardware."""

    profile: str | Path | None = option(None, "Profile JSON: calibrated costs.")
    model: str | None = option(None, "Model preset for analytic costs (default llama-2-7b).")

    def __post_init__(self) -> None:
        if self.profile is not None and self.model is not None:
            raise KvbenchError("give either --profile or --model, not both: a profile names its "
                               "model")


WORKLOAD_FIELDS = tuple(f.name for f in dataclasses.fields(WorkloadSource))
COST_FIELDS = tuple(f.name for f in dataclasses.fields(CostSource))


@dataclass(frozen=True)
class RunSpec:
    """Everything one simulation run is given."""

    workload: WorkloadSource = WorkloadSource()
    costs: CostSource = CostSource()
    config: SimConfig = SimConfig()

    @classmethod
    def from_options(cls, **options) -> RunSpec:
        """From flat options (those of `kvbench simulate`, a sweep cell): workload and cost
        sources, `policy`, `engine`, and any `ReplicaSpec`, `Knobs` or run field (None: the
        default). `seed` seeds both the workload and the policies."""
        unknown = sorted(set(options) - set(WORKLOAD_FIELDS) - set(COST_FIELDS)
                         - {"policy", "engine", *POLICY_AXES} - set(REPLICA_FIELDS)
                         - set(KNOB_FIELDS)
                         - set(RUN_FIELDS))
        if unknown:
            raise KvbenchError(f"unknown option {unknown[0]!r}")
        pick = lambda names: {k: options[k] for k in names if options.get(k) is not None}  # noqa: E731
        config = SimConfig.build(**{k: v for k, v in options.items()
                                    if k not in WORKLOAD_FIELDS + COST_FIELDS or k == "seed"})
        return cls(WorkloadSource(**pick(WORKLOAD_FIELDS)), CostSource(**pick(COST_FIELDS)),
                   config)

    def resolve(self, study_default: bool = False,
                warn: Callable[[str], None] = lambda line: None
                ) -> tuple[Workload, SimConfig, Costs]:
        """The workload, configuration and costs. The replica takes the costs' block size
        (the swap model prices that block size). A measured profile from other hardware than
        this machine's is used, and `warn` gets that line once every input has passed its
        checks."""
        workload = self.workload.load(study_default, warn)
        warnings: list[str] = []
        config, costs = self.configure(warnings.append)
        for line in warnings:
            warn(line)
        return workload, config, costs

    def configure(self, warn: Callable[[str], None] = lambda line: None
                  ) -> tuple[SimConfig, Costs]:
        """The configuration and the costs, without the workload."""
        costs = Costs.resolve(self.costs.profile, self.costs.model, self.config.replica.hardware,
                              warn=warn)
        replica = dataclasses.replace(self.config.replica, block_size=costs.costs.block_size)
        return dataclasses.replace(self.config, replica=replica), costs
