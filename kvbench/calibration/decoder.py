"""A decoder layer of a model's real shape with random weights, for timing prefill and decode.

Llama-style block: RMSNorm → fused QKV projection → rotary embedding → causal attention
(`kvbench.ops.prefill_attention`) → output projection → residual → RMSNorm → gated SiLU MLP →
residual. Weights are random (scaled so activations stay O(1)): time does not depend on their
values, so nothing is downloaded. Writing K/V into the paged cache is left out: it moves
2·Hkv·d·bytes per token, a small share next to the projections it follows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvbench.errors import KvbenchError
from kvbench.models import ModelSpec
from kvbench.ops import prefill_attention
from kvbench.ops.dtypes import TORCH_DTYPES

TIMED_DTYPES = ("float32", "float16", "bfloat16")  # fp8 has no matmul or randn to time here


def torch_dtype(spec: ModelSpec) -> torch.dtype:
    if spec.dtype not in TIMED_DTYPES:
        raise KvbenchError(f"dtype {spec.dtype} cannot be timed here; use one of "
                         f"{', '.join(TIMED_DTYPES)}")
    return TORCH_DTYPES[spec.dtype]


def random_weight(shape: tuple[int, ...], fan_in: int, device, dtype: torch.dtype,
                  generator: torch.Generator) -> torch.Tensor:
    """Standard normal values over sqrt(fan_in), drawn in float32 on the host and scaled in
    place: the only copy beside the result is that one float32 draw, as the memory plan counts
    (kvbench/calibration/memory.py)."""
    w = torch.randn(*shape, generator=generator, dtype=torch.float32)
    return w.div_(math.sqrt(fan_in)).to(device=device, dtype=dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotary_tables(num_tokens: int, head_dim: int, device, dtype, base: float = 10000.0):
    """cos/sin of shape [n, 1, d] for positions 0..n-1 (rotate-half convention)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                        / head_dim)
    angles = torch.outer(torch.arange(num_tokens, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class DecoderLayer:
    """One layer's weights (this GPU's share under tensor parallelism) and its forward passes."""

    def __init__(self, spec: ModelSpec, device: str, generator: torch.Generator):
        dtype = torch_dtype(spec)
        hq, hkv = spec.num_heads // spec.tp, spec.kv_heads_per_gpu
        d, h, inter = spec.head_dim, spec.hidden_size, spec.intermediate_size // spec.tp
        self.hq, self.hkv, self.d = hq, hkv, d

        def rand(*shape, fan_in):
            return random_weight(shape, fan_in, device, dtype, generator)

        self.norm_attn = 1 + 0.1 * rand(h, fan_in=1)
        self.norm_mlp = 1 + 0.1 * rand(h, fan_in=1)
        self.w_qkv = rand(h, (hq + 2 * hkv) * d, fan_in=h)
        self.w_o = rand(hq * d, h, fan_in=hq * d)
        self.w_gate_up = rand(h, 2 * inter, fan_in=h)
        self.w_down = rand(inter, h, fan_in=inter)

    def _qkv(self, x: torch.Tensor):
        qkv = rms_norm(x, self.norm_attn) @ self.w_qkv
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        return (q.unflatten(-1, (self.hq, self.d)), k.unflatten(-1, (self.hkv, self.d)),
                v.unflatten(-1, (self.hkv, self.d)))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (rms_norm(x, self.norm_mlp) @ self.w_gate_up).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ self.w_down

    def prefill(self, x: torch.Tensor, cos, sin, attention_impl: str = "auto") -> torch.Tensor:
        """x: [n, hidden] → [n, hidden], causal self-attention over the n tokens."""
        q, k, v = self._qkv(x)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True,
                                 impl=attention_impl)
        return self._mlp(x + attn.flatten(1) @ self.w_o)

    def decode(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        """One new token for each of B sequences: x [B, hidden], caches [B, Hkv, T, d]."""
        q, _, _ = self._qkv(x)  # the new K/V would be appended; attention reads the T cached
        b, g = x.shape[0], self.hq // self.hkv
        q = q.reshape(b, self.hkv, g, self.d)
        scores = (q @ k_cache.transpose(-1, -2)).float() / math.sqrt(self.d)  # [B, Hkv, g, T]
        attn = (scores.softmax(-1).to(x.dtype) @ v_cache).reshape(b, self.hq * self.d)
        return self._mlp(x + attn @ self.w_o)


class LMHead:
    """Final norm and the vocabulary projection, run for the tokens that need logits."""

    def __init__(self, spec: ModelSpec, device: str, generator: torch.Generator):
        dtype = torch_dtype(spec)
        h = spec.hidden_size
        self.norm = torch.ones(h, device=device, dtype=dtype)
        self.weight = random_weight((h, spec.vocab_size // spec.tp), h, device, dtype, generator)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.norm) @ self.weight


def random_hidden(num_tokens: int, spec: ModelSpec, device: str, generator: torch.Generator):
    return torch.randn(num_tokens, spec.hidden_size, generator=generator).to(
        device=device, dtype=torch_dtype(spec))
