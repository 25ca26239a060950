"""Causal prefill attention forward over one sequence or a packed variable-length batch.

    q [n, Hq, d], k and v [n, Hkv, d], Hq a multiple of Hkv (query head h reads KV head
    h // (Hq / Hkv)); sequence s is tokens cu_seqlens[s] .. cu_seqlens[s+1] (int32, as in
    flash-attn's varlen API; None: one sequence of n tokens).
    out[t, h] = Σ_j softmax_j(q[t, h] · k[j, h'] · sm_scale) v[j, h'] over the keys j of t's
    sequence, j ≤ t when causal; sm_scale defaults to 1/√d.

Impls (`ATTENTION_IMPLS`):
  "triton"  FlashAttention-2 kernel (`kvbench.kernels.prefill_attention`), autotuned for Hopper;
            head_dim 16/32/64/128/256; on CPU tensors only under TRITON_INTERPRET=1.
  "torch"   torch's scaled_dot_product_attention, one call per sequence.
  "auto"    "triton" on CUDA when Triton is installed and compiled (not interpreting), else
            "torch": the interpreter is a correctness tool, far too slow to time.
"""

from __future__ import annotations

import contextlib
import math
import os
from itertools import pairwise

import torch
import torch.nn.functional as F

from kvbench.ops.kv_copy import host_to_device, require_triton, triton_unavailable_reason

ATTENTION_IMPLS = ("triton", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def _check_inputs(q, k, v, cu_seqlens, out) -> list[int] | None:
    """Validate shapes, dtypes and devices; return cu_seqlens as a host list (or None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [num_tokens, num_heads, head_dim], got "
                             f"{tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not supported; use float16, bfloat16 "
                            "or float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on num_tokens "
                         "and head_dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads "
                         f"({k.shape[1]})")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype \
                or out.device != q.device:
            raise ValueError("out must be a tensor with q's shape, dtype and device")
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 \
            or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise TypeError("cu_seqlens must be a 1-D int32 tensor [num_seqs + 1] of cumulative "
                        "sequence starts, e.g. tensor([0, 5, 12], dtype=torch.int32)")
    starts = cu_seqlens.tolist()  # one device sync when cu_seqlens lives on a GPU
    if starts[0] != 0 or starts[-1] != q.shape[0] or any(b < a for a, b in pairwise(starts)):
        raise ValueError(f"cu_seqlens must rise from 0 to num_tokens ({q.shape[0]}) without "
                         f"decreasing, got {starts}")
    return starts


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        compiled = os.environ.get("TRITON_INTERPRET") != "1"
        usable = device.type == "cuda" and compiled and triton_unavailable_reason(device) is None
        return "triton" if usable else "torch"
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown impl {impl!r}; use one of {', '.join(ATTENTION_IMPLS)}, auto")
    return impl


def _torch_attention(q, k, v, starts, causal, sm_scale, out) -> None:
    group = q.shape[1] // k.shape[1]
    if sm_scale <= 0:  # SDPA's causal mask times a scale <= 0 is NaN (-inf·0): move the sign to q
        q, sm_scale = (-q, -sm_scale) if sm_scale else (torch.zeros_like(q), 1.0)
    for start, stop in pairwise(starts):  # one SDPA call per sequence
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


def _triton_attention(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale, out) -> None:
    """Launch the kernel; CUDA launches have not yet been run on a GPU."""
    head_dim = q.shape[2]
    if head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(f"impl='triton' supports head_dim {TRITON_HEAD_DIMS}, got {head_dim}; "
                         "use impl='torch'")
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t.stride(2) != 1:
            raise ValueError(f"impl='triton' needs {name} contiguous along head_dim "
                             "(stride 1); call .contiguous()")
    # In the kernel only each sequence's first token offset is int64; row · stride_n inside a
    # sequence is int32 (tiles overrun a sequence by less than BLOCK_M + BLOCK_N <= 256 rows).
    if (max_seqlen + 256) * max(t.stride(0) for t in (q, k, v, out)) >= 2**31:
        raise ValueError(f"impl='triton': a sequence of {max_seqlen} tokens overflows int32 "
                         "offsets at these strides; split it or use impl='torch'")
    import triton

    from kvbench.kernels.prefill_attention import prefill_attention_kernel

    require_triton(q.device, prefill_attention_kernel)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    num_seqs = cu_seqlens.numel() - 1
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), q.shape[1], num_seqs)  # noqa: E731
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        prefill_attention_kernel[grid](
            q, k, v, out, cu_seqlens, sm_scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            q.shape[1] // k.shape[1], triton.next_power_of_2(max_seqlen),
            HEAD_DIM=head_dim, CAUSAL=causal,
            DOT_FP32=interpreting and q.dtype == torch.bfloat16,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                      sm_scale: float | None = None, impl: str = "auto",
                      cu_seqlens: torch.Tensor | None = None, *,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output [n, Hq, d] in q's dtype (into `out` when given); see the module doc.

    cu_seqlens is read on the host to validate it: keep it on the CPU (it is tiny) to avoid a
    device sync. Each new (longest-sequence bucket, head_dim, causal) autotunes the Triton
    kernel on first use on a GPU: warm up before timing.
    """
    starts = _check_inputs(q, k, v, cu_seqlens, out)
    impl = _resolve_impl(impl, q.device)
    n, causal = q.shape[0], bool(causal)
    sm_scale = 1.0 / math.sqrt(q.shape[2]) if sm_scale is None else float(sm_scale)
    if not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale must be finite, got {sm_scale}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if n == 0:
        return out
    if impl == "torch":
        _torch_attention(q, k, v, starts or [0, n], causal, sm_scale, out)
        return out
    if starts is None:
        cu_seqlens = torch.arange(2, dtype=torch.int32, device=q.device) * n  # [0, n], no sync
        max_seqlen = n
    else:
        cu_seqlens = host_to_device(cu_seqlens, q.device)
        max_seqlen = max(b - a for a, b in pairwise(starts))
    if max_seqlen:
        _triton_attention(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale, out)
    return out
