"""What a scheduler did, step by step: the record two engines are compared on.

A step is one forward pass. For each step the log holds the batch in the engine's order (request
index, tokens scheduled), and, as events tagged with their step, the requests preempted while
scheduling it, the requests that finished with its output (in the order the engine reports
them), the prefix-cache hit of each request admitted in it (tokens found in the cache,
hits > 0 only), the victims whose KV was swapped to host memory while scheduling it, and the
tokens each request admitted in it loaded back from host memory (a swapped victim resuming;
under write-through offloading, a request that starts its load in the step and runs later).
Request indices are positions in the `Workload`.

The log is columnar (numpy), so a whole-trace run of a few hundred thousand steps stays small
and two logs compare in vectorized time: `first_difference(a, b)` names the first step where
they part, in one line.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import numpy as np

# Event streams, each a `<name>_step` and a `<name>_request` column (`cached` and `loaded` add
# `<name>_tokens`); their order within a step is the engine's.
EVENTS = ("preempted", "finished", "cached", "swapped", "loaded")
TOKEN_EVENTS = ("cached", "loaded")


@dataclass(frozen=True)
class StepLog:
    """A run's steps; build with `StepLogBuilder`. See the module docstring."""

    engine: str  # who produced it, e.g. "vllm 0.32.0 (Scheduler)"
    time_s: np.ndarray  # when the step's batch starts (a step with no tokens: when decided)
    batch_offsets: np.ndarray  # step s's batch is batch_request[offsets[s]:offsets[s + 1]]
    batch_request: np.ndarray
    batch_tokens: np.ndarray
    preempted_step: np.ndarray
    preempted_request: np.ndarray
    finished_step: np.ndarray
    finished_request: np.ndarray
    cached_step: np.ndarray
    cached_request: np.ndarray
    cached_tokens: np.ndarray
    swapped_step: np.ndarray
    swapped_request: np.ndarray
    loaded_step: np.ndarray
    loaded_request: np.ndarray
    loaded_tokens: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.time_s.size)

    @property
    def num_tokens(self) -> int:
        """Tokens computed (scheduled) over the run, prefill and decode."""
        return int(self.batch_tokens.sum())

    @property
    def num_preemptions(self) -> int:
        return int(self.preempted_request.size)

    @property
    def prefix_hit_tokens(self) -> int:
        return int(self.cached_tokens.sum())

    def batch(self, step: int) -> list[tuple[int, int]]:
        """Step `step`'s batch as (request, tokens) pairs, in the engine's order."""
        lo, hi = self.batch_offsets[step], self.batch_offsets[step + 1]
        return list(zip(self.batch_request[lo:hi].tolist(), self.batch_tokens[lo:hi].tolist()))

    def events(self, name: str, step: int) -> list[int]:
        """Requests of event stream `name` (`EVENTS`) at `step`."""
        steps = getattr(self, f"{name}_step")
        lo, hi = np.searchsorted(steps, [step, step + 1])
        return getattr(self, f"{name}_request")[lo:hi].tolist()

    def summary(self) -> dict:
        return {"engine": self.engine, "num_steps": self.num_steps,
                "num_tokens": self.num_tokens, "num_preemptions": self.num_preemptions,
                "num_preempted_requests": int(np.unique(self.preempted_request).size),
                "num_finished": int(self.finished_request.size),
                "prefix_hit_tokens": self.prefix_hit_tokens,
                "num_swapped": int(self.swapped_request.size),
                "loaded_tokens": int(self.loaded_tokens.sum()),
                "end_s": float(self.time_s[-1]) if self.num_steps else 0.0}


@dataclass
class StepLogBuilder:
    """Appends steps and events (events may arrive after their step: async scheduling)."""

    engine: str
    _time_s: array = field(default_factory=lambda: array("d"))
    _offsets: array = field(default_factory=lambda: array("q", [0]))
    _columns: dict = field(default_factory=lambda: {
        name: array("q") for name in ("batch_request", "batch_tokens", *(
            f"{event}_{column}" for event in EVENTS for column in (
                ("step", "request", "tokens") if event in TOKEN_EVENTS else ("step", "request"))))})

    @property
    def num_steps(self) -> int:
        return len(self._time_s)

    def add_step(self, time_s: float, requests: list[int], tokens: list[int]) -> int:
        """Record a step's batch; returns its index, for events reported later."""
        self._time_s.append(time_s)
        self._columns["batch_request"].extend(requests)
        self._columns["batch_tokens"].extend(tokens)
        self._offsets.append(len(self._columns["batch_request"]))
        return len(self._time_s) - 1

    def add_events(self, name: str, step: int, requests: list[int],
                   tokens: list[int] | None = None) -> None:
        self._columns[f"{name}_step"].extend([step] * len(requests))
        self._columns[f"{name}_request"].extend(requests)
        if tokens is not None:
            self._columns[f"{name}_tokens"].extend(tokens)

    def build(self) -> StepLog:
        cols = {name: np.frombuffer(col, dtype=np.int64).copy()
                for name, col in self._columns.items()}
        for name in EVENTS:  # stable: keeps the engine's order within a step
            order = np.argsort(cols[f"{name}_step"], kind="stable")
            for key in [k for k in cols if k.startswith(f"{name}_")]:
                cols[key] = cols[key][order]
        return StepLog(engine=self.engine, time_s=np.frombuffer(self._time_s).copy(),
                       batch_offsets=np.frombuffer(self._offsets, dtype=np.int64).copy(),
                       **cols)


def _first_csr_difference(a_offsets, a_cols, b_offsets, b_cols) -> int | None:
    """First step whose slice differs in size or in any column, over the common steps."""
    n = min(a_offsets.size, b_offsets.size) - 1
    sizes_differ = np.flatnonzero(np.diff(a_offsets[:n + 1]) != np.diff(b_offsets[:n + 1]))
    limit = int(sizes_differ[0]) if sizes_differ.size else n
    end = int(a_offsets[limit])  # offsets agree on steps before `limit`
    mismatch = np.zeros(end, dtype=bool)
    for a, b in zip(a_cols, b_cols):
        mismatch |= a[:end] != b[:end]
    where = np.flatnonzero(mismatch)
    if where.size:
        return int(np.searchsorted(a_offsets, where[0], side="right") - 1)
    return limit if limit < n else None


def _events_csr(log: StepLog, name: str, num_steps: int) -> np.ndarray:
    return np.searchsorted(getattr(log, f"{name}_step"), np.arange(num_steps + 1))


def first_difference(a: StepLog, b: StepLog, times: bool = True) -> str | None:
    """None if the two logs agree step for step, else one line on the first step that differs
    (`times=False`: in what they schedule, whenever each step started)."""
    n = min(a.num_steps, b.num_steps)
    candidates = {}
    step = _first_csr_difference(a.batch_offsets, (a.batch_request, a.batch_tokens),
                                 b.batch_offsets, (b.batch_request, b.batch_tokens))
    if step is not None:
        candidates["batch"] = step
    for name in EVENTS:
        cols = ("request", "tokens") if name in TOKEN_EVENTS else ("request",)
        step = _first_csr_difference(
            _events_csr(a, name, n), [getattr(a, f"{name}_{c}") for c in cols],
            _events_csr(b, name, n), [getattr(b, f"{name}_{c}") for c in cols])
        if step is not None:
            candidates[name] = step
    times_differ = np.flatnonzero(~np.isclose(a.time_s[:n], b.time_s[:n], rtol=1e-12,
                                              atol=1e-9))
    if times and times_differ.size:
        candidates["time"] = int(times_differ[0])
    if not candidates:
        if a.num_steps == b.num_steps:
            return None
        longer = a if a.num_steps > b.num_steps else b
        return (f"{a.engine} ran {a.num_steps} steps, {b.engine} {b.num_steps}; they agree on "
                f"the first {n}, then {longer.engine} schedules {longer.batch(n)[:4]}...")
    step = min(candidates.values())
    line = (f"step {step} ({a.engine} at {a.time_s[step]:.6f} s, {b.engine} at "
            f"{b.time_s[step]:.6f} s)")
    batch_a, batch_b = a.batch(step), b.batch(step)
    if batch_a != batch_b:
        pos = next((i for i, (x, y) in enumerate(zip(batch_a, batch_b)) if x != y),
                   min(len(batch_a), len(batch_b)))
        line += (f": batch of {len(batch_a)} vs {len(batch_b)} requests differs at position "
                 f"{pos}: {a.engine} {_entry(batch_a, pos)}, {b.engine} {_entry(batch_b, pos)}")
    for name in EVENTS:
        ev_a, ev_b = a.events(name, step), b.events(name, step)
        if ev_a != ev_b:
            line += f"; {name}: {a.engine} {ev_a[:8]}, {b.engine} {ev_b[:8]}"
    return line


def _entry(batch: list[tuple[int, int]], pos: int) -> str:
    return f"request {batch[pos][0]} x{batch[pos][1]} tokens" if pos < len(batch) else "nothing"
