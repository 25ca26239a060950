"""Causal prefill attention forward over one sequence or a packed variable-length batch.

    q [n, Hq, d], k and v [n, Hkv, d], Hq a multiple of Hkv (query head h reads KV head
    h // (Hq / Hkv)); sequence s is tokens cu_seqlens[s] .. cu_seqlens[s+1] (int32, as in
    flash-attn's varlen API; None: one sequence of n tokens).
    out[t, h] = Σ_j softmax_j(q[t, h] · k[j, h'] · sm_scale) v[j, h'] over the keys j of t's
    sequence, j ≤ t when causal; sm_scale defaults to 1/√d.

Impls: the registry `ATTENTION_IMPLS` {name: Impl} (`kvbench.ops.registry`);
`attention_impls(device)` lists those that run on a device.
  "triton"  FlashAttention-2 kernel (`kvbench.kernels.prefill_attention`) at one fixed config
            per (target, dtype, head_dim) (`attention_config`); head_dim 16-256; on CPU
            tensors only under TRITON_INTERPRET=1. Option: config (an `AttentionConfig`).
  "torch"   torch's scaled_dot_product_attention, one call per sequence.
  "flash_attn" flash-attn's varlen forward (fp16/bf16; CUDA with flash-attn only, skipped
            elsewhere; not yet run on a GPU).
  "auto"    "triton" on CUDA when Triton is installed and compiled (not interpreting), else
            "torch": the interpreter is a correctness tool, far too slow to time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F

from kvbench.errors import KvbenchError
from kvbench.ops.launch import (
    check_grid,
    device_context,
    host_to_device,
    interpreting,
    require_triton,
    triton_unavailable_reason,
)
from kvbench.ops.registry import Impl, available, choose

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and launch shape of the Triton kernel (BLOCK_M must be a multiple of
    BLOCK_N: a causal diagonal starts on a key-tile edge)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def to_dict(self) -> dict:
        return asdict(self)


_HALF = (torch.float16, torch.bfloat16)


def _table(half: dict[int, tuple], fp32: dict[int, tuple]) -> dict:
    """{(dtype, head_dim): config} from (block_m, block_n, num_warps, num_stages) per head_dim
    for 16-bit inputs (fp16 and bf16 alike) and for float32."""
    return {**{(dtype, d): AttentionConfig(*c) for dtype in _HALF for d, c in half.items()},
            **{(torch.float32, d): AttentionConfig(*c) for d, c in fp32.items()}}


# One config per (target, dtype, head_dim), picked by a rule over compiled candidates, not by
# timing (no GPU has run them): `python -m kvbench.compile_gate --survey` compiles the
# candidates of kvbench/compile_gate/survey.py for each target and picks, among those with no
# spills and shared memory within the target's limit, the largest tile, then the most stages,
# then the fewest warps (results/compile-gate/README.md lists them; a test holds this table to
# the committed survey). Fixed configs compile once per (dtype, head_dim, causal) and make no
# run-to-run choice. Key 90: sm_90 and newer; 80: anything older (gated on sm_80 only).
TRITON_CONFIGS = {
    90: _table({16: (128, 128, 4, 4), 32: (128, 128, 8, 4), 64: (128, 128, 8, 4),
                128: (128, 128, 8, 3), 256: (64, 64, 8, 3)},
               {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 16, 4, 3),
                128: (32, 16, 8, 2), 256: (16, 16, 4, 1)}),
    80: _table({16: (128, 128, 4, 4), 32: (128, 128, 8, 4), 64: (128, 128, 8, 4),
                128: (64, 64, 8, 3), 256: (64, 64, 8, 2)},
               {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 16, 8, 2),
                128: (32, 16, 4, 3), 256: (16, 16, 4, 2)}),
}
# The interpreter runs each program in numpy: small tiles keep the CPU tests quick.
INTERPRETER_CONFIG = AttentionConfig(32, 16, 1, 1)


def target_family(arch: int) -> int:
    """The TRITON_CONFIGS key for a compute capability ×10 (e.g. 90 for an H100)."""
    return 90 if arch >= 90 else 80


def attention_config(dtype: torch.dtype, head_dim: int, arch: int | None = None
                     ) -> AttentionConfig:
    """The config impl="triton" launches for (dtype, head_dim) on the target `arch` (compute
    capability ×10; default the GPU Triton compiles for now); the interpreter's own config
    under TRITON_INTERPRET=1."""
    if interpreting():
        return INTERPRETER_CONFIG
    if arch is None:
        import triton

        arch = triton.runtime.driver.active.get_current_target().arch
    return TRITON_CONFIGS[target_family(arch)][(dtype, head_dim)]


@dataclass
class Sequences:
    """The packed sequences of one call: starts on the host; cu_seqlens (int32, as given or
    None: one sequence) on `device` when an impl asks for it."""

    starts: list[int]
    given: torch.Tensor | None
    device: torch.device

    @functools.cached_property
    def max_seqlen(self) -> int:
        return max(b - a for a, b in pairwise(self.starts))

    @functools.cached_property
    def cu_seqlens(self) -> torch.Tensor:
        if self.given is None:  # [0, n] made on the device: no copy, no sync
            return torch.arange(2, dtype=torch.int32, device=self.device) * self.starts[-1]
        return host_to_device(self.given, self.device)


def _check_inputs(q, k, v, cu_seqlens, out) -> list[int] | None:
    """Validate shapes, dtypes and devices; return cu_seqlens as a host list (or None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise KvbenchError(f"{name} must have shape [num_tokens, num_heads, head_dim], got "
                             f"{tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not supported; use float16, bfloat16 "
                            "or float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise KvbenchError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise KvbenchError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on num_tokens "
                         "and head_dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise KvbenchError(f"query heads ({q.shape[1]}) must be a multiple of KV heads "
                         f"({k.shape[1]})")
    if k.device != q.device or v.device != q.device:
        raise KvbenchError(f"q, k and v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype \
                or out.device != q.device:
            raise KvbenchError("out must be a tensor with q's shape, dtype and device")
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 \
            or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise TypeError("cu_seqlens must be a 1-D int32 tensor [num_seqs + 1] of cumulative "
                        "sequence starts, e.g. tensor([0, 5, 12], dtype=torch.int32)")
    starts = cu_seqlens.tolist()  # one device sync when cu_seqlens lives on a GPU
    if starts[0] != 0 or starts[-1] != q.shape[0] or any(b < a for a, b in pairwise(starts)):
        raise KvbenchError(f"cu_seqlens must rise from 0 to num_tokens ({q.shape[0]}) without "
                         f"decreasing, got {starts}")
    return starts


def _torch_attention(q, k, v, seqs, causal, sm_scale, out) -> None:
    group = q.shape[1] // k.shape[1]
    if sm_scale <= 0:  # SDPA's causal mask times a scale <= 0 is NaN (-inf·0): move the sign to q
        q, sm_scale = (-q, -sm_scale) if sm_scale else (torch.zeros_like(q), 1.0)
    for start, stop in pairwise(seqs.starts):  # one SDPA call per sequence
        if stop == start:
            continue
        # Contiguous [1, heads, len, d]: strided views send CPU SDPA to its slow math path
        # (1.3 s against 58 ms at 2048 tokens, 14 heads, measured on the 2-core CI machine).
        # KV heads are repeated for GQA rather than passing enable_gqa, which needs torch 2.5.
        qs, ks, vs = (t[start:stop].transpose(0, 1).contiguous()[None] for t in (q, k, v))
        if group > 1:
            ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=sm_scale)
        out[start:stop] = o[0].transpose(0, 1)


def _triton_attention(q, k, v, seqs, causal, sm_scale, out, *,
                      config: AttentionConfig | None = None) -> None:
    """Launch the kernel; CUDA launches have not yet been run on a GPU."""
    head_dim = q.shape[2]
    if head_dim not in TRITON_HEAD_DIMS:
        raise KvbenchError(f"impl='triton' supports head_dim {TRITON_HEAD_DIMS}, got {head_dim}; "
                         "use impl='torch'")
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t.stride(2) != 1:
            raise KvbenchError(f"impl='triton' needs {name} contiguous along head_dim "
                             "(stride 1); call .contiguous()")
    import triton

    from kvbench.kernels.prefill_attention import prefill_attention_kernel

    require_triton(q.device, prefill_attention_kernel)
    with device_context(q.device):  # the config is the current GPU's
        config = config or attention_config(q.dtype, head_dim)
        if config.block_m % config.block_n:
            raise KvbenchError(f"config: block_m ({config.block_m}) must be a multiple of "
                             f"block_n ({config.block_n})")
        # In the kernel only each sequence's first token offset is int64; row · stride_n
        # inside a sequence is int32 (tiles overrun a sequence by < block_m + block_n rows).
        overrun = config.block_m + config.block_n
        if (seqs.max_seqlen + overrun) * max(t.stride(0) for t in (q, k, v, out)) >= 2**31:
            raise KvbenchError(f"impl='triton': a sequence of {seqs.max_seqlen} tokens "
                             "overflows int32 offsets at these strides; split it or use "
                             "impl='torch'")
        num_seqs = len(seqs.starts) - 1
        grid = (triton.cdiv(seqs.max_seqlen, config.block_m) * num_seqs, q.shape[1])
        check_grid("Triton prefill attention", grid)
        prefill_attention_kernel[grid](
            q, k, v, out, seqs.cu_seqlens, sm_scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), q.shape[1] // k.shape[1], num_seqs,
            HEAD_DIM=head_dim, CAUSAL=causal,
            DOT_FP32=interpreting() and q.dtype == torch.bfloat16,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
            num_stages=config.num_stages)


def _flash_attn_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"impl='flash_attn' runs on CUDA GPUs only, not {device.type}"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "impl='flash_attn' needs flash-attn (pip install 'kvbench[gpu]')"
    return None


def _flash_attention(q, k, v, seqs, causal, sm_scale, out) -> None:
    """flash-attn's varlen forward (FlashAttention-2), the design's comparator: the same
    packed layout and cu_seqlens. Not yet run on a GPU."""
    from flash_attn import flash_attn_varlen_func

    if q.dtype not in (torch.float16, torch.bfloat16):
        raise KvbenchError(f"impl='flash_attn' supports float16 and bfloat16, got {q.dtype}")
    if q.shape[2] > 256 or q.shape[2] % 8:
        raise KvbenchError(f"impl='flash_attn' supports head_dim up to 256 in multiples of 8, "
                         f"got {q.shape[2]}")
    out.copy_(flash_attn_varlen_func(q, k, v, seqs.cu_seqlens, seqs.cu_seqlens,
                                     seqs.max_seqlen, seqs.max_seqlen, dropout_p=0.0,
                                     softmax_scale=sm_scale, causal=causal))


ATTENTION_IMPLS: dict[str, Impl] = {  # run(q, k, v, seqs: Sequences, causal, sm_scale, out)
    "triton": Impl(_triton_attention, triton_unavailable_reason),
    "torch": Impl(_torch_attention),
    "flash_attn": Impl(_flash_attention, _flash_attn_unavailable),
}


def attention_impls(device: torch.device | str) -> tuple[str, ...]:
    """The impls of `ATTENTION_IMPLS` that run on `device`."""
    return available(ATTENTION_IMPLS, device)


def auto_impl(device: torch.device | str) -> str:
    """What impl='auto' runs on `device`: "triton" on CUDA when Triton is installed and
    compiled (not interpreting), else "torch"."""
    device = torch.device(device)
    usable = device.type == "cuda" and not interpreting() \
        and triton_unavailable_reason(device) is None
    return "triton" if usable else "torch"


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                      sm_scale: float | None = None, impl: str = "auto",
                      cu_seqlens: torch.Tensor | None = None, *,
                      out: torch.Tensor | None = None, **options) -> torch.Tensor:
    """Attention output [n, Hq, d] in q's dtype (into `out` when given); see the module doc.

    cu_seqlens is read on the host to validate it: keep it on the CPU (it is tiny) to avoid a
    device sync. Keyword options go to the impl (impl="triton": config). The first call of a
    (dtype, head_dim, causal) compiles the Triton kernel on a GPU: warm up before timing.
    """
    starts = _check_inputs(q, k, v, cu_seqlens, out)
    _, chosen, options = choose(ATTENTION_IMPLS, impl, auto_impl, q.device, options)
    n, causal = q.shape[0], bool(causal)
    sm_scale = 1.0 / math.sqrt(q.shape[2]) if sm_scale is None else float(sm_scale)
    if not math.isfinite(sm_scale):
        raise KvbenchError(f"sm_scale must be finite, got {sm_scale}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if n == 0:
        return out
    seqs = Sequences(starts or [0, n], cu_seqlens, q.device)
    if seqs.max_seqlen:
        chosen.run(q, k, v, seqs, causal, sm_scale, out, **options)
    return out
