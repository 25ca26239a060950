"""The served model's shape, as vLLM itself resolved it.

vLLM's `ModelConfig` has already read the Hugging Face config of whatever architecture it
serves (OPT's `ffn_dim`, GPT-2's `n_embd`/`n_layer`, Falcon's multi-query flag, ...) into its
accessors: layers, attention heads, KV heads, head size, hidden size, vocabulary. The KV bytes
of a token, what swapping moves, come from those alone. The MLP width is the one field only
pricing needs (the FLOPs of recomputation) that vLLM does not resolve: it is read under the names
architectures give it, and where none is found the plugin says so once and prices with
4 x hidden size (the GPT convention).
"""

from __future__ import annotations

import logging

from kvbench.errors import KvbenchError
from kvbench.models import ModelSpec, canonical_dtype
from kvbench.vllm.options import PluginError

logger = logging.getLogger("vllm.kvbench")  # under vLLM's logger: its handler and level

# The MLP's width under the names Hugging Face configs give it: Llama/Qwen/Mistral/Falcon-new,
# OPT, GPT-2/GPTBigCode (None there means 4 x hidden), Falcon, T5-style, ChatGLM.
MLP_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff",
                  "inner_hidden_size")
GPT_MLP_RATIO = 4
_said: set[str] = set()  # models whose unknown MLP width was already reported


def mlp_width(hf_text_config, hidden_size: int) -> int | None:
    """The MLP's width from the config, or None when no known name gives it."""
    for key in MLP_WIDTH_KEYS:
        value = getattr(hf_text_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    ratio = getattr(hf_text_config, "expansion_ratio", None)  # MPT: a multiple of d_model
    if isinstance(ratio, int | float) and not isinstance(ratio, bool) and ratio > 0:
        return round(ratio * hidden_size)
    return None


def cache_dtype(vllm_config) -> str:
    """The KV cache's dtype: the model's unless the cache is quantized (fp8: one byte)."""
    dtype = vllm_config.cache_config.cache_dtype
    if dtype == "auto":
        return canonical_dtype(str(vllm_config.model_config.dtype).removeprefix("torch."))
    return "fp8" if dtype.startswith("fp8") else canonical_dtype(dtype)


def model_spec(vllm_config) -> ModelSpec:
    """The served model's `ModelSpec` from vLLM's model config accessors (KV in the cache's
    dtype, this server's tensor parallelism)."""
    model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
    tp = parallel.tensor_parallel_size
    hidden = model_config.get_hidden_size()
    width = mlp_width(model_config.hf_text_config, hidden)
    model_type = getattr(model_config.hf_text_config, "model_type", None) or "unknown"
    if width is None:
        width = GPT_MLP_RATIO * hidden
        if model_config.model not in _said:
            _said.add(model_config.model)
            logger.warning("kvbench: %s (model_type %s) names no MLP width (%s); recompute is "
                           "priced with %d x hidden_size = %d", model_config.model, model_type,
                           "/".join(MLP_WIDTH_KEYS), GPT_MLP_RATIO, width)
    try:
        return ModelSpec(
            name=model_config.served_model_name or model_config.model,
            num_layers=model_config.get_total_num_hidden_layers(),
            hidden_size=hidden,
            num_heads=model_config.get_num_attention_heads(parallel) * tp,
            num_kv_heads=model_config.get_total_num_kv_heads(),
            head_dim=model_config.get_head_size(),
            intermediate_size=width,
            vocab_size=model_config.get_vocab_size(),
            dtype=cache_dtype(vllm_config),
            tp=tp)
    except KvbenchError as exc:
        raise PluginError(f"kvbench: the served model's shape, as vLLM resolved it: {exc}"
                          ) from None
