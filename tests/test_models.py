"""Model shapes: KV bytes, parameter counts and FLOPs, checked against hand-computed numbers.

Expected values are written out as literals (worked from the published architectures), never
recomputed with the formulas under test.
"""

import json

import numpy as np
import pytest

from kvbench.models import MODELS, ModelSpec, canonical_dtype, from_hf_config, get_model

PRESETS = {"llama-3-8b", "llama-3-70b", "llama-2-7b", "mistral-7b", "qwen2.5-7b",
           "qwen2.5-0.5b", "tiny"}

# 2 (K and V) · layers · kv_heads · head_dim · bytes per element, worked by hand.
KV_BYTES_PER_TOKEN = {
    "llama-3-8b": 131072,  # 2·32·8·128·2
    "llama-3-70b": 327680,  # 2·80·8·128·2
    "llama-2-7b": 524288,  # 2·32·32·128·2 (no GQA)
    "mistral-7b": 131072,  # 2·32·8·128·2
    "qwen2.5-7b": 57344,  # 2·28·4·128·2
    "qwen2.5-0.5b": 12288,  # 2·24·2·64·2
    "tiny": 512,  # 2·2·2·16·4 (float32)
}

# Llama's two RMSNorm weights per layer plus the final norm: not counted by ModelSpec.
LLAMA_NORM_PARAMS = {"llama-3-8b": 32 * 2 * 4096 + 4096, "llama-2-7b": 32 * 2 * 4096 + 4096}
# Parameter counts published with the checkpoints (safetensors metadata on the model cards).
PUBLISHED_PARAMS = {"llama-3-8b": 8_030_261_248, "llama-2-7b": 6_738_415_616}

LLAMA_3_8B_CONFIG = {  # keys and values as in meta-llama/Meta-Llama-3-8B/config.json
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16",
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05,
}


def test_presets_are_the_documented_ones():
    assert set(MODELS) == PRESETS
    for name in PRESETS:
        assert get_model(name).name == name


@pytest.mark.parametrize("name", sorted(KV_BYTES_PER_TOKEN))
def test_kv_bytes_per_token(name):
    assert get_model(name).kv_bytes_per_token == KV_BYTES_PER_TOKEN[name]


def test_llama_3_8b_bf16_holds_131072_kv_bytes_per_token():
    spec = get_model("llama-3-8b", dtype="bf16")
    assert spec.dtype == "bfloat16"
    assert spec.kv_bytes_per_token == 131072


@pytest.mark.parametrize(("dtype", "expected"), [("float32", 262144), ("fp16", 131072),
                                                 ("half", 131072), ("fp8", 65536)])
def test_kv_bytes_scale_with_dtype(dtype, expected):
    assert get_model("llama-3-8b", dtype=dtype).kv_bytes_per_token == expected


@pytest.mark.parametrize(("tp", "expected"), [(1, 131072), (2, 65536), (4, 32768), (8, 16384)])
def test_tensor_parallel_splits_kv_bytes(tp, expected):
    assert get_model("llama-3-8b", tp=tp).kv_bytes_per_token == expected


def test_non_embedding_params_llama_3_8b():
    # Per layer: Q,O 4096·4096 each; K,V 4096·1024 each; MLP 3·4096·14336.
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert layer == 218_103_808
    spec = get_model("llama-3-8b")
    assert spec.layer_params == 218_103_808
    assert spec.non_embedding_params == 6_979_321_856


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published_checkpoint(name):
    spec = get_model(name)
    embeddings = 2 * spec.vocab_size * spec.hidden_size  # untied input embedding and LM head
    total = spec.non_embedding_params + embeddings + LLAMA_NORM_PARAMS[name]
    assert total == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize(("tp", "expected"), [(1, 13_958_643_712), (2, 6_979_321_856),
                                              (8, 1_744_830_464)])
def test_linear_flops_per_token_is_two_per_weight(tp, expected):
    assert get_model("llama-3-8b", tp=tp).linear_flops_per_token == expected


def test_causal_attention_flops():
    # 2·n²·H·d per layer: llama-3-8b, n = 1000: 2 · 1e6 · 32 · 128 = 8.192e9 per layer, 32 layers.
    spec = get_model("llama-3-8b")
    assert spec.attention_flops(1000) == 262_144_000_000
    assert spec.attention_flops(1) == 262_144
    assert spec.attention_flops(0) == 0
    assert get_model("llama-3-8b", tp=4).attention_flops(1000) == 65_536_000_000
    # The tiny preset: 2 · 17² · 4 · 16 · 2 layers.
    assert get_model("tiny").attention_flops(17) == 73_984


def test_attention_flops_vectorized():
    n = np.array([0, 1, 17, 1000])
    got = get_model("llama-3-8b").attention_flops(n)
    np.testing.assert_array_equal(got, [0, 262_144, 75_759_616, 262_144_000_000])


def test_lm_head_flops():
    assert get_model("llama-3-8b").lm_head_flops == 2 * 4096 * 128256


def test_kv_heads_per_gpu_replicate_beyond_tp():
    # 8 KV heads over 16 GPUs: each GPU still holds one head (vLLM replicates them).
    spec = get_model("llama-3-8b", tp=16)
    assert spec.kv_heads_per_gpu == 1
    assert spec.kv_bytes_per_token == 2 * 32 * 1 * 128 * 2
    assert get_model("llama-3-8b", tp=4).kv_heads_per_gpu == 2


def test_weight_bytes():
    # (non-embedding + embeddings + LM head) · 2 bytes, halved by tp=2.
    expected = (6_979_321_856 + 2 * 128256 * 4096) * 2
    assert get_model("llama-3-8b").weight_bytes == expected
    assert get_model("llama-3-8b", tp=2).weight_bytes == expected / 2


def test_tp_and_to_dict():
    spec = get_model("mistral-7b", tp=2)
    assert spec.tp == 2 and spec.kv_bytes_per_token == 65536
    d = spec.to_dict()
    assert d["tp"] == 2 and d["num_kv_heads"] == 8 and d["name"] == "mistral-7b"
    assert ModelSpec(**d) == spec


def test_unknown_model_names_it_and_lists_presets():
    with pytest.raises(ValueError, match=r"unknown model 'llama-9'.*llama-3-8b"):
        get_model("llama-9")


@pytest.mark.parametrize("field", ["num_layers", "hidden_size", "num_heads", "num_kv_heads",
                                   "head_dim", "intermediate_size", "vocab_size", "tp"])
@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_model_spec_rejects_non_positive_integers(field, bad):
    fields = dict(name="m", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, vocab_size=256)
    fields[field] = bad
    with pytest.raises(ValueError, match=field):
        ModelSpec(**fields)


def test_heads_must_be_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelSpec("m", 2, 64, 6, 4, 16, 128, 256)


def test_unknown_dtype():
    with pytest.raises(ValueError, match="int3"):
        canonical_dtype("int3")
    with pytest.raises(ValueError, match="int3"):
        get_model("tiny", dtype="int3")


def test_hf_config_llama_3_8b_matches_preset(tmp_path):
    path = tmp_path / "Meta-Llama-3-8B" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA_3_8B_CONFIG))
    spec = from_hf_config(path)
    assert spec.name == "llama"  # model_type, as _name_or_path is absent
    assert spec.num_layers == 32 and spec.num_heads == 32 and spec.num_kv_heads == 8
    assert spec.head_dim == 128  # hidden_size / heads when head_dim is absent
    assert spec.dtype == "bfloat16"
    assert spec.kv_bytes_per_token == 131072
    assert spec.non_embedding_params == 6_979_321_856
    assert from_hf_config(path, tp=2).kv_bytes_per_token == 65536
    assert from_hf_config(path, dtype="float32").kv_bytes_per_token == 262144


def test_hf_config_qwen_style_with_head_dim_and_name(tmp_path):
    cfg = {"_name_or_path": "Qwen/Qwen2.5-0.5B", "model_type": "qwen2", "hidden_size": 896,
           "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24,
           "num_key_value_heads": 2, "vocab_size": 151936, "torch_dtype": "float16"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = from_hf_config(path)
    assert spec.name == "Qwen/Qwen2.5-0.5B"
    assert spec.head_dim == 64 and spec.dtype == "float16"
    assert spec.kv_bytes_per_token == 12288  # 2·24·2·64·2


def test_hf_config_without_kv_heads_is_multi_head(tmp_path):
    cfg = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_hidden_layers": 32, "vocab_size": 32000, "num_key_value_heads": None,
           "head_dim": 128}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = from_hf_config(path)
    assert spec.num_kv_heads == 32
    assert spec.dtype == "bfloat16"  # no dtype given
    assert spec.kv_bytes_per_token == 524288


def test_hf_config_new_dtype_key(tmp_path):
    # transformers >= 4.56 writes "dtype" instead of "torch_dtype".
    cfg = dict(LLAMA_3_8B_CONFIG)
    del cfg["torch_dtype"]
    cfg["dtype"] = "float32"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert from_hf_config(path).kv_bytes_per_token == 262144


def test_hf_config_missing_keys_are_named(tmp_path):
    cfg = dict(LLAMA_3_8B_CONFIG)
    del cfg["num_hidden_layers"], cfg["vocab_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_hidden_layers, vocab_size"):
        from_hf_config(path)


def test_hf_config_unreadable(tmp_path):
    with pytest.raises(ValueError, match="cannot read model config"):
        from_hf_config(tmp_path / "absent.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read model config"):
        from_hf_config(bad)
