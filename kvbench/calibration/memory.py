"""Memory a calibration needs, phase by phase, checked before anything is allocated.

Each phase's peak is estimated from the model's shape (b = bytes per element of the dtype,
h = hidden size, qd = Hq·d and kd = Hkv·d per GPU, I = intermediate size per GPU):

* swap: the KV cache of 2·ceil(n_max / block_size) blocks (n_max·2·kv_bytes_per_token rounded up
  to blocks) on the device and the host swap space of half of it (pinned on CUDA); the
  contiguous-copy ceiling copies between the two, with no buffer of its own;
* weights (prefill and decode each hold their own): `cold_layer_count` decoder layers, the LM
  head (h·V·b), and the float32 draw of the largest matrix beside its copy in the dtype
  (`kvbench.calibration.decoder.random_weight` scales the draw in place: no second one);
* prefill of n tokens: the weights plus n·(24·h + b·(6·h + 12·qd + 10·kd + 4·I)) bytes of
  activations (float32 norms, projections, rotary, the attention's copies, the MLP), twice over:
  the allocator's slack, and the inputs every size keeps for the interleaved rounds;
* decode of B sequences at context T: the weights plus the K and V caches (2·B·T·kd·b, and the
  float32 draw of one), and the scores (B·Hq·T·(2·b + 12)).

Each phase adds `SLACK_BYTES` for what the formulas leave out (allocator caches, index tensors).

On CPU every byte is RAM: `available_bytes` reads MemAvailable from /proc/meminfo, or less where
an address-space limit (`ulimit -v`) leaves this process less. On CUDA the device side is the
GPU's free memory (`torch.cuda.mem_get_info`) and the host side RAM. A plan may use
`USABLE_FRACTION` of what is available. `fit_plan` drops the largest sizes of a phase until its
peak fits, and refuses (`MemoryPlanError`, one line saying what fits) when a phase keeps fewer
points than its fit needs. The process's resident memory when it plans (interpreter, torch) is
already spent: a phase's peak RSS is that plus the phase's estimate (`MemoryPlan.peak_bytes`,
the line `kvbench calibrate` prints). The estimates are upper bounds checked against measured
peaks in tests/calibration/test_memory.py.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvbench.calibration.sweeps import cold_layer_count
from kvbench.errors import KvbenchError
from kvbench.models import ModelSpec

GIB = 2**30
USABLE_FRACTION = 0.8
SLACK_BYTES = 256 * 2**20  # allocator caches, index tensors, library code loaded on first use
MIN_POINTS = {"swap": 5, "prefill": 5, "decode": 4}  # three coefficients and a held-out point


class MemoryPlanError(KvbenchError):
    """Not even the smallest plan fits: the message says what is needed and what is free."""


def available_bytes(device: str) -> dict[str, int]:
    """Free memory now: {'host': RAM, 'device': the GPU's on CUDA, else RAM again}."""
    host = _mem_available()
    if device == "cuda":
        import torch

        return {"host": host, "device": int(torch.cuda.mem_get_info()[0])}
    return {"host": host, "device": host}


def _mem_available() -> int:
    """MemAvailable (Linux: RAM the kernel can hand out without swapping), else free pages; at
    most what this process's address-space limit (RLIMIT_AS, `ulimit -v`) leaves it."""
    free = _kib_field("/proc/meminfo", "MemAvailable")
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    mapped = _kib_field("/proc/self/status", "VmSize")
    if limit != resource.RLIM_INFINITY and mapped is not None:
        free = min(free, max(limit - mapped, 0))
    return free


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS; 0 where /proc is missing)."""
    return _kib_field("/proc/self/status", "VmRSS") or 0


def _kib_field(path: str, name: str) -> int | None:
    """A `name: N kB` line of a /proc file, in bytes; None if the file or line is missing."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _dims(spec: ModelSpec) -> tuple[int, int, int, int, int]:
    hq, hkv = spec.num_heads // spec.tp, max(spec.num_kv_heads // spec.tp, 1)
    return (spec.dtype_bytes, spec.hidden_size, hq * spec.head_dim, hkv * spec.head_dim,
            spec.intermediate_size // spec.tp)


def swap_bytes(spec: ModelSpec, block_size: int, num_tokens: int) -> dict[str, int]:
    """Peak of the swap phase whose largest request has `num_tokens` tokens."""
    cache = 2 * -(-num_tokens // block_size) * block_size * int(spec.kv_bytes_per_token)
    host = cache // 2
    return {"device": cache + SLACK_BYTES, "host": host}


def weight_bytes(spec: ModelSpec) -> int:
    b, h, qd, kd, inter = _dims(spec)
    layer = int(spec.layer_params // spec.tp) * b
    head = h * (spec.vocab_size // spec.tp) * b
    largest = max(h * (spec.vocab_size // spec.tp), h * 2 * inter, h * (qd + 2 * kd))
    return cold_layer_count(spec) * layer + head + 4 * largest + SLACK_BYTES


def prefill_bytes(spec: ModelSpec, num_tokens: int) -> int:
    b, h, qd, kd, inter = _dims(spec)
    per_token = 24 * h + b * (6 * h + 12 * qd + 10 * kd + 4 * inter)
    return weight_bytes(spec) + 2 * num_tokens * per_token


def decode_bytes(spec: ModelSpec, batch_size: int, context_tokens: int) -> int:
    b, h, qd, kd, inter = _dims(spec)
    cached = batch_size * context_tokens * kd * (2 * b + 4)
    scores = batch_size * (spec.num_heads // spec.tp) * context_tokens * (2 * b + 12)
    return prefill_bytes(spec, batch_size) + cached + scores


@dataclass
class MemoryPlan:
    """The sizes each phase will measure, what their peaks need and what was available."""

    swap_sizes: list[int]
    prefill_sizes: list[int]
    decode_batches: list[int]
    decode_contexts: list[int]
    need_bytes: dict[str, dict[str, int]]
    available: dict[str, int]
    notes: list[str] = field(default_factory=list)
    per_block_max_tokens: int | None = None  # the per-block copy's last size (slow baseline)
    device: str = "cpu"
    resident_bytes: int = 0  # what the process held when it planned: every phase adds to it

    def _need(self, phase: str, side: str) -> int:
        """A phase's need on `side`; on CPU both sides are RAM, one pool (as `Budget.fits`)."""
        need = self.need_bytes[phase]
        return need.get(side, 0) if self.device == "cuda" else sum(need.values())

    def peak_bytes(self) -> dict[str, int]:
        """The most each side holds at once: its largest phase, on the host on top of the
        resident memory (on CPU only the host: the RAM)."""
        sides = ("device", "host") if self.device == "cuda" else ("host",)
        return {side: max(self._need(phase, side) for phase in self.need_bytes)
                + (self.resident_bytes if side == "host" else 0) for side in sides}

    def line(self) -> str:
        """What `kvbench calibrate` prints: each side's peak, the phase reaching it, the budget."""
        peaks = []
        for side, peak in self.peak_bytes().items():
            phase = max(self.need_bytes, key=lambda p: self._need(p, side))
            held = f", {gib(self.resident_bytes)} held before" if side == "host" else ""
            peaks.append(f"{'GPU' if side == 'device' else 'RAM'} {gib(peak)} at most "
                         f"({phase}{held})")
        return f"{', '.join(peaks)}; {Budget(self.device, self.available).describe()}"

    def to_dict(self) -> dict:
        return {"available_gib": {k: v / GIB for k, v in self.available.items()},
                "usable_fraction": USABLE_FRACTION,
                "need_gib": {phase: {k: v / GIB for k, v in need.items()}
                             for phase, need in self.need_bytes.items()},
                "resident_gib": self.resident_bytes / GIB,
                "peak_gib": {k: v / GIB for k, v in self.peak_bytes().items()},
                "notes": self.notes}


def gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:,.2f} GiB"


@dataclass(frozen=True)
class Budget:
    """What a plan may use on `device`: `USABLE_FRACTION` of each side's free memory (on CPU
    the device side is the host's RAM: one pool)."""

    device: str
    available: dict[str, int]

    def usable(self, side: str) -> int:
        return int(USABLE_FRACTION * self.available[side])

    def fits(self, need: dict[str, int]) -> bool:
        if self.device == "cuda":
            return all(v <= self.usable(side) for side, v in need.items())
        return sum(need.values()) <= self.usable("host")

    def describe(self) -> str:
        sides = ("device", "host") if self.device == "cuda" else ("host",)
        return ", ".join(f"{gib(self.usable(s))} usable of {gib(self.available[s])} free "
                         f"{'on the GPU' if s == 'device' else 'RAM'}" for s in sides)


def fit_plan(spec: ModelSpec, device: str, block_size: int, swap_sizes: Sequence[int],
             prefill_sizes: Sequence[int], decode_batches: Sequence[int],
             decode_contexts: Sequence[int], available: dict[str, int] | None = None
             ) -> MemoryPlan:
    """Keep the sizes whose peaks fit the budget (`available`, default: free now); drop the
    largest first. MemoryPlanError when a phase would keep fewer than `MIN_POINTS`."""
    budget = Budget(device, available_bytes(device) if available is None else available)
    needs = {"swap": lambda n: swap_bytes(spec, block_size, n),
             "prefill": lambda n: {"device": prefill_bytes(spec, n)},
             "decode": lambda bt: {"device": decode_bytes(spec, *bt)}}
    notes: list[str] = []
    kept = {}
    for phase, sizes in (("swap", sorted(swap_sizes)), ("prefill", sorted(prefill_sizes))):
        kept[phase] = [n for n in sizes if budget.fits(needs[phase](n))]
        if len(kept[phase]) < len(sizes):
            first = sizes[len(kept[phase])]
            notes.append(f"{phase}: sizes from {first} tokens dropped (they need "
                         f"{gib(sum(needs[phase](first).values()))}; {budget.describe()})")
    batches, contexts = sorted(decode_batches), sorted(decode_contexts)
    while batches and contexts and not budget.fits(needs["decode"]((batches[-1], contexts[-1]))):
        dropped = f"context {contexts.pop()}" if len(contexts) > 1 else f"batch {batches.pop()}"
        notes.append(f"decode: {dropped} dropped ({budget.describe()})")
    grid = [(b, t) for t in sorted(decode_contexts) for b in sorted(decode_batches)]
    for phase, count, smallest in (
            ("swap", len(kept["swap"]), sorted(swap_sizes)),
            ("prefill", len(kept["prefill"]), sorted(prefill_sizes)),
            ("decode", len(batches) * len(contexts), sorted(grid, key=lambda bt: bt[0] * bt[1]))):
        if count < min(MIN_POINTS[phase], len(smallest)):
            size = smallest[min(MIN_POINTS[phase], len(smallest)) - 1]
            what = f"B={size[0]}, T={size[1]}" if phase == "decode" else f"{size} tokens"
            raise MemoryPlanError(
                f"not enough memory to calibrate {spec.name} on {device}: {phase} needs "
                f"{gib(sum(needs[phase](size).values()))} for its {MIN_POINTS[phase]} smallest "
                f"points (up to {what}), {budget.describe()}; free memory or pick a smaller "
                "model")
    return MemoryPlan(
        kept["swap"], kept["prefill"], batches, contexts,
        need_bytes={"swap": needs["swap"](kept["swap"][-1]),
                    "prefill": needs["prefill"](kept["prefill"][-1]),
                    "decode": needs["decode"]((batches[-1], contexts[-1]))},
        available=budget.available, notes=notes, device=device,
        resident_bytes=resident_bytes())
