"""Scheduling policies, registered by name; any admission, victim and preemption combine.

Each policy is a plain function of a `SchedulerView` (kvbench/sim/view.py: the running requests
in admission order, the cache, the costs) and keyword knobs, each a field of `Knobs`, so the same
function serves the simulator and a real engine's scheduler. A `PolicySpec` names one function
per axis (`admission/victim/preemption/predictor[@engine]`) and `bind` gives each function its
knobs: the simulator and the vLLM plugin both bind through it. Adding a policy is a function and
a registry entry (and a `Knobs` field for a new knob).

Admission (`ADMISSION`): may the head of the waiting queue start now? The engine has already
checked what every policy shares (vLLM V1): a free slot under `max_num_seqs`, token budget left
in this step, GPU blocks free now for the first chunk, and no preemption in this step. A request
is always admitted when nothing is running, so a request that fits the cache alone never waits
forever.

* `fcfs`        nothing more: greedy, in arrival order, as vLLM V1;
* `reserve-max` the blocks for prompt + max_tokens of every running request and the candidate
                fit the cache: never preempts, wastes what requests do not generate;
* `future-kv`   the predicted peak of total KV over the future (`future_peak_blocks`), with the
                candidate (less the blocks of its prefix-cache hit that running requests hold),
                stays within (1 - headroom_fraction) of the cache; optionally at most
                `max_long_requests` requests predicted to generate `long_output_tokens` or more
                run together (they are the ones a wrong prediction hurts most).

Victim (`VICTIMS`): which running request to preempt when one needs a block and none is free:
a position in `view.running` (all running requests in admission order, the one needing the
block included); `swaps` says for each whether the preemption policy would swap it.

* `lifo`        the most recently admitted (vLLM);
* `lcf`         least computed first: fewest tokens in the cache (ties: most recent), not
                counting those of blocks another running request shares (preempting keeps them);
* `cost-aware`  lowest preemption cost (by the preemption mode in force) per MB of KV freed,
                sparing requests predicted to finish within `protect_steps` steps unless all are.
                Blocks another running request shares are not freed, and a recompute does not
                redo them (the victim finds them again in the prefix cache).

Preemption (`PREEMPTIONS`): for each of some running requests, swap (True) or recompute (False).

* `recompute`   always recompute (vLLM V1);
* `swap`        swap while the CPU swap space has room for the victim's blocks, else recompute;
* `selector`    the cheaper of the two by `CostModel.prefer_swap` (the choice `kvbench select`
                prints), swapping only while the CPU space has room.

Resume (`RESUMES`, by the preemption policy's name), under write-through offloading
(`ReplicaSpec.kv_offloading`, kvbench/sim/write_through.py), where nothing is decided at
preemption: a request about to start with `cached` tokens in the prefix cache and `loadable`
more in the host cache loads them (True) or computes them again (False).

* `recompute`   never loads;
* `swap`        always loads (vLLM's OffloadingConnector);
* `selector`    loads when swap_in_ms(loadable) <= recompute_ms(cached + loadable) -
                recompute_ms(cached): the load costs no more than the prefill it saves.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import dataclass, fields

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.fields import option
from kvbench.limits import MAX_BLOCKS, MAX_TOKENS, check_finite, check_int, check_name
from kvbench.sim.predictors import PREDICTORS
from kvbench.sim.requests import cdiv
from kvbench.sim.view import Requests, SchedulerView

MAX_NOISE_SIGMA = 10.0  # a log-normal factor of e^10 (22,000) either way is noise enough


def future_peak_blocks(known_tokens: np.ndarray, remaining_tokens: np.ndarray,
                       block_size: int) -> float:
    """Upper bound on the peak KV blocks of requests that each grow one token per step until
    they have generated their remaining tokens, then free their blocks.

    Sorted by remaining tokens r_1 <= r_2 <= ..., the total is highest just before a request
    finishes, at step r_k, when requests k.. are alive and hold sum_{j>=k}(c_j + r_k) tokens;
    ceil(x / block_size) <= x / block_size + 1 per request bounds their blocks.
    """
    order = remaining_tokens.argsort(kind="stable")
    alive = np.arange(order.size, 0, -1)
    suffix_tokens = known_tokens[order][::-1].cumsum()[::-1]
    # (tokens + alive · block_size) / block_size: one division of an exact integer
    peak = (suffix_tokens + alive * (remaining_tokens[order] + block_size)).max()
    return float(peak) / block_size


def admit_fcfs(view: SchedulerView, candidate: Requests) -> bool:
    return True


def admit_reserve_max(view: SchedulerView, candidate: Requests) -> bool:
    batch = view.running.append(candidate)
    return bool(cdiv(batch.max_total_tokens, view.block_size).sum() <= view.num_gpu_blocks)


def admit_future_kv(view: SchedulerView, candidate: Requests, headroom_fraction: float = 0.0,
                    long_output_tokens: int = 512, max_long_requests: int | None = None) -> bool:
    batch = view.running.append(candidate)
    remaining = batch.predicted_remaining
    if max_long_requests is not None and remaining[-1] >= long_output_tokens:
        if np.count_nonzero(remaining[:-1] >= long_output_tokens) >= max_long_requests:
            return False
    # The candidate needs no blocks for the part of its prefix-cache hit that runs already.
    known = batch.known_tokens.copy()
    known[-1] = max(known[-1] - int(candidate.shared_blocks[0]) * view.block_size, 0)
    peak = future_peak_blocks(known, remaining, view.block_size)
    return peak <= (1.0 - headroom_fraction) * view.num_gpu_blocks


def _last_argmin(values: np.ndarray) -> int:
    """Index of the smallest value, the last one on ties (the most recently admitted)."""
    return values.size - 1 - int(np.argmin(values[::-1]))


def victim_lifo(view: SchedulerView, swaps: np.ndarray) -> int:
    return view.running.size - 1


def _kept_tokens(view: SchedulerView) -> np.ndarray:
    """Per running request, the computed tokens of its blocks that another request holds:
    preempting it keeps them, and it finds them again in the prefix cache."""
    run = view.running
    return np.minimum(run.shared_blocks * view.block_size, run.computed_tokens)


def victim_lcf(view: SchedulerView, swaps: np.ndarray) -> int:
    return _last_argmin(view.running.computed_tokens - _kept_tokens(view))


def victim_cost_aware(view: SchedulerView, swaps: np.ndarray, protect_steps: int = 4) -> int:
    run, costs = view.running, view.costs
    tokens, kept = run.computed_tokens, _kept_tokens(view)
    # A swap copies every computed block; a recompute redoes what the prefix cache lacks.
    cost_ms = np.where(swaps, costs.swap_ms(tokens),
                       costs.recompute_ms(tokens) - np.where(kept > 0, costs.recompute_ms(kept),
                                                             0.0))
    freed_mb = (run.blocks - run.shared_blocks) * view.block_bytes / 1e6
    ms_per_mb = cost_ms / np.maximum(freed_mb, 1e-9)
    protected = run.predicted_remaining <= protect_steps
    if not protected.all():
        ms_per_mb = np.where(protected, np.inf, ms_per_mb)
    return _last_argmin(ms_per_mb)


def swap_never(view: SchedulerView, victims: Requests) -> np.ndarray:
    return np.zeros(victims.size, dtype=bool)


def swap_if_room(view: SchedulerView, victims: Requests) -> np.ndarray:
    return cdiv(victims.computed_tokens, view.block_size) <= view.free_cpu_blocks


def swap_if_cheaper(view: SchedulerView, victims: Requests) -> np.ndarray:
    return view.costs.prefer_swap(victims.computed_tokens) & swap_if_room(view, victims)


def load_never(view: SchedulerView, cached: np.ndarray, loadable: np.ndarray) -> np.ndarray:
    return np.zeros(loadable.size, dtype=bool)


def load_all(view: SchedulerView, cached: np.ndarray, loadable: np.ndarray) -> np.ndarray:
    return np.ones(loadable.size, dtype=bool)


def load_if_cheaper(view: SchedulerView, cached: np.ndarray, loadable: np.ndarray
                    ) -> np.ndarray:
    costs = view.costs
    saved_ms = costs.recompute_ms(cached + loadable) - costs.recompute_ms(cached)
    return costs.swap_in_ms(loadable) <= saved_ms


ADMISSION = {"fcfs": admit_fcfs, "reserve-max": admit_reserve_max, "future-kv": admit_future_kv}
VICTIMS = {"lifo": victim_lifo, "lcf": victim_lcf, "cost-aware": victim_cost_aware}
PREEMPTIONS = {"recompute": swap_never, "swap": swap_if_room, "selector": swap_if_cheaper}
RESUMES = {"recompute": load_never, "swap": load_all, "selector": load_if_cheaper}
REGISTRIES = {"admission": ADMISSION, "victim": VICTIMS, "preemption": PREEMPTIONS,
              "predictor": PREDICTORS}
POLICY_AXES = tuple(REGISTRIES)


@dataclass(frozen=True)
class Knobs:
    """Every keyword a registered policy or predictor takes, with its default."""

    headroom_fraction: float = option(0.0, "future-kv: share of the cache kept free.")
    long_output_tokens: int = option(512, "future-kv: a prediction this long counts as long.")
    max_long_requests: int | None = option(None, "future-kv: long requests running at most.")
    protect_steps: int = option(4, "cost-aware: spare requests predicted to end this soon.")
    noise_sigma: float = option(0.5, "noisy: sigma of the log-normal error.")
    history_quantile: float = option(0.5, "history: quantile of recent outputs.")
    history_window: int = option(1000, "history: finished requests remembered per bucket.")
    seed: int = option(0, "Seed of synthetic workloads, prompts and noisy predictions.")

    def __post_init__(self) -> None:
        if not 0 <= check_finite("headroom_fraction", self.headroom_fraction) < 1:
            raise KvbenchError(f"headroom_fraction must be in [0, 1), got "
                               f"{self.headroom_fraction}")
        for name in ("long_output_tokens", "history_window"):
            check_int(name, getattr(self, name), 1, MAX_TOKENS)
        if self.max_long_requests is not None:
            check_int("max_long_requests", self.max_long_requests, 0, MAX_BLOCKS)
        check_int("protect_steps", self.protect_steps, 0, MAX_TOKENS)
        check_int("seed", self.seed, 0, 2**63 - 1)
        check_finite("noise_sigma", self.noise_sigma, low=0, high=MAX_NOISE_SIGMA)
        if not 0 < check_finite("history_quantile", self.history_quantile, high=1):
            raise KvbenchError(f"history_quantile must be in (0, 1], got {self.history_quantile}")


KNOB_FIELDS = tuple(f.name for f in fields(Knobs))


def bind(fn, knobs: Knobs):
    """`fn` (a registered policy, or a predictor class) with the knobs its signature names."""
    given = {name: getattr(knobs, name) for name in inspect.signature(fn).parameters
             if name in KNOB_FIELDS}
    return functools.partial(fn, **given)


@dataclass(frozen=True)
class PolicySpec:
    """One function per axis by name; `engine` (a named `ReplicaSpec`) when the policy is
    written `...@engine`, else None: the replica's own rules."""

    admission: str = option("fcfs", "fcfs, reserve-max or future-kv.")
    victim: str = option("lifo", "lifo, lcf or cost-aware.")
    preemption: str = option("recompute", "recompute, swap or selector.")
    predictor: str = option("oracle", "oracle, noisy, history or max.")
    engine: str | None = None

    def __post_init__(self) -> None:
        for axis, registry in REGISTRIES.items():
            name = check_name(axis, getattr(self, axis))
            if name not in registry:
                hint = difflib.get_close_matches(name, registry, n=1)
                raise KvbenchError(f"unknown {axis} {'' if axis == 'predictor' else 'policy '}"
                                   f"{name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                   + f"; choose from {', '.join(registry)}")

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        """'future-kv/cost-aware/selector/history[@vllm-legacy]'."""
        policy, at, engine = check_name("policy", text).partition("@")
        parts = [p.strip() for p in policy.split("/")]
        if len(parts) != len(REGISTRIES):
            raise KvbenchError(f"policy {text!r}: write it as admission/victim/preemption/"
                               "predictor[@engine], e.g. future-kv/lifo/recompute/oracle")
        return cls(*parts, engine=engine.strip() if at else None)

    @property
    def name(self) -> str:
        engine = f"@{self.engine}" if self.engine else ""
        return f"{self.admission}/{self.victim}/{self.preemption}/{self.predictor}{engine}"

    def functions(self) -> dict:
        """axis -> the registered function (or predictor class)."""
        return {axis: registry[getattr(self, axis)] for axis, registry in REGISTRIES.items()}
