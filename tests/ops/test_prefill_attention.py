"""prefill_attention against the float64 reference: ‖out − ref‖/‖ref‖ ≤ ATTENTION_RTOL[dtype].

CPU: triton (TRITON_INTERPRET=1) and torch over odd lengths (1, 17, a few hundred), GQA ratios,
head dims 16-256, causal and not, packed variable-length batches, into poisoned outputs.
GPU (`gpu`): the same checks at real sizes (llama-3-8b heads, up to 4096 tokens; not yet run
on a GPU).
"""

import pytest
import torch

from kvbench.ops import attention_config, prefill_attention
from kvbench.ops.prefill_attention import AttentionConfig
from kvbench.reference import ATTENTION_RTOL, prefill_attention_ref, relative_error

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (num_tokens, q heads, kv heads, head_dim): small enough for the interpreter
SHAPES = [(1, 2, 2, 32), (17, 4, 2, 64), (17, 8, 2, 128), (45, 2, 1, 256), (64, 4, 4, 16),
          (33, 8, 1, 32), (129, 4, 2, 128), (211, 2, 1, 64), (257, 4, 1, 32)]
IMPLS = [pytest.param("triton", marks=pytest.mark.interpreter), "torch"]


def qkv(num_tokens, q_heads, kv_heads, head_dim, dtype, seed, device="cpu"):
    generator = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(num_tokens, heads, head_dim, generator=generator,
                             device=device).to(dtype)
                 for heads in (q_heads, kv_heads, kv_heads))


def check(out, q, k, v, **kwargs):
    ref = prefill_attention_ref(q, k, v, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, ref) <= ATTENTION_RTOL[q.dtype]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-hq{}-hkv{}-d{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_float64_reference(impl, dtype, shape, causal):
    q, k, v = qkv(*shape, dtype, seed=sum(shape))
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    assert prefill_attention(q, k, v, causal=causal, impl=impl, out=out) is out
    check(out, q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_packed_variable_length_batch(impl, dtype, causal):
    """Sequences of 1, 17, 0, 70 and 37 tokens packed into one tensor (cu_seqlens int32)."""
    cu_seqlens = torch.tensor([0, 1, 18, 18, 88, 125], dtype=torch.int32)
    q, k, v = qkv(125, 4, 2, 64, dtype, seed=5)
    out = prefill_attention(q, k, v, causal=causal, impl=impl, cu_seqlens=cu_seqlens,
                            out=torch.full_like(q, float("nan")))
    check(out, q, k, v, causal=causal, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_views_and_custom_scale(impl):
    """q, k, v as views into one packed qkv projection (row stride 8·d), sm_scale given."""
    qkv_proj = torch.randn(33, 8, 32, generator=torch.Generator().manual_seed(9)).half()
    q, k, v = qkv_proj[:, :4], qkv_proj[:, 4:6], qkv_proj[:, 6:]
    check(prefill_attention(q, k, v, sm_scale=0.3, impl=impl), q, k, v, sm_scale=0.3)


def test_auto_on_cpu_matches_reference():
    q, k, v = qkv(20, 4, 1, 64, torch.bfloat16, seed=2)
    check(prefill_attention(q, k, v), q, k, v)


def test_empty_input_returns_empty_output():
    q, k, v = qkv(0, 2, 1, 32, torch.float16, seed=0)
    assert prefill_attention(q, k, v).shape == (0, 2, 32)


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv(4, 2, 1, 32, torch.float16, seed=0)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        prefill_attention(q, k, v, impl="triton")


Q, K, V = qkv(8, 4, 2, 32, torch.float16, seed=1)
BAD_CALLS = [
    (lambda: prefill_attention(Q[0], K, V), ValueError, "q must have shape"),
    (lambda: prefill_attention(Q, K[None], V), ValueError, "k must have shape"),
    (lambda: prefill_attention(Q[:, :3], K, V), ValueError, "multiple of KV heads"),
    (lambda: prefill_attention(Q, K, V[:, :1]), ValueError, "same shape"),
    (lambda: prefill_attention(Q[:7], K, V), ValueError, "num_tokens and head_dim"),
    (lambda: prefill_attention(Q, K.float(), V), TypeError, "share a dtype"),
    (lambda: prefill_attention(Q.double(), K.double(), V.double()), TypeError, "not supported"),
    (lambda: prefill_attention(Q.numpy(), K, V), TypeError, "torch.Tensor"),
    (lambda: prefill_attention(Q, K, V, impl="flash"), ValueError, "unknown impl"),
    (lambda: prefill_attention(Q, K, V, cu_seqlens=torch.tensor([0, 8])), TypeError, "int32"),
    (lambda: prefill_attention(Q, K, V, cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32)),
     ValueError, "rise from 0 to num_tokens"),
    (lambda: prefill_attention(Q, K, V, cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)),
     ValueError, "without decreasing"),
    (lambda: prefill_attention(Q, K, V, out=Q[:, :2]), ValueError, "out must be"),
    (lambda: prefill_attention(Q, K, V, sm_scale=float("inf")), ValueError, "finite"),
    (lambda: prefill_attention(*qkv(8, 2, 1, 48, torch.float16, 0), impl="triton"),
     ValueError, "head_dim"),
    (lambda: prefill_attention(Q.transpose(1, 2).contiguous().transpose(1, 2), K, V,
                               impl="triton"), ValueError, "stride 1"),
]


@pytest.mark.parametrize("call, error, message", BAD_CALLS)
def test_bad_input_raises_a_clear_error(call, error, message, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # reach the shape checks behind the env check
    with pytest.raises(error, match=message):
        call()


def test_every_supported_shape_has_one_fixed_config():
    """Per target family, one config per (dtype, head_dim) impl="triton" accepts, each a valid
    tiling; an H100 (sm_90) and newer take the sm_90 table, older GPUs the sm_80 one."""
    from kvbench.ops.prefill_attention import TRITON_CONFIGS, TRITON_HEAD_DIMS, target_family

    assert set(TRITON_CONFIGS) == {80, 90}
    for table in TRITON_CONFIGS.values():
        assert set(table) == {(dtype, d) for dtype in DTYPES for d in TRITON_HEAD_DIMS}
        assert all(c.block_m % c.block_n == 0 and c.num_warps in (4, 8) for c in table.values())
    assert [target_family(a) for a in (75, 80, 86, 89, 90, 100)] == [80, 80, 80, 80, 90, 90]


@pytest.mark.interpreter
def test_config_option_picks_the_tiles():
    """Another tiling (64 x 32, so the 70-token sequence has a partial last tile) gives the same
    answer; a tiling the kernel cannot run is refused before the launch."""
    cu_seqlens = torch.tensor([0, 70, 75], dtype=torch.int32)
    q, k, v = qkv(75, 4, 2, 32, torch.float16, seed=6)
    out = prefill_attention(q, k, v, impl="triton", cu_seqlens=cu_seqlens,
                            config=AttentionConfig(64, 32, 4, 1))
    check(out, q, k, v, cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="block_m .* must be a multiple of block_n"):
        prefill_attention(q, k, v, impl="triton", config=AttentionConfig(32, 64, 4, 1))
    with pytest.raises(ValueError, match="config only apply to impl='triton', not 'torch'"):
        prefill_attention(q, k, v, impl="torch", config=AttentionConfig(64, 32, 4, 1))


def test_interpreter_config_is_the_one_recorded(monkeypatch):
    from kvbench.ops.prefill_attention import INTERPRETER_CONFIG, TRITON_CONFIGS

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention_config(torch.bfloat16, 128) == INTERPRETER_CONFIG
    monkeypatch.delenv("TRITON_INTERPRET")
    assert attention_config(torch.bfloat16, 128, arch=90) == \
        TRITON_CONFIGS[90][(torch.bfloat16, 128)]
    assert attention_config(torch.float32, 64, arch=86) == TRITON_CONFIGS[80][(torch.float32, 64)]


def test_flash_attn_is_skipped_off_cuda_with_its_reason():
    from kvbench.ops import attention_impls

    assert "flash_attn" not in attention_impls("cpu")
    with pytest.raises(ValueError, match="flash_attn' runs on CUDA GPUs only"):
        prefill_attention(Q, K, V, impl="flash_attn")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch", "flash_attn"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, head_dim", [(1, 128), (17, 64), (1000, 128), (4096, 128),
                                                  (1000, 256), (333, 32)])
def test_gpu_matches_float64_reference(impl, dtype, num_tokens, head_dim):
    """llama-3-8b heads (32 query, 8 KV); causal and not; poisoned output."""
    from kvbench.ops import ATTENTION_IMPLS

    reason = ATTENTION_IMPLS[impl].unavailable(torch.device("cuda"))
    if reason or (impl == "flash_attn" and dtype == torch.float32):
        pytest.skip(reason or "flash-attn has no float32 kernels")
    q, k, v = qkv(num_tokens, 32, 8, head_dim, dtype, seed=num_tokens, device="cuda")
    for causal in (True, False):
        out = prefill_attention(q, k, v, causal=causal, impl=impl,
                                out=torch.full_like(q, float("nan")))
        check(out, q, k, v, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_packed_batch(dtype):
    lengths = torch.tensor([1, 1000, 0, 17, 2048, 129])
    cu_seqlens = torch.cat([torch.zeros(1), lengths.cumsum(0)]).to(torch.int32)
    q, k, v = qkv(int(lengths.sum()), 32, 8, 128, dtype, seed=4, device="cuda")
    out = prefill_attention(q, k, v, impl="triton", cu_seqlens=cu_seqlens,
                            out=torch.full_like(q, float("nan")))
    check(out, q, k, v, cu_seqlens=cu_seqlens)
