"""Requests as a struct of arrays: one numpy array per attribute, indexed by request id.

Token bookkeeping follows vLLM V1: a request's `known` tokens are its prompt plus the tokens it
has generated; `computed_tokens` of them have their KV in the cache (on the GPU, or on the CPU
while swapped). A step schedules `known - computed` tokens or a chunk of them; when all known
tokens are computed the step samples one new token. A recompute preemption drops the KV
(`computed_tokens = 0`), and the resumed request prefills prompt and generated tokens again.
"""

from __future__ import annotations

import numpy as np

from kvbench.sim.workloads import Workload

PENDING, WAITING, RUNNING, SWAPPED, FINISHED, REJECTED, LOADING = range(7)
# loading: write-through offloading loads its KV from the host before it runs (vLLM's
# WAITING_FOR_REMOTE_KVS), holding its GPU blocks
STATE_NAMES = ("pending", "waiting", "running", "swapped", "finished", "rejected", "loading")


def cdiv(a, b):
    """Ceiling division for ints or int arrays."""
    return -(-a // b)


class RequestTable:
    """All per-request state of one simulation (see the module docstring)."""

    def __init__(self, workload: Workload) -> None:
        n = workload.num_requests
        self.size = n
        self.arrival_s = workload.arrival_s
        self.prompt_tokens = workload.prompt_tokens
        self.output_tokens = workload.output_tokens.copy()  # capped by max_model_len
        self.max_tokens = workload.max_tokens
        self.max_total_tokens = self.prompt_tokens + self.max_tokens  # the most KV it can need
        self.state = np.full(n, PENDING, dtype=np.int8)
        self.generated_tokens = np.zeros(n, dtype=np.int64)
        self.computed_tokens = np.zeros(n, dtype=np.int64)
        self.gpu_blocks = np.zeros(n, dtype=np.int64)
        self.cpu_blocks = np.zeros(n, dtype=np.int64)
        self.predicted_output_tokens = np.zeros(n, dtype=np.int64)
        # Async scheduling: tokens sampled by a step in flight, not yet received (vLLM's
        # num_output_placeholders); they count as known when scheduling.
        self.placeholders = np.zeros(n, dtype=np.int64)
        self.cached_blocks = np.zeros(n, dtype=np.int64)  # blocks registered in the prefix cache
        self.prefix_hit_tokens = np.zeros(n, dtype=np.int64)  # found in the cache on admission
        # What answers `Requests.shared_blocks` while the simulation runs, when requests may
        # share blocks: the KV cache manager (`shared_blocks(ids)`); None: nothing is shared.
        self.sharing = None
        self.prefix_query_tokens = np.zeros(n, dtype=np.int64)  # looked up there on admission
        # Tokens whose KV a recompute preemption threw away: computing them again is waste.
        self.recompute_target_tokens = np.zeros(n, dtype=np.int64)
        self.first_token_s = np.full(n, np.nan)
        self.finish_s = np.full(n, np.nan)
        self.num_preemptions = np.zeros(n, dtype=np.int64)
        self.num_swaps = np.zeros(n, dtype=np.int64)
        self.recompute_tokens = np.zeros(n, dtype=np.int64)
        self.wasted_flops = np.zeros(n)
        self.swapped_bytes = np.zeros(n)
        # A swapped victim: the tokens its swap-out copies, and those it may load back once
        # the copy is reported done (0 before: it recomputes if resumed then).
        self.swap_tokens = np.zeros(n, dtype=np.int64)
        self.loadable_tokens = np.zeros(n, dtype=np.int64)
        self.loaded_tokens = np.zeros(n, dtype=np.int64)
        self.swap_fallbacks = np.zeros(n, dtype=np.int64)
        # Write-through offloading: tokens copied to the host as computed, and whether a running
        # request is amid a prefill (vLLM's _inflight_prefills, whose blocks a load leaves free).
        self.stored_tokens = np.zeros(n, dtype=np.int64)
        self.prefilling = np.zeros(n, dtype=bool)
        self.reject_reason: dict[int, str] = {}

    def known_tokens(self, ids):
        return self.prompt_tokens[ids] + self.generated_tokens[ids]

    def predicted_remaining_tokens(self, ids):
        """Tokens still to generate by the prediction, at least 1 for an unfinished request."""
        return np.maximum(self.predicted_output_tokens[ids] - self.generated_tokens[ids], 1)

    def view(self, ids: np.ndarray, reads: set[str] | None = None) -> TableRows:
        """The policies' view of requests `ids`, in that order; `reads` collects the names of
        the columns read from it."""
        return TableRows(self, ids, set() if reads is None else reads)


# Columns no step changes: a policy that reads only these (and the batch's size) decides the
# same for as long as the batch and the candidate stay the same.
STATIC_COLUMNS = frozenset({"max_total_tokens"})


class TableRows:
    """The `Requests` (kvbench/sim/view.py) of some rows of a `RequestTable`, each column read
    when a policy first asks for it: the simulator builds one per admission check and victim
    choice, and most policies read two of the five columns. Used right away, before the table
    changes."""

    COLUMNS = {
        "computed_tokens": lambda table, ids: table.computed_tokens[ids],
        "known_tokens": RequestTable.known_tokens,
        "blocks": lambda table, ids: table.gpu_blocks[ids],
        "predicted_remaining": RequestTable.predicted_remaining_tokens,
        "max_total_tokens": lambda table, ids: table.max_total_tokens[ids],
        "shared_blocks": lambda table, ids: (np.zeros(ids.size, dtype=np.int64)
                                             if table.sharing is None
                                             else table.sharing.shared_blocks(ids)),
    }

    def __init__(self, table: RequestTable, ids: np.ndarray, reads: set[str]) -> None:
        self.table, self.ids, self.reads = table, ids, reads

    def __getattr__(self, name: str) -> np.ndarray:
        """A column, read on first use and kept (later reads find the attribute)."""
        if name not in self.COLUMNS:
            raise AttributeError(name)
        self.reads.add(name)
        column = self.COLUMNS[name](self.table, self.ids)
        setattr(self, name, column)
        return column

    @property
    def size(self) -> int:
        return self.ids.size

    def append(self, other: TableRows) -> TableRows:
        return TableRows(self.table, np.concatenate([self.ids, other.ids]), self.reads)
