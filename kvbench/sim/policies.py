"""Scheduling policies, registered by name; any admission, victim and preemption combine.

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

Victim (`VICTIMS`): which running request to preempt when one needs a block and none is free.
Candidates are all running requests in admission order, the one needing the block included.

* `lifo`        the most recently admitted (vLLM);
* `lcf`         least computed first: fewest tokens in the cache (ties: most recent);
* `cost-aware`  lowest preemption cost (by the preemption mode in force) per MB of KV freed,
                sparing requests predicted to finish within `protect_steps` steps unless all are.

Preemption (`PREEMPTIONS`): for each victim, swap (True) or recompute (False).

* `recompute`   always recompute (vLLM V1);
* `swap`        swap while the CPU swap space has room for the victim's blocks, else recompute;
* `selector`    the cheaper of the two by `kvbench.selector.select_preemption_strategy` (the
                choice `kvbench select` prints), swapping only while the CPU space has room.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvbench.selector import select_preemption_strategy
from kvbench.sim.requests import cdiv

if TYPE_CHECKING:
    from kvbench.sim.engine import Simulator


def future_peak_blocks(known_tokens: np.ndarray, remaining_tokens: np.ndarray,
                       block_size: int) -> float:
    """Upper bound on the peak KV blocks of requests that each grow one token per step until
    they have generated their remaining tokens, then free their blocks.

    Sorted by remaining tokens r_1 <= r_2 <= ..., the total is highest just before a request
    finishes, at step r_k, when requests k.. are alive and hold sum_{j>=k}(c_j + r_k) tokens;
    ceil(x / block_size) <= x / block_size + 1 per request bounds their blocks.
    """
    order = np.argsort(remaining_tokens, kind="stable")
    remaining = remaining_tokens[order]
    alive = np.arange(remaining.size, 0, -1)
    suffix_tokens = np.cumsum(known_tokens[order][::-1])[::-1]
    return float(((suffix_tokens + alive * remaining) / block_size + alive).max())


def admit_fcfs(sim: Simulator, candidate: int) -> bool:
    return True


def admit_reserve_max(sim: Simulator, candidate: int) -> bool:
    req, ids = sim.requests, np.append(sim.running, candidate)
    reserved = cdiv(req.prompt_tokens[ids] + req.max_tokens[ids], sim.block_size).sum()
    return bool(reserved <= sim.num_gpu_blocks)


def admit_future_kv(sim: Simulator, candidate: int) -> bool:
    req, cfg, ids = sim.requests, sim.config, np.append(sim.running, candidate)
    remaining = req.predicted_remaining_tokens(ids)
    if cfg.max_long_requests is not None and remaining[-1] >= cfg.long_output_tokens:
        if np.count_nonzero(remaining[:-1] >= cfg.long_output_tokens) >= cfg.max_long_requests:
            return False
    peak = future_peak_blocks(req.known_tokens(ids), remaining, sim.block_size)
    return peak <= (1.0 - cfg.headroom_fraction) * sim.num_gpu_blocks


def _last_argmin(values: np.ndarray) -> int:
    """Index of the smallest value, the last one on ties (the most recently admitted)."""
    return values.size - 1 - int(np.argmin(values[::-1]))


def victim_lifo(sim: Simulator, candidates: np.ndarray) -> int:
    return int(candidates[-1])


def victim_lcf(sim: Simulator, candidates: np.ndarray) -> int:
    return int(candidates[_last_argmin(sim.requests.computed_tokens[candidates])])


def victim_cost_aware(sim: Simulator, candidates: np.ndarray) -> int:
    req = sim.requests
    tokens = req.computed_tokens[candidates]
    use_swap = sim.preemption(sim, candidates)
    cost_ms = np.where(use_swap, sim.costs.swap_ms(tokens), sim.costs.recompute_ms(tokens))
    freed_mb = req.gpu_blocks[candidates] * sim.block_bytes / 1e6
    ms_per_mb = cost_ms / np.maximum(freed_mb, 1e-9)
    protected = req.predicted_remaining_tokens(candidates) <= sim.config.protect_steps
    if not protected.all():
        ms_per_mb = np.where(protected, np.inf, ms_per_mb)
    return int(candidates[_last_argmin(ms_per_mb)])


def swap_never(sim: Simulator, victims: np.ndarray) -> np.ndarray:
    return np.zeros(victims.size, dtype=bool)


def swap_if_room(sim: Simulator, victims: np.ndarray) -> np.ndarray:
    filled_blocks = cdiv(sim.requests.computed_tokens[victims], sim.block_size)
    return filled_blocks <= sim.free_cpu_blocks


def swap_if_cheaper(sim: Simulator, victims: np.ndarray) -> np.ndarray:
    choice = select_preemption_strategy(sim.requests.computed_tokens[victims],
                                        sim.selector_config)["strategies"]
    return (np.array(choice) == "swap") & swap_if_room(sim, victims)


ADMISSION = {"fcfs": admit_fcfs, "reserve-max": admit_reserve_max, "future-kv": admit_future_kv}
VICTIMS = {"lifo": victim_lifo, "lcf": victim_lcf, "cost-aware": victim_cost_aware}
PREEMPTIONS = {"recompute": swap_never, "swap": swap_if_room, "selector": swap_if_cheaper}
