"""kvbench's swap-on-preemption KV connector for vLLM 0.32: per victim, the calibrated selector
either copies its KV to a bounded host pool and loads it back on resume, or lets vLLM drop it
and recompute.

    vllm serve MODEL --scheduler-cls kvbench.vllm.scheduler.KvbenchScheduler \\
        --kv-transfer-config '{"kv_connector": "KvbenchSwapConnector", "kv_role": "kv_both"}'

(the name is registered by kvbench's `vllm.general_plugins` entry point; without the package
installed, add `"kv_connector_module_path": "kvbench.vllm.swap_connector"`). The victim policy
is kvbench's `preemption` option (`kvbench.vllm.options`: selector by default with this
connector, or swap, or recompute) priced by the plugin's profile. Its own options, in
`kv_connector_extra_config`: `host_gib` (host pool, GiB; default 4) or `host_blocks`, and
`copy_impl` (kvbench's copy routine: auto, torch, triton, batched_dma, per_block).

The scheduler side (`kvbench.vllm.swap_scheduler.SwapPlanner`) is driven by the kvbench
scheduler, which calls it at `_preempt_request` before vLLM frees the victim's blocks; it
therefore refuses to start under another scheduler class. The worker side
(`kvbench.vllm.swap_worker.SwapWorker`) copies in `handle_preemptions` (before the step's
forward pass, so before a freed block is written again) and `start_load_kv` (synchronous
loads, before the forward pass), and reports each copy's bytes and measured time back.
Models with more than one KV cache group (hybrid attention) are refused at start.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec

from kvbench.errors import KvbenchError
from kvbench.ops.kv_copy import COPY_IMPLS
from kvbench.vllm.options import PluginError
from kvbench.vllm.swap_scheduler import SwapPlanner
from kvbench.vllm.swap_worker import CopyReport, SwapIn, SwapOut, SwapWorker

GIB = 1 << 30
EXTRA_KEYS = ("host_gib", "host_blocks", "copy_impl")
DEFAULT_HOST_GIB = 4.0


@dataclass(frozen=True)
class SwapSettings:
    """The connector's own options, checked (module docstring)."""

    host_blocks: int
    copy_impl: str

    @classmethod
    def parse(cls, extra: dict[str, Any], block_bytes: int) -> SwapSettings:
        unknown = [k for k in extra if k not in EXTRA_KEYS]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], EXTRA_KEYS, n=1)
            raise PluginError(f"kvbench swap connector: unknown option {unknown[0]!r} in "
                              "kv_connector_extra_config" + (f" (did you mean {hint[0]!r}?)"
                                                             if hint else "")
                              + f"; known: {', '.join(EXTRA_KEYS)}")
        if "host_gib" in extra and "host_blocks" in extra:
            raise PluginError("kvbench swap connector: give host_gib or host_blocks, not both")
        if "host_blocks" in extra:
            blocks = extra["host_blocks"]
            if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
                raise PluginError("kvbench swap connector: host_blocks must be a non-negative "
                                  f"integer, got {blocks!r}")
        else:
            gib = extra.get("host_gib", DEFAULT_HOST_GIB)
            if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib >= 0:
                raise PluginError("kvbench swap connector: host_gib must be a non-negative "
                                  f"number, got {gib!r}")
            blocks = int(gib * GIB // block_bytes)
        impl = extra.get("copy_impl", "auto")
        if impl != "auto" and impl not in COPY_IMPLS:
            raise PluginError(f"kvbench swap connector: copy_impl {impl!r} is not one of auto, "
                              f"{', '.join(COPY_IMPLS)}")
        return cls(blocks, impl)


@dataclass
class SwapMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step: the copies to make and host copies to drop."""

    swap_out: list[SwapOut] = field(default_factory=list)
    swap_in: list[SwapIn] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)


@dataclass
class CopyReports(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: the copies made. With tensor parallelism each
    worker copies its shard: bytes add up, the slowest worker's time counts."""

    reports: list[CopyReport] = field(default_factory=list)

    def aggregate(self, other: CopyReports) -> CopyReports:
        merged = {(r.request_id, r.direction): r for r in self.reports}
        for r in other.reports:
            mine = merged.get((r.request_id, r.direction))
            merged[(r.request_id, r.direction)] = r if mine is None else CopyReport(
                r.request_id, r.direction, r.blocks, mine.bytes + r.bytes, max(mine.ms, r.ms),
                mine.ok and r.ok, mine.error or r.error)
        return CopyReports(list(merged.values()))


def planned_copies(scheduler_output) -> tuple[list[str], dict[str, int]]:
    """The swap connector's plan in a step's output: the victims it swaps out (in preemption
    order) and the tokens each resumed request loads back (empty without the connector)."""
    meta = scheduler_output.kv_connector_metadata
    if not isinstance(meta, SwapMetadata):
        return [], {}
    return ([job.request_id for job in meta.swap_out],
            {job.request_id: job.tokens for job in meta.swap_in})


def kv_layout(kv_cache_config) -> tuple[int, int]:
    """(block_size, bytes of one block of all layers) of a single full-attention group."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, FullAttentionSpec):
        raise PluginError("kvbench swap connector: only models with one full-attention KV "
                          f"cache group are supported, this one has {len(groups)} group(s)")
    spec = groups[0].kv_cache_spec
    return spec.block_size, spec.page_size_bytes * len(groups[0].layer_names)


class KvbenchSwapConnector(KVConnectorBase_V1):
    """Swap on preemption, per victim (module docstring)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.block_size, self.block_bytes = kv_layout(kv_cache_config)
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        self.settings = SwapSettings.parse(extra, self.block_bytes)
        self.planner: SwapPlanner | None = None
        self.worker: SwapWorker | None = None
        self._load_errors: set[int] = set()
        if role == KVConnectorRole.SCHEDULER:
            from kvbench.vllm.scheduler import KvbenchScheduler

            scheduler_cls = vllm_config.scheduler_config.get_scheduler_cls()
            if not issubclass(scheduler_cls, KvbenchScheduler):
                raise PluginError("kvbench swap connector: it needs kvbench's scheduler, "
                                  "--scheduler-cls kvbench.vllm.scheduler.KvbenchScheduler")
        else:
            self.worker = SwapWorker(self.settings.copy_impl)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # nothing is handed off: a dropped copy is a recomputation

    def attach(self, costs, decide, recorder) -> SwapPlanner:
        """Called by the kvbench scheduler: the costs, the preemption policy (bound) and the
        recorder."""
        self.planner = SwapPlanner(self.settings.host_blocks, self.block_size,
                                   self.block_bytes, costs, decide, recorder)
        return self.planner

    # -----------------------------------------------------------------------------------------
    # Scheduler side

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int
                                   ) -> tuple[int, bool]:
        return self.planner.matched(request.request_id, request.num_tokens,
                                    num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if request.request_id in self.planner.swapped:
            self.planner.allocated(request.request_id, blocks.get_block_ids()[0],
                                   num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> SwapMetadata:
        return SwapMetadata(*self.planner.take())

    def take_reports(self, connector_output) -> None:
        """The worker's copy reports of a step, taken by the kvbench scheduler before vLLM
        processes the step's output (a request may finish in it and close its record)."""
        meta = connector_output.kv_connector_worker_meta if connector_output else None
        if isinstance(meta, CopyReports):
            self.planner.reported(meta.reports)
            connector_output.kv_connector_worker_meta = None

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        self.planner.finished(request.request_id)
        return False, None

    # -----------------------------------------------------------------------------------------
    # Worker side

    def register_kv_caches(self, kv_caches) -> None:
        try:
            self.worker.register(kv_caches, self._kv_cache_config.num_blocks)
        except KvbenchError as exc:
            raise PluginError(str(exc)) from None

    def handle_preemptions(self, kv_connector_metadata: SwapMetadata) -> None:
        self.worker.drop(kv_connector_metadata.drops)
        self.worker.swap_out(kv_connector_metadata.swap_out)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        self._load_errors |= self.worker.swap_in(self._get_connector_metadata().swap_in)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self) -> CopyReports | None:
        reports = self.worker.take_reports()
        return CopyReports(reports) if reports else None
