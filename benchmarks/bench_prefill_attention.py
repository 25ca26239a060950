"""Causal prefill attention, each impl side by side (one group per length): llama-3-8b heads
(32 query, 8 KV, head_dim 128), bf16, one layer.

    flops      = 2 · n² · Hq · d   (causal: half of the 4·n²·Hq·d of QKᵀ plus PV unmasked)
    tflop_per_s = flops / median_s / 1e12;  fraction_of_peak against the dense bf16 peak of
                 the matching kvbench.hardware preset (datasheet figure), when one matches.

CUDA (not yet run on a GPU): 1k-32k tokens, "triton" (autotuned on the untimed check call)
against "torch" (the op's SDPA impl, with its per-call layout copies and GQA head repeat) and
"sdpa_flash" (SDPA's flash backend alone on inputs laid out beforehand: the goal's baseline)
and "flash_attn" (flash-attn's varlen forward, the design's comparator; skipped without it).
CPU: 32 and 256 tokens, "torch"; "triton" runs in the interpreter at 32 tokens only.
Before timing, out[:m] is checked against the float64 reference of the first m = min(n, 2048)
tokens (causal rows depend only on earlier tokens; the reference needs Hq·m²·8 bytes).
"""

import pytest
import torch
import torch.nn.functional as F

from kvbench.hardware import HARDWARE
from kvbench.models import get_model
from kvbench.ops import ATTENTION_IMPLS, attention_config, prefill_attention
from kvbench.reference import ATTENTION_RTOL, prefill_attention_ref, relative_error

MODEL = get_model("llama-3-8b")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TOKENS = (1024, 4096, 16384, 32768) if CUDA else (32, 256)
INTERPRETER_MAX_TOKENS = 32
CHECK_MAX_TOKENS = 2048
PEAK_PRESETS = {"H100": "h100-sxm", "H200": "h200", "A100": "a100-80gb", "L4": "l4"}


def sdpa_flash(q, k, v):
    """A call of SDPA's flash backend alone, returning [n, Hq, d]: q, k, v are laid out as
    [1, heads, n, d] and the KV heads repeated here, outside the timed call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    qs, ks, vs = (t.transpose(0, 1).contiguous()[None] for t in (q, k, v))
    ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)

    def call():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1)

    return call


def peak_tflop_per_s() -> float | None:
    """Datasheet dense bf16 peak of the GPU, from kvbench.hardware (None on CPU or unknown)."""
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    if "PCIe" in name:  # the presets are SXM parts
        return None
    preset = next((p for key, p in PEAK_PRESETS.items() if key in name), None)
    return HARDWARE[preset].peak_tflops if preset else None


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("impl", ["triton", "torch"]
                         + (["flash_attn", "sdpa_flash"] if CUDA else []))
def test_prefill_attention(benchmark, timed, impl, num_tokens):
    reason = ATTENTION_IMPLS[impl].unavailable(DEVICE) if impl in ATTENTION_IMPLS else None
    if reason:
        pytest.skip(reason)
    if impl == "triton" and not CUDA and num_tokens > INTERPRETER_MAX_TOKENS:
        pytest.skip(f"the Triton interpreter is timed at {INTERPRETER_MAX_TOKENS} tokens only")
    benchmark.group = f"prefill attention {num_tokens} tokens"
    heads, kv_heads, head_dim = MODEL.num_heads, MODEL.num_kv_heads, MODEL.head_dim
    generator = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    q, k, v = (torch.randn(num_tokens, h, head_dim, generator=generator, device=DEVICE)
               .to(torch.bfloat16) for h in (heads, kv_heads, kv_heads))
    out = torch.full_like(q, float("nan"))
    if impl == "sdpa_flash":
        fn = sdpa_flash(q, k, v)
    else:
        fn = lambda: prefill_attention(q, k, v, causal=True, impl=impl, out=out)  # noqa: E731
    result = fn()
    m = min(num_tokens, CHECK_MAX_TOKENS)
    error = relative_error(result[:m], prefill_attention_ref(q[:m], k[:m], v[:m], causal=True))
    assert error <= ATTENTION_RTOL[torch.bfloat16], f"relative error {error:.2e}"

    seconds = timed(fn, 3 if not CUDA else 10)
    flops = 2 * num_tokens**2 * heads * head_dim
    info = {"impl": impl, "device": str(DEVICE), "num_tokens": num_tokens, "num_heads": heads,
            "num_kv_heads": kv_heads, "head_dim": head_dim, "dtype": "bfloat16", "flops": flops,
            "flop_formula": "2*n^2*Hq*d (causal)", "relative_error": error}
    if impl == "triton":  # the fixed config the kernel ran with
        info["config"] = attention_config(torch.bfloat16, head_dim).to_dict()
    if seconds is not None:
        info.update(median_ms=seconds * 1e3, tflop_per_s=flops / seconds / 1e12)
        peak = peak_tflop_per_s()
        if peak:
            info.update(peak_tflop_per_s=peak, fraction_of_peak=flops / seconds / 1e12 / peak)
    benchmark.extra_info.update(info)
