"""Microbenchmark sweeps: KV swap copies, prefill of one decoder layer, decode steps.

Every sweep walks its sizes in increasing order and stops at the first size that runs out of
memory, recording why; the sizes measured before that stand. `on_point(phase, text)` is called
after each point with a live figure for the progress display, and `on_point(phase, text,
start=True)` as a sweep begins, saying what it will measure (a first point can take minutes).

The CUDA paths (pinned swap space, CUDA-event timing, GPU sizes) have not yet run on a GPU: no
GPU was lent to this project so far; the CPU paths are what produced the committed profiles.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from kvbench.calibration.decoder import (
    DecoderLayer,
    LMHead,
    random_hidden,
    rotary_tables,
    torch_dtype,
)
from kvbench.calibration.timing import Timing, measure
from kvbench.models import ModelSpec
from kvbench.ops import (
    attention_config,
    prefill_attention,
    prepare_block_ids,
    swap_in,
    swap_out,
)
from kvbench.ops.kv_copy import ACCESS_BYTES, BlockIds, UnalignedCopyWarning, allocate_kv_cache
from kvbench.ops.prefill_attention import auto_impl as attention_auto_impl


class OnPoint(Protocol):
    def __call__(self, phase: str, text: str, start: bool = False) -> None: ...


MIN_ROTATE, MAX_ROTATE = 8, 256
COLD_BYTES = 512 * 2**20  # weights rotated through per timed layer: several last-level caches


@dataclass
class Sweep:
    """Medians and raw samples of one measured quantity over a list of sizes."""

    sizes: list[int] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    stopped: str | None = None

    def add(self, size: int, timing: Timing) -> None:
        self.sizes.append(size)
        self.timings.append(timing)

    @property
    def median_ms(self) -> np.ndarray:
        return np.array([t.median_ms for t in self.timings])

    @property
    def spread_ms(self) -> np.ndarray:
        return np.array([t.spread_ms for t in self.timings])

    def to_dict(self) -> dict:
        return {"sizes": self.sizes, "median_ms": self.median_ms.tolist(),
                "spread_ms": self.spread_ms.tolist(),
                "samples_ms": [t.samples_ms for t in self.timings], "stopped": self.stopped}


OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory",
                "cannot allocate memory")  # CUDA's, then torch's CPU allocator's (errno 12)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MESSAGES))


def free_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def kv_shape(spec: ModelSpec, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (spec.num_layers, 2, num_blocks, block_size, spec.kv_heads_per_gpu,
            spec.head_dim)


@dataclass
class SwapResult:
    out: dict[str, Sweep]
    into: dict[str, Sweep]
    ceiling_gbps: dict[str, float]
    ceiling_bytes: int

    def round_trip_ms(self, impl: str) -> np.ndarray:
        return self.out[impl].median_ms + self.into[impl].median_ms


def copy_ceiling_gbps(host: torch.Tensor, cache: torch.Tensor, device: str) -> dict[str, float]:
    """One contiguous copy of all of `host` each way, to and from the first bytes of `cache`
    (pinned cudaMemcpy on CUDA, memcpy on CPU): no buffer beyond the swap space itself. The
    cache's values change; they are random data either way."""
    num_bytes = host.numel() * host.element_size()
    device_side = cache.view(-1)[:host.numel()]
    out = measure(lambda: host.copy_(device_side, non_blocking=True), device, reps=10)
    back = measure(lambda: device_side.copy_(host, non_blocking=True), device, reps=10)
    return {"out": num_bytes / out.median_ms / 1e6, "in": num_bytes / back.median_ms / 1e6}


def swap_space(spec: ModelSpec, device: str, block_size: int, max_blocks: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache of 2·max_blocks blocks on `device` and a host swap space of half its size
    (pinned on CUDA), its pages faulted in, as a serving engine preallocates its swap space.
    device="meta" gives the shapes and no memory (the compile gate uses it)."""
    shape = kv_shape(spec, 2 * max_blocks, block_size)
    dtype = torch_dtype(spec)
    cache = allocate_kv_cache(shape[0], shape[2], block_size, shape[4], shape[5], dtype, device)
    host = torch.empty(cache.numel() // 2, dtype=dtype, pin_memory=device == "cuda",
                       device="meta" if device == "meta" else "cpu")  # meta: no memory
    host.fill_(1)  # fault the pages in now, not inside the first timed copy
    return cache, host


def swap_requests(spec: ModelSpec, cache: torch.Tensor, host: torch.Tensor, block_size: int,
                  num_tokens: int, gen: torch.Generator) -> list[tuple[BlockIds, torch.Tensor]]:
    """The requests of `num_tokens` tokens a swap point rotates through: block ids drawn at
    random from the cache (a fragmented cache), checked and uploaded here, outside any timed
    region, each with its own host buffer in the swap space.

    Enough requests that together they outsize the caches, so a small request is not timed out
    of them: swapped KV is cold. Every host buffer starts on a 16-byte boundary (the swap space
    itself is page-aligned), so the Triton copy can make 16-byte accesses on both sides.
    """
    num_blocks = -(-num_tokens // block_size)
    shape = kv_shape(spec, num_blocks, block_size)
    numel = math.prod(shape)
    rotate = int(np.clip(COLD_BYTES / (numel * host.element_size()), MIN_ROTATE, MAX_ROTATE))
    align = ACCESS_BYTES // host.element_size()  # elements per 16 bytes
    offsets = np.linspace(0, host.numel() - numel, rotate).astype(np.int64) // align * align
    return [(prepare_block_ids(cache, torch.randperm(cache.shape[2], generator=gen)[:num_blocks]),
             host[o:o + numel].view(shape)) for o in offsets.tolist()]


def swap_sweep(spec: ModelSpec, device: str, block_size: int, lengths: list[int],
               impls: tuple[str, ...], on_point: OnPoint, seed: int = 0,
               per_block_max_tokens: int | None = None, pool_tokens: int = 0) -> SwapResult:
    """swap_out and swap_in of a request of n tokens, for each impl, at the model's KV shape.

    The request's blocks are drawn at random from a pool twice its size (or twice
    `pool_tokens`), as in a fragmented cache; `per_block` stops at `per_block_max_tokens` when
    given. The swap space is allocated once, outside the timed region (`swap_space`), and each
    timed call moves one prepared request (`swap_requests`): only the copy is timed. A copy
    that could not use 16-byte accesses (UnalignedCopyWarning) stops the sweep: it would
    understate the Triton copy.
    """
    gen = torch.Generator().manual_seed(seed)
    result = SwapResult({i: Sweep() for i in impls}, {i: Sweep() for i in impls}, {}, 0)
    lengths = sorted(lengths)
    while lengths:  # the largest request sizes the cache; drop sizes that do not fit
        max_blocks = -(-max(lengths[-1], pool_tokens) // block_size)
        try:
            cache, host = swap_space(spec, device, block_size, max_blocks)
            break
        except Exception as exc:  # noqa: BLE001 - only out-of-memory shrinks the sweep
            if not is_out_of_memory(exc):
                raise
            cache = host = None
            free_memory(device)
            for sweep in (*result.out.values(), *result.into.values()):
                sweep.stopped = f"out of memory allocating {lengths[-1]} tokens"
            lengths = lengths[:-1]
    if not lengths:
        raise MemoryError("not enough memory for a KV cache of the smallest swap size")
    on_point("swap", f"{len(lengths)} sizes up to n={lengths[-1]}, {', '.join(impls)}",
             start=True)
    for n in lengths:
        reqs = swap_requests(spec, cache, host, block_size, n, gen)
        nbytes = reqs[0][1].numel() * host.element_size()
        for impl in impls:
            if impl == "per_block" and n > (per_block_max_tokens or n):
                continue  # the slow baseline: its trend is clear long before the largest size
            turn = itertools.cycle(reqs)

            def out_once():
                ids, dst = next(turn)
                swap_out(cache, ids, dst=dst, impl=impl)

            def in_once():
                ids, src = next(turn)
                swap_in(src, cache, ids, impl=impl)

            with warnings.catch_warnings():
                warnings.simplefilter("error", UnalignedCopyWarning)
                out_t = measure(out_once, device, budget_ms=300)
                in_t = measure(in_once, device, budget_ms=300)
            result.out[impl].add(n, out_t)
            result.into[impl].add(n, in_t)
            gbps = 2 * nbytes / (out_t.median_ms + in_t.median_ms) / 1e6
            on_point("swap", f"{impl} n={n}: {gbps:.1f} GB/s round trip")
    result.ceiling_bytes = host.numel() * host.element_size()
    result.ceiling_gbps = copy_ceiling_gbps(host, cache, device)
    return result


def cold_layers(spec: ModelSpec, device: str, gen: torch.Generator) -> list[DecoderLayer]:
    """Enough distinct layers that, timed in turn, each finds its weights out of cache.

    A real forward pass streams every layer's weights once; timing one layer again and again
    would find its weights in the last-level cache (tens of MB on a CPU) and run too fast.
    """
    return [DecoderLayer(spec, device, gen) for _ in range(cold_layer_count(spec))]


def cold_layer_count(spec: ModelSpec) -> int:
    """Layers `cold_layers` builds: at least COLD_BYTES of weights, 2 to num_layers."""
    layer_bytes = spec.layer_params / spec.tp * spec.dtype_bytes
    return min(spec.num_layers, max(2, math.ceil(COLD_BYTES / layer_bytes)))


@dataclass
class PrefillResult:
    layer: Sweep
    attention: Sweep
    lm_head_ms: float
    num_layers: int
    attention_impl: str
    attention_config: dict | None  # the Triton kernel's fixed config when it ran

    @property
    def sizes(self) -> list[int]:
        return self.layer.sizes

    @property
    def total_ms(self) -> np.ndarray:
        """Whole-model prefill: every layer, then final norm and LM head for the last token."""
        return self.num_layers * self.layer.median_ms + self.lm_head_ms

    @property
    def total_spread_ms(self) -> np.ndarray:
        return self.num_layers * self.layer.spread_ms


def prefill_sweep(spec: ModelSpec, device: str, lengths: list[int], on_point: OnPoint,
                  seed: int = 0) -> PrefillResult:
    """Prefill of n tokens through one layer of the model's shape (× num_layers), the causal
    attention alone, and the LM head for the last token."""
    on_point("prefill", f"{len(lengths)} sizes up to n={max(lengths)}", start=True)
    gen = torch.Generator().manual_seed(seed)
    layers, head = cold_layers(spec, device, gen), LMHead(spec, device, gen)
    layer_sweep, attn_sweep = Sweep(), Sweep()
    last = random_hidden(1, spec, device, gen)
    head_ms = measure(lambda: head(last), device, reps=10).median_ms
    for n in lengths:
        try:
            x = random_hidden(n, spec, device, gen)
            cos, sin = rotary_tables(n, spec.head_dim, device, x.dtype)
            q, k, v = layers[0]._qkv(x)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            with torch.inference_mode():
                turn = itertools.cycle(layers)
                layer_t = measure(lambda: next(turn).prefill(x, cos, sin), device,
                                  budget_ms=1500)
                attn_t = measure(lambda: prefill_attention(q, k, v, causal=True), device,
                                 budget_ms=500)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory ends a sweep quietly
            if not is_out_of_memory(exc):
                raise
            layer_sweep.stopped = f"out of memory at {n} tokens"
            free_memory(device)
            break
        layer_sweep.add(n, layer_t)
        attn_sweep.add(n, attn_t)
        on_point("prefill", f"n={n}: {spec.num_layers * layer_t.median_ms + head_ms:.1f} ms")
    impl = attention_auto_impl(device)
    config = attention_config(torch_dtype(spec), spec.head_dim).to_dict() if (
        impl == "triton") else None
    return PrefillResult(layer_sweep, attn_sweep, head_ms, spec.num_layers, impl, config)


@dataclass
class DecodeResult:
    batch_size: list[int]
    context_tokens: list[int]
    step_ms: list[float]
    spread_ms: list[float]
    stopped: str | None = None


def decode_sweep(spec: ModelSpec, device: str, batch_sizes: list[int], contexts: list[int],
                 on_point: OnPoint, seed: int = 0) -> DecodeResult:
    """One decode step (one token for each of B sequences at context T): L layers + LM head."""
    on_point("decode", f"{len(batch_sizes) * len(contexts)} points up to B={max(batch_sizes)} "
             f"T={max(contexts)}", start=True)
    gen = torch.Generator().manual_seed(seed)
    kv_gen = torch.Generator(device=device).manual_seed(seed)  # K/V made in place, in dtype
    layers, head = cold_layers(spec, device, gen), LMHead(spec, device, gen)
    hkv, dtype = spec.kv_heads_per_gpu, torch_dtype(spec)
    result = DecodeResult([], [], [], [])
    for t in contexts:
        for b in batch_sizes:
            try:
                x = random_hidden(b, spec, device, gen)
                kc, vc = (torch.empty(b, hkv, t, spec.head_dim, device=device, dtype=dtype)
                          .normal_(generator=kv_gen) for _ in range(2))
                with torch.inference_mode():
                    turn = itertools.cycle(layers)
                    layer_t = measure(lambda: next(turn).decode(x, kc, vc), device,
                                      budget_ms=300)
                    head_t = measure(lambda: head(x), device, budget_ms=100)
            except Exception as exc:  # noqa: BLE001
                if not is_out_of_memory(exc):
                    raise
                result.stopped = f"out of memory at B={b}, T={t}"
                free_memory(device)
                return result
            result.batch_size.append(b)
            result.context_tokens.append(t)
            result.step_ms.append(spec.num_layers * layer_t.median_ms + head_t.median_ms)
            result.spread_ms.append(spec.num_layers * layer_t.spread_ms + head_t.spread_ms)
            on_point("decode", f"B={b} T={t}: {result.step_ms[-1]:.2f} ms")
    return result
