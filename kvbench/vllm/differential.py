"""The differential test's two sides: vLLM's own scheduler (`kvbench.vllm.drive`) and the
simulator under the same settings, with the same token ids and the same constant step time, and
where their step logs first part (`kvbench.sim.steplog.first_difference`).
"""

from __future__ import annotations

import dataclasses

from kvbench.sim.config import SimConfig
from kvbench.sim.engine import Simulator
from kvbench.sim.engines import ReplicaSpec
from kvbench.sim.steplog import StepLog, first_difference
from kvbench.sim.tokens import TokenIds, random_token_ids
from kvbench.sim.workloads import Workload
from kvbench.vllm.drive import drive


def sim_config(replica: ReplicaSpec, step_s: float, **mutations) -> SimConfig:
    """The simulator on the replica vLLM is given, priced by the drive's constant step time
    (`mutations`: replica settings changed in the simulator only, to break a rule)."""
    return SimConfig(replica=dataclasses.replace(replica, **mutations),
                     step_time=f"constant:{step_s * 1e3:g}ms")


def same_requests(workload: Workload) -> Workload:
    """The workload as the driver replays it: each request's max_tokens is its output length
    (vLLM is told `max_tokens = output_tokens`, `ignore_eos`)."""
    return dataclasses.replace(workload, max_tokens=workload.output_tokens.copy())


def simulate_log(workload: Workload, config: SimConfig, tokens: TokenIds) -> StepLog:
    return Simulator(same_requests(workload), config, tokens=tokens, record=True).run().step_log


def compare(workload: Workload, replica: ReplicaSpec, tokens: TokenIds | None = None,
            vllm_log: StepLog | None = None, step_s: float = 0.02, **mutations
            ) -> tuple[StepLog, StepLog, str | None]:
    """Run both sides (vLLM's unless given) and return their logs and the first difference
    (None: they agree on every step's batch, preemption, finish and prefix-cache hit)."""
    tokens = tokens if tokens is not None else random_token_ids(workload, seed=0)
    reference = (vllm_log if vllm_log is not None
                 else drive(workload, replica, tokens, step_s))
    ours = simulate_log(workload, sim_config(replica, step_s, **mutations), tokens)
    return reference, ours, first_difference(reference, ours)
