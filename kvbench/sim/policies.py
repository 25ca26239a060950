"""Scheduling policies, registered by name; any admission, victim and preemption combine.

Each policy is a plain function of a `SchedulerView` (kvbench/sim/view.py: the running requests
in admission order, the cache, the costs) and keyword knobs named like `SimConfig`'s fields, so
the same function serves the simulator and a real engine's scheduler. Adding one is a function
and a registry entry.

Admission (`ADMISSION`): may the head of the waiting queue start now? The engine has already
checked what every policy shares (vLLM V1): a free slot under `max_num_seqs`, token budget left
in this step, GPU blocks free now for the first chunk, and no preemption in this step. A request
is always admitted when nothing is running, so a request that fits the cache alone never waits
forever.

* `fcfs`        nothing more: greedy, in arrival order, as vLLM V1;
* `reserve-max` the blocks for prompt + max_tokens of every running request and the candidate
                fit the cache: never preempts, wastes what requests do not generate;
* `future-kv`   the predicted peak of total KV over the future (`future_peak_blocks`), with the
                candidate, stays within (1 - headroom_fraction) of the cache; optionally at most
                `max_long_requests` requests predicted to generate `long_output_tokens` or more
                run together (they are the ones a wrong prediction hurts most).

Victim (`VICTIMS`): which running request to preempt when one needs a block and none is free:
a position in `view.running` (all running requests in admission order, the one needing the
block included); `swaps` says for each whether the preemption policy would swap it.

* `lifo`        the most recently admitted (vLLM);
* `lcf`         least computed first: fewest tokens in the cache (ties: most recent);
* `cost-aware`  lowest preemption cost (by the preemption mode in force) per MB of KV freed,
                sparing requests predicted to finish within `protect_steps` steps unless all are.

Preemption (`PREEMPTIONS`): for each of some running requests, swap (True) or recompute (False).

* `recompute`   always recompute (vLLM V1);
* `swap`        swap while the CPU swap space has room for the victim's blocks, else recompute;
* `selector`    the cheaper of the two by `CostModel.prefer_swap` (the choice `kvbench select`
                prints), swapping only while the CPU space has room.
"""

from __future__ import annotations

import numpy as np

from kvbench.sim.requests import cdiv
from kvbench.sim.view import Requests, SchedulerView


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
    peak = future_peak_blocks(batch.known_tokens, remaining, view.block_size)
    return peak <= (1.0 - headroom_fraction) * view.num_gpu_blocks


def _last_argmin(values: np.ndarray) -> int:
    """Index of the smallest value, the last one on ties (the most recently admitted)."""
    return values.size - 1 - int(np.argmin(values[::-1]))


def victim_lifo(view: SchedulerView, swaps: np.ndarray) -> int:
    return view.running.size - 1


def victim_lcf(view: SchedulerView, swaps: np.ndarray) -> int:
    return _last_argmin(view.running.computed_tokens)


def victim_cost_aware(view: SchedulerView, swaps: np.ndarray, protect_steps: int = 4) -> int:
    run, costs = view.running, view.costs
    tokens = run.computed_tokens
    cost_ms = np.where(swaps, costs.swap_ms(tokens), costs.recompute_ms(tokens))
    freed_mb = run.blocks * view.block_bytes / 1e6
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


ADMISSION = {"fcfs": admit_fcfs, "reserve-max": admit_reserve_max, "future-kv": admit_future_kv}
VICTIMS = {"lifo": victim_lifo, "lcf": victim_lcf, "cost-aware": victim_cost_aware}
PREEMPTIONS = {"recompute": swap_never, "swap": swap_if_room, "selector": swap_if_cheaper}
