"""`kvbench replay --mechanisms`: one trace through vLLM's engine under each way of handling a
preempted request, the simulator beside each.

* `recompute`      vLLM's default: the victim's KV is dropped and computed again;
* `offloading`     vLLM's OffloadingConnector rule: prompt blocks are written through to host
                   memory as they are computed, and a resumed victim loads whatever the host
                   holds past the device's prefix cache (run as kvbench's write-through
                   connector forced to that rule, `kvbench_resume: load`, with
                   `offload_prompt_only` as vLLM's default, so its transfers are measured);
* `swap`           kvbench's swap connector: at preemption the selector swaps the victim to
                   host memory or drops it (`kvbench.vllm.swap_connector`);
* `write-through`  kvbench's write-through connector: prompt blocks written through as for
                   `offloading`, and at resume the selector loads or recomputes
                   (`kvbench.vllm.write_through`).

Every row runs the kvbench scheduler with vLLM's own admission and victim order, so its records
say what each victim got, what was copied, and how long each copy took as measured against what
the profile predicted. The host pool holds the same number of KV blocks in every mechanism.
The simulator runs the same mechanism (`preemption` policy, `kv_offloading`) with the step time
fitted to the replayed steps.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvbench.sim.engine import Simulator
from kvbench.sim.metrics import summarize
from kvbench.sim.policies import Knobs, PolicySpec
from kvbench.sim.tokens import workload_token_ids
from kvbench.sim.workloads import Workload
from kvbench.vllm.differential import same_requests
from kvbench.vllm.instrument import summary_path
from kvbench.vllm.options import PluginOptions
from kvbench.vllm.replay import (
    EngineRun,
    ReplayEngine,
    fit_step_time,
    run_engine,
    run_summary,
)
from kvbench.vllm.scheduler import preemption_costs


@dataclass(frozen=True)
class Mechanism:
    name: str
    preemption: str  # the plugin's and the simulator's preemption policy
    connector: str | None = None  # "swap" or "write-through"
    resume: str = "selector"  # write-through: kvbench_resume
    prompt_only: bool = True  # write-through: offload_prompt_only (vLLM's default)
    offloading: bool = False  # the simulator's kv_offloading


MECHANISMS = (
    Mechanism("recompute", "recompute"),
    Mechanism("offloading", "swap", "write-through", resume="load", offloading=True),
    Mechanism("swap", "selector", "swap"),
    Mechanism("write-through", "selector", "write-through", offloading=True),
)


def kv_transfer(mechanism: Mechanism, host_blocks: int, block_bytes: int) -> dict | None:
    """vLLM's --kv-transfer-config of a mechanism, with a host pool of `host_blocks` blocks."""
    if mechanism.connector == "swap":
        return {"kv_connector": "KvbenchSwapConnector", "kv_role": "kv_both",
                "kv_connector_module_path": "kvbench.vllm.swap_connector",
                "kv_connector_extra_config": {"host_blocks": host_blocks}}
    if mechanism.connector == "write-through":
        return {"kv_connector": "KvbenchWriteThroughConnector", "kv_role": "kv_both",
                "kv_connector_module_path": "kvbench.vllm.write_through",
                "kv_connector_extra_config": {
                    "cpu_bytes_to_use": host_blocks * block_bytes,
                    "offload_prompt_only": mechanism.prompt_only,
                    "kvbench_resume": mechanism.resume}}
    return None


def mechanism_row(mechanism: Mechanism, run: EngineRun, workload: Workload, model) -> dict:
    """A replayed mechanism's numbers: the run's summary and its records' copies."""
    row = run_summary(run, workload, model)
    del row["records_summary"]  # the engine's own summary adds the write-through's transfers
    records = json.loads(summary_path(run.records).read_text())
    swap = mechanism.connector == "swap"
    copies = {side: (records[f"bytes_{side}"], records[f"swap_{side}_ms"],
                     records[f"swap_{side}_predicted_ms"]) if swap else
              (records[f"host_{direction}_bytes"], records[f"host_{direction}_ms"],
               records[f"host_{direction}_predicted_ms"])
              for side, direction in (("out", "store"), ("in", "load"))}
    row |= {"policy": mechanism.name, "host_decisions": records["swapped_preemptions"],
            "fallbacks": records["swap_fallbacks"], "loaded_tokens": records["loaded_tokens"],
            "moved_bytes": copies["out"][0] + copies["in"][0]}
    for side, (_, measured, predicted) in copies.items():
        row |= {f"copy_{side}_ms": measured, f"copy_{side}_predicted_ms": predicted,
                f"copy_{side}_error_pct": (100 * (predicted - measured) / measured
                                           if measured else None)}
    return row


def replay_mechanisms(workload: Workload, settings: ReplayEngine, host_blocks: int,
                      records_dir: Path, profile: Path | None = None,
                      hardware: str = "h100-sxm", progress=None
                      ) -> tuple[str, list[dict], list[dict]]:
    """Each mechanism through a fresh engine, then through the simulator: the fitted step time,
    the replayed rows and the simulated rows."""
    model = settings.model_spec()
    block_bytes = settings.replica.block_size * model.kv_bytes_per_token
    max_model_len = settings.max_model_len(workload)
    tokens = workload_token_ids(workload, settings.seed, vocab_size=model.vocab_size)
    runs = []
    for mechanism in MECHANISMS:
        options = PluginOptions.parse({
            "preemption": mechanism.preemption if mechanism.connector == "swap" else
            "recompute", "profile": profile, "hardware": hardware,
            "records": records_dir / f"{mechanism.name}.jsonl"})
        report = ((lambda done, label=mechanism.name: progress(label, done)) if progress
                  else None)
        runs.append(run_engine(workload, tokens, settings, mechanism.name, options, report,
                               kv_transfer(mechanism, host_blocks, block_bytes)))
    step_time = fit_step_time(runs)
    costs, _ = preemption_costs(PluginOptions.parse({"profile": profile, "hardware": hardware}),
                                model, settings.replica.block_size)
    replayed, simulated = [], []
    for mechanism, run in zip(MECHANISMS, runs):
        replica = dataclasses.replace(settings.replica, num_cpu_blocks=host_blocks,
                                      kv_offloading=mechanism.offloading)
        config = dataclasses.replace(
            settings.sim_config(max_model_len, step_time, PolicySpec(
                preemption=mechanism.preemption), Knobs()), replica=dataclasses.replace(
                    replica, max_model_len=max_model_len))
        result = Simulator(same_requests(workload), config, costs, tokens=tokens).run()
        replayed.append(mechanism_row(mechanism, run, workload, model))
        summary = summarize(result)
        loads = int(np.count_nonzero(result.requests.loaded_tokens))  # requests that loaded
        simulated.append(summary | {
            "policy": mechanism.name,
            "host_decisions": loads if mechanism.offloading else summary["swap_preemptions"],
            "fallbacks": summary["swap_fallbacks"], "moved_bytes": summary["swapped_bytes"],
            "loaded_tokens": int(np.sum(result.requests.loaded_tokens))})
    return step_time, replayed, simulated
