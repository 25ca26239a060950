"""The differential test's two sides: vLLM's own scheduler (`kvbench.vllm.drive`) and the
simulator under the same settings, with the same token ids and the same constant step time, and
where their step logs first part (`kvbench.sim.steplog.first_difference`).

With kvbench's swap connector (`preemption` swap or selector in the plugin's options) vLLM's
side is the kvbench scheduler with the connector's scheduler side (the worker faked), and the
simulator runs the same preemption policy on the same costs: the plugin's, for the drive's tiny
model in float32 on the options' hardware.
"""

from __future__ import annotations

import dataclasses
import json

from kvbench.models import canonical_dtype, from_hf_dict
from kvbench.sim.config import Costs, SimConfig
from kvbench.sim.engine import Simulator
from kvbench.sim.engines import ReplicaSpec
from kvbench.sim.policies import PolicySpec
from kvbench.sim.steplog import StepLog, first_difference
from kvbench.sim.tokens import workload_token_ids
from kvbench.sim.workloads import TokenIds, Workload
from kvbench.vllm.drive import TINY_MODEL, drive


def sim_config(replica: ReplicaSpec, step_s: float, **mutations) -> SimConfig:
    """The simulator on the replica vLLM is given, priced by the drive's constant step time
    (`mutations`: replica settings changed in the simulator only, to break a rule)."""
    return SimConfig(replica=dataclasses.replace(replica, **mutations),
                     step_time=f"constant:{step_s * 1e3:g}ms")


def same_requests(workload: Workload) -> Workload:
    """The workload as the driver replays it: each request's max_tokens is its output length
    (vLLM is told `max_tokens = output_tokens`, `ignore_eos`)."""
    return dataclasses.replace(workload, max_tokens=workload.output_tokens.copy())


def simulate_log(workload: Workload, config: SimConfig, tokens: TokenIds,
                 costs: Costs | None = None) -> StepLog:
    return Simulator(same_requests(workload), config, costs=costs, tokens=tokens,
                     record=True).run().step_log


def plugin_costs(plugin: dict, block_size: int) -> Costs:
    """The costs the kvbench scheduler prices with in the drive (no profile)."""
    config = json.loads((TINY_MODEL / "config.json").read_text())
    model = from_hf_dict(config, str(TINY_MODEL), str(TINY_MODEL), canonical_dtype("float32"))
    return Costs.resolve(None, model, plugin.get("hardware", "h100-sxm"), block_size)


def compare(workload: Workload, replica: ReplicaSpec, tokens: TokenIds | None = None,
            vllm_log: StepLog | None = None, step_s: float = 0.02, plugin: dict | None = None,
            **mutations) -> tuple[StepLog, StepLog, str | None]:
    """Run both sides (vLLM's unless given) and return their logs and the first difference
    (None: they agree on every step's batch, preemption, finish, prefix-cache hit, swap-out
    and load). `plugin`: the kvbench scheduler's options (admission fcfs, victim lifo), e.g.
    {"preemption": "selector"} for the swap connector."""
    tokens = tokens if tokens is not None else workload_token_ids(workload, seed=0)
    reference = (vllm_log if vllm_log is not None
                 else drive(workload, replica, tokens, step_s, plugin=plugin))
    config, costs = sim_config(replica, step_s, **mutations), None
    if plugin is not None:
        config = dataclasses.replace(config, policy=PolicySpec(
            preemption=plugin.get("preemption", "recompute")))
        costs = plugin_costs(plugin, replica.block_size)
    ours = simulate_log(workload, config, tokens, costs)
    return reference, ours, first_difference(reference, ours)
