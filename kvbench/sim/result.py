"""What a simulation produces (`SimResult`, which `kvbench.sim.metrics` turns into numbers) and
a scheduled step in flight (`Batch`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvbench.sim.config import SimConfig
from kvbench.sim.requests import RequestTable
from kvbench.sim.steplog import StepLog
from kvbench.sim.write_through import StepTransfers


@dataclass
class SimResult:
    """Everything a run produced; `kvbench.sim.metrics` turns it into numbers."""

    config: SimConfig
    workload: dict
    model: str
    profile_source: str
    num_gpu_blocks: int
    num_cpu_blocks: int
    block_bytes: float
    requests: RequestTable
    steps: int
    end_s: float
    busy_ms: float
    recompute_ms: float
    swap_ms: float
    flops: float
    recompute_flops: float
    max_kv_blocks_used: int
    timeline_s: np.ndarray
    timeline_kv_blocks: np.ndarray
    timeline_running: np.ndarray
    livelock: dict | None
    step_log: StepLog | None = None


@dataclass
class Batch:
    """A scheduled step: its requests, which of them sample a token, when it ends."""

    ids: np.ndarray
    samples: np.ndarray
    end_s: float
    log_step: int | None
    swapped: tuple[int, ...] = ()  # victims whose swap-out this step copies
    transfers: StepTransfers | None = None  # write-through stores and loads, done with its output
