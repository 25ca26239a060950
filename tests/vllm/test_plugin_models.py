"""The kvbench scheduler starts on models whose Hugging Face configs are not Llama-shaped: the
shape comes from what vLLM resolved (kvbench.vllm.model_shape), and a width only pricing needs
that no config key gives is said once, then assumed."""

from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.vllm

# transformers' default config of each architecture, as vLLM 0.32 serves it (MPT was dropped
# in vLLM 0.28: vLLM itself refuses it), and what vLLM must resolve.
# (config class, architecture, layers, heads, KV heads, head size, MLP width, width said?)
MODELS = [
    ("OPTConfig", "OPTForCausalLM", 12, 12, 12, 64, 3072, False),
    ("GPT2Config", "GPT2LMHeadModel", 12, 12, 12, 64, 3072, True),
    ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", 12, 12, 1, 64, 3072, True),
    ("FalconConfig", "FalconForCausalLM", 32, 71, 1, 64, 18176, False),
    ("BloomConfig", "BloomForCausalLM", 2, 8, 8, 8, 256, True),
]


@pytest.mark.parametrize(("config_class", "architecture", "layers", "heads", "kv_heads",
                          "head_size", "width", "said"), MODELS,
                         ids=[m[1] for m in MODELS])
def test_scheduler_starts_on_the_model_and_prices_its_kv(tmp_path, caplog, config_class,
                                                         architecture, layers, heads, kv_heads,
                                                         head_size, width, said):
    pytest.importorskip("vllm")
    import torch
    import transformers
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from kvbench.vllm.scheduler import KvbenchScheduler

    config = getattr(transformers, config_class)()
    config.architectures = [architecture]
    config.save_pretrained(tmp_path)
    model_config = ModelConfig(model=str(tmp_path), skip_tokenizer_init=True, dtype="float16",
                               max_model_len=256)
    vllm_config = VllmConfig(
        model_config=model_config, cache_config=CacheConfig(block_size=16),
        scheduler_config=SchedulerConfig(max_model_len=256, is_encoder_decoder=False,
                                         max_num_batched_tokens=256),
        additional_config={"kvbench": {"victim": "cost-aware"}})  # prices every preemption
    vllm_config.cache_config.num_gpu_blocks = 8
    spec = FullAttentionSpec(block_size=16, num_kv_heads=kv_heads, head_size=head_size,
                             dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="vllm.kvbench"):
        scheduler = KvbenchScheduler(
            vllm_config=vllm_config, block_size=16, hash_block_size=16,
            kv_cache_config=KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                                          kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)]),
            structured_output_manager=StructuredOutputManager(vllm_config))
    model = scheduler.kvbench_recorder.model
    assert (model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim,
            model.intermediate_size) == (layers, heads, kv_heads, head_size, width)
    # What a swap moves is vLLM's own page: K and V of every layer.
    assert model.kv_bytes_per_token == layers * spec.page_size_bytes / 16
    warnings = [r.getMessage() for r in caplog.records if "MLP width" in r.getMessage()]
    assert len(warnings) == (1 if said else 0)
