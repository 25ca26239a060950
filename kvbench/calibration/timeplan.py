"""How long a calibration will take, estimated before it starts, and the sizes that fit a budget.

The memory plan (kvbench/calibration/memory.py) says what fits; this says how long it takes. A
second of probes on the device (`probe`): matrix products of the model's shape in its dtype and
in float32 (FLOP rates), causal attention of `ATTENTION_TOKENS` tokens, one swap out and in of a
small request with each copy impl (time per block), a streaming copy (memory bandwidth) and a
random draw (what building weights and caches costs per element). `estimate` then counts the
calls each sweep makes (kvbench/calibration/sweeps.py: warm-up and first look per point; decode
points their full repetitions; kvbench/calibration/schedule.py: at least MIN_ROUNDS interleaved
rounds, else up to the phase's budget) and prices them from the probes.

`fit_budget` shrinks the plan until its estimate fits `PLAN_SHARE` of the budget (`BUDGET_S`,
the command's wall-time target: imports, probes and writing take the rest, and an estimate errs):
the most expensive phase first, the largest
token count halved (the grid keeps its number of points), decode's largest context then batch
dropped, then the interleaved budget halved; never below what a fit needs. A plan whose smallest
form would still take longer than `REFUSE_S` is refused before anything long starts
(TimePlanError, one line). The estimates are checked against the phases' measured seconds, which
every profile records beside them (`extra.time_plan`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kvbench.calibration.dtype import PROBE_SLOW_MS, product_dims
from kvbench.calibration.memory import MIN_POINTS, MemoryPlan
from kvbench.calibration.plans import geometric_sizes
from kvbench.calibration.schedule import EXTRA_SHARE, MAX_ROUNDS, MIN_ROUNDS
from kvbench.calibration.sweeps import cold_layer_count, kv_shape
from kvbench.calibration.timing import FIRST_LOOK_REPS, measure
from kvbench.errors import KvbenchError
from kvbench.models import ModelSpec
from kvbench.ops import prefill_attention, prepare_block_ids, swap_in, swap_out
from kvbench.ops.dtypes import torch_dtype
from kvbench.ops.kv_copy import allocate_kv_cache

BUDGET_S = {True: 90.0, False: 600.0}  # --quick, full: the command's wall-time target
PLAN_SHARE = 0.8  # of it the sweeps' estimate may take (imports, probes, writing; estimate error)
REFUSE_S = {True: 600.0, False: 3600.0}  # the smallest plan over this: refused
MIN_SPAN = {"swap": 64, "prefill": 8}  # the largest size stays at least this many times the least
MIN_INTERLEAVE_S = 1.0
PROBE_ROWS, PROBE_DIM = 256, 1024  # the rate probe: [rows, h] x [h, I], h and I capped
ATTENTION_TOKENS = 512
SWAP_PROBE_BYTES = 32 * 2**20  # the swap probe's request at most
STREAM_BYTES = 64 * 2**20
RANDN_ELEMENTS = 2**22
FIXED_S = 3.0  # machine checks before and after, fits, writing the profile and its plot
DECODE_RETRY = 1.5  # a decode point noisier than 10% is measured again with twice the reps


class TimePlanError(KvbenchError):
    """Even the smallest plan takes too long: the message says how long and what to do."""


@dataclass(frozen=True)
class Probes:
    """What the device does per unit, measured in about a second."""

    tflops: dict[str, float]  # matrix products: the calibration dtype and float32
    attention_ms: float  # causal attention of ATTENTION_TOKENS tokens, all of one GPU's heads
    swap_ms_per_block: dict[str, float]  # per impl: one swap out plus one swap in, per block
    stream_gbps: float  # a large copy: bytes read + written per second / 1e9
    randn_ns: float  # per float32 element drawn (weights, caches)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _ms(fn, device: str, reps: int = 3) -> float:
    """Median ms of `fn`; a first call slower than PROBE_SLOW_MS is its own only sample (an
    emulated dtype must not make the probes slow)."""
    first = measure(fn, device, warmup=0, reps=1, max_rel_spread=np.inf).median_ms
    if first > PROBE_SLOW_MS:
        return first
    return measure(fn, device, warmup=0, reps=reps, max_rel_spread=np.inf).median_ms


def probe(spec: ModelSpec, device: str, block_size: int, impls: tuple[str, ...]) -> Probes:
    """The probes `estimate` prices a plan with (about a second on a CPU)."""
    gen = torch.Generator(device=device).manual_seed(0)
    k, n = product_dims(spec, PROBE_DIM)
    tflops = {}
    for name in dict.fromkeys((spec.dtype, "float32")):
        dtype = torch_dtype(name)
        a = torch.randn(PROBE_ROWS, k, device=device, generator=gen).to(dtype)
        b = torch.randn(k, n, device=device, generator=gen).to(dtype)
        tflops[name] = 2 * PROBE_ROWS * k * n / _ms(lambda: a @ b, device) / 1e9
    dtype = torch_dtype(spec.dtype)
    hq, hkv = spec.num_heads // spec.tp, spec.kv_heads_per_gpu
    q = torch.randn(ATTENTION_TOKENS, hq, spec.head_dim, device=device, generator=gen).to(dtype)
    kv = torch.randn(ATTENTION_TOKENS, hkv, spec.head_dim, device=device,
                     generator=gen).to(dtype)
    attention_ms = _ms(lambda: prefill_attention(q, kv, kv, causal=True), device)
    block_bytes = block_size * spec.kv_bytes_per_token
    blocks = int(np.clip(SWAP_PROBE_BYTES // block_bytes, 1, 64))
    shape = kv_shape(spec, 2 * blocks, block_size)
    cache = allocate_kv_cache(shape[0], shape[2], block_size, shape[4], shape[5], dtype, device)
    ids = prepare_block_ids(cache, torch.arange(0, 2 * blocks, 2))
    host = swap_out(cache, ids, impl="torch")
    per_block = {impl: _ms(lambda: (swap_out(cache, ids, dst=host, impl=impl),
                                    swap_in(host, cache, ids, impl=impl)), device) / blocks
                 for impl in impls}
    src = torch.empty(STREAM_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    stream_gbps = 2 * STREAM_BYTES / _ms(lambda: dst.copy_(src), device) / 1e6
    randn_ns = _ms(lambda: torch.randn(RANDN_ELEMENTS, device=device, generator=gen),
                   device) * 1e6 / RANDN_ELEMENTS
    return Probes(tflops, attention_ms, per_block, stream_gbps, randn_ns)


@dataclass
class Sizes:
    """The sizes a calibration will measure and its interleaved budgets (seconds per phase)."""

    swap: list[int]
    prefill: list[int]
    decode_batches: list[int]
    decode_contexts: list[int]
    per_block_max_tokens: int | None
    interleave_s: dict[str, float]

    @classmethod
    def of(cls, memory_plan: MemoryPlan, interleave_s: dict[str, float]) -> Sizes:
        return cls(list(memory_plan.swap_sizes), list(memory_plan.prefill_sizes),
                   list(memory_plan.decode_batches), list(memory_plan.decode_contexts),
                   memory_plan.per_block_max_tokens, dict(interleave_s))

    def describe(self, phase: str) -> str:
        if phase == "decode":
            return f"{len(self.decode_batches) * len(self.decode_contexts)} points (B " \
                   f"{self.decode_batches[0]}-{self.decode_batches[-1]}, T " \
                   f"{self.decode_contexts[0]}-{self.decode_contexts[-1]})"
        sizes = getattr(self, phase)
        return f"{len(sizes)} sizes {sizes[0]}-{sizes[-1]} tokens"


def _interleaved_s(round_s: float, budget_s: float) -> float:
    """kvbench.calibration.schedule.interleave: MIN_ROUNDS to MAX_ROUNDS rounds in 70% of the
    budget, then extra rounds for noisy points while the budget lasts (at most as many again)."""
    rounds = np.clip((1 - EXTRA_SHARE) * budget_s / max(round_s, 1e-9), MIN_ROUNDS, MAX_ROUNDS)
    main = float(rounds) * round_s
    return max(main, min(budget_s, main + MAX_ROUNDS * round_s))


def _timed_calls(call_s: float, budget_s: float, reps: int = 5, warmup: int = 2) -> float:
    """`measure(..., budget_ms=...)` outside a recording: warm-up, then reps cut to the budget."""
    return (warmup + max(3, min(reps, int(budget_s / max(call_s, 1e-9))))) * call_s


def estimate(spec: ModelSpec, block_size: int, sizes: Sizes, probes: Probes,
             impls: tuple[str, ...]) -> dict[str, float]:
    """Seconds each phase of `calibrate` will take with `sizes` on the probed device."""
    first_look = 2 + FIRST_LOOK_REPS  # warm-up and first look of a recorded point
    rate = probes.tflops[spec.dtype] * 1e12
    stream = probes.stream_gbps * 1e9
    b = spec.dtype_bytes
    h, vocab, kd = spec.hidden_size, spec.vocab_size // spec.tp, spec.kv_heads_per_gpu * \
        spec.head_dim
    layer_params = spec.layer_params / spec.tp
    weights_s = (cold_layer_count(spec) * layer_params + h * vocab) * probes.randn_ns * 1e-9

    blocks = [-(-n // block_size) for n in sizes.swap]
    best = min(probes.swap_ms_per_block[i] for i in impls) / 1e3
    swap_calls = sum(first_look * probes.swap_ms_per_block[i] / 1e3 * nb
                     for nb, n in zip(blocks, sizes.swap) for i in impls
                     if i != "per_block" or n <= (sizes.per_block_max_tokens or n))
    space = 2 * blocks[-1] * block_size * spec.kv_bytes_per_token  # cache, drawn; host, filled
    swap_s = (space / b * probes.randn_ns * 1e-9 + 1.5 * space / stream + swap_calls
              + _interleaved_s(best * sum(blocks), sizes.interleave_s["swap"])
              + 24 * space / 2 / stream)  # the ceiling: 2 x (2 + 10) copies of the swap space

    def layer_s(n: int) -> float:
        elementwise = n * (20 * h + 8 * spec.intermediate_size / spec.tp) * b / stream
        return 2 * n * layer_params / rate + attention_s(n) + elementwise

    def attention_s(n: int) -> float:
        return probes.attention_ms / 1e3 * (n / ATTENTION_TOKENS) ** 2

    def head_s(rows: int) -> float:
        return max(h * vocab * b / stream, 2 * rows * h * vocab / rate)

    prefill_s = (weights_s + 12 * head_s(1)
                 + sum((first_look + 1) * layer_s(n) + first_look * attention_s(n)
                       for n in sizes.prefill)
                 + _interleaved_s(sum(layer_s(n) + attention_s(n) for n in sizes.prefill),
                                  sizes.interleave_s["prefill"]))
    decode_s = weights_s
    for t in sizes.decode_contexts:
        for batch in sizes.decode_batches:
            step = max(layer_params * b / stream, 2 * batch * layer_params / rate) \
                + 2 * batch * t * kd * b / stream + 4 * batch * t * spec.num_heads * 4 / stream
            decode_s += (2 * batch * t * kd * probes.randn_ns * 1e-9
                         + DECODE_RETRY * (_timed_calls(step, 0.3)
                                           + _timed_calls(head_s(batch), 0.1)))
    return {"swap": swap_s, "prefill": prefill_s, "decode": decode_s, "fixed": FIXED_S}


def _shrink(sizes: Sizes, phase: str) -> bool:
    """One step smaller for `phase`, in place; False when it is at its least."""
    if phase in ("swap", "prefill"):
        points = getattr(sizes, phase)
        lo, hi = points[0], points[-1]
        if hi // 2 >= lo * MIN_SPAN[phase]:
            smaller = geometric_sizes(lo, hi // 2, len(points))
            if len(smaller) >= MIN_POINTS[phase]:
                setattr(sizes, phase, smaller)
                if phase == "swap" and sizes.per_block_max_tokens:
                    sizes.per_block_max_tokens = min(sizes.per_block_max_tokens, smaller[-1])
                return True
    if phase == "decode":
        batches, contexts = sizes.decode_batches, sizes.decode_contexts
        for kept, other in ((contexts, batches), (batches, contexts)):
            if len(kept) > 1 and (len(kept) - 1) * len(other) >= MIN_POINTS["decode"]:
                kept.pop()
                return True
    if sizes.interleave_s.get(phase, 0) > MIN_INTERLEAVE_S:
        sizes.interleave_s[phase] = max(MIN_INTERLEAVE_S, sizes.interleave_s[phase] / 2)
        return True
    return False


def _changes(before: Sizes, after: Sizes) -> list[str]:
    """What `fit_budget` cut, phase by phase."""
    changes = [f"{phase} {before.describe(phase)} -> {after.describe(phase)}"
               for phase in ("swap", "prefill", "decode")
               if before.describe(phase) != after.describe(phase)]
    return changes + [f"{phase} interleaved rounds {before.interleave_s[phase]:g} s -> {s:g} s"
                      for phase, s in after.interleave_s.items()
                      if s != before.interleave_s[phase]]


def fmt_s(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


@dataclass
class TimePlan:
    """The sizes a calibration measures, each phase's estimated seconds, and what was cut."""

    sizes: Sizes
    estimate_s: dict[str, float]
    budget_s: float
    quick: bool
    probes: Probes
    shrunk: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(self.estimate_s.values())

    @property
    def fits(self) -> bool:
        """The sweeps' estimate within PLAN_SHARE of the budget."""
        return self.total_s <= PLAN_SHARE * self.budget_s

    def memory_plan(self, base: MemoryPlan) -> MemoryPlan:
        """`base` with this plan's sizes."""
        s = self.sizes
        return dataclasses.replace(base, swap_sizes=s.swap, prefill_sizes=s.prefill,
                                   decode_batches=s.decode_batches,
                                   decode_contexts=s.decode_contexts,
                                   per_block_max_tokens=s.per_block_max_tokens)

    def lines(self) -> list[str]:
        """What `kvbench calibrate` prints before it measures."""
        phases = ", ".join(f"{p} {fmt_s(self.estimate_s[p])} ({self.sizes.describe(p)})"
                           for p in ("swap", "prefill", "decode"))
        mode = "--quick" if self.quick else "a full run"
        over = "" if self.fits else \
            ", OVER it even at its smallest plan: expect it to take that long"
        return ([f"about {fmt_s(self.total_s)} of sweeps, for a {fmt_s(self.budget_s)} target "
                 f"for {mode}{over}: {phases}"]
                + [f"shrunk to fit the budget: {'; '.join(self.shrunk)}"] * bool(self.shrunk))

    def to_dict(self) -> dict:
        return {"budget_s": self.budget_s, "estimate_s": self.estimate_s,
                "shrunk": self.shrunk, "probes": self.probes.to_dict(),
                "interleave_s": self.sizes.interleave_s}


def fit_budget(spec: ModelSpec, device: str, block_size: int, memory_plan: MemoryPlan,
               interleave_s: dict[str, float], quick: bool, impls: tuple[str, ...],
               probes: Probes | None = None, budget_s: float | None = None) -> TimePlan:
    """The memory plan's sizes, shrunk until the estimate fits PLAN_SHARE of `budget_s` (default
    BUDGET_S[quick]); TimePlanError when even the smallest plan would exceed REFUSE_S[quick]."""
    probes = probe(spec, device, block_size, impls) if probes is None else probes
    budget_s = BUDGET_S[quick] if budget_s is None else budget_s
    sizes = Sizes.of(memory_plan, interleave_s)
    estimate_s = estimate(spec, block_size, sizes, probes, impls)
    stuck: set[str] = set()
    while sum(estimate_s.values()) > PLAN_SHARE * budget_s and len(stuck) < 3:
        phase = max((p for p in ("swap", "prefill", "decode") if p not in stuck),
                    key=estimate_s.__getitem__)
        if _shrink(sizes, phase):
            estimate_s = estimate(spec, block_size, sizes, probes, impls)
        else:
            stuck.add(phase)
    plan = TimePlan(sizes, estimate_s, budget_s, quick, probes,
                    _changes(Sizes.of(memory_plan, interleave_s), sizes))
    if plan.total_s > REFUSE_S[quick]:
        parts = ", ".join(f"{p} {fmt_s(s)}" for p, s in estimate_s.items() if p != "fixed")
        raise TimePlanError(
            f"calibrating {spec.name} ({spec.dtype}) on {device} would take about "
            f"{fmt_s(plan.total_s)} even at its smallest plan ({parts}), over the "
            f"{fmt_s(REFUSE_S[quick])} bound for {'--quick' if quick else 'a full run'}: pick a "
            "smaller model" + (" or a GPU" if device == "cpu" else ""))
    return plan



class PhaseClock:
    """Seconds each phase of a calibration took, as laps (recorded beside the estimates)."""

    def __init__(self) -> None:
        self.start, self.seconds = time.perf_counter(), {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase], self.start = now - self.start, now
