"""Model shapes: the few numbers of a decoder-only transformer that price its KV cache and prefill.

A `ModelSpec` holds the architecture; derived properties give KV bytes per token, linear FLOPs per
token and causal-attention FLOPs for a prompt, all per GPU under tensor parallelism `tp`.
Presets are looked up by name (`get_model`); a local Hugging Face `config.json` loads with
`from_hf_config` (nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from kvbench.errors import KvbenchError
from kvbench.limits import MAX_MODEL_DIM, check_name

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
                 "float": "float32", "float8": "fp8", "float8_e4m3fn": "fp8"}


def canonical_dtype(dtype: str) -> str:
    """Map 'bf16', 'fp16', 'float32', ... to one of DTYPE_BYTES's names, or raise ValueError."""
    name = check_name("dtype", dtype).lower()
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise KvbenchError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    return name


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer with grouped-query attention and a gated (SwiGLU) MLP."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype: str = "bfloat16"
    tp: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise KvbenchError(f"model name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                      "intermediate_size", "vocab_size", "tp"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= \
                    MAX_MODEL_DIM:
                raise KvbenchError(f"model {self.name!r}: {field} must be an integer from 1 to "
                                 f"{MAX_MODEL_DIM}, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise KvbenchError(f"model {self.name!r}: num_heads ({self.num_heads}) must be a "
                             f"multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_heads_per_gpu(self) -> int:
        """This GPU's KV heads under tensor parallelism: Hkv / tp, at least 1 (with tp > Hkv each
        KV head is replicated, as vLLM does)."""
        return max(self.num_kv_heads // self.tp, 1)

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V, every layer, this GPU's KV heads: 2·L·(Hkv/tp)·d·bytes."""
        return 2 * self.num_layers * self.kv_heads_per_gpu * self.head_dim * self.dtype_bytes

    @property
    def layer_params(self) -> int:
        """Weights of one layer: Q, K, V and O projections plus the gated MLP (norms ignored)."""
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (q_out + 2 * kv_out) + q_out * self.hidden_size
        return attention + 3 * self.hidden_size * self.intermediate_size

    @property
    def non_embedding_params(self) -> int:
        return self.num_layers * self.layer_params

    @property
    def weight_bytes(self) -> float:
        """Per-GPU bytes of all weights, embeddings and LM head counted once each."""
        embeddings = 2 * self.vocab_size * self.hidden_size
        return (self.non_embedding_params + embeddings) * self.dtype_bytes / self.tp

    @property
    def linear_flops_per_token(self) -> float:
        """2 FLOPs per non-embedding weight touched by one token, per GPU."""
        return 2 * self.non_embedding_params / self.tp

    @property
    def lm_head_flops(self) -> float:
        """Logits for one token (prefill computes them for the last token only)."""
        return 2 * self.hidden_size * self.vocab_size / self.tp

    @property
    def attention_flops_per_token_sq(self) -> float:
        """Causal attention FLOPs per n²: 2·H·d per layer (half of the non-causal 4·n²·H·d)."""
        return 2 * self.num_heads * self.head_dim * self.num_layers / self.tp

    def attention_flops(self, num_tokens):
        """Causal attention FLOPs of a prompt of n tokens, all layers: 2·n²·H·d·L / tp."""
        return self.attention_flops_per_token_sq * num_tokens * num_tokens

    def chunk_flops(self, start_tokens, end_tokens):
        """FLOPs of computing positions [start, end) with the KV of the first `start` in the
        cache: linear·(end - start) + attention·(end² - start²) (ints or arrays; no LM head)."""
        return (self.linear_flops_per_token * (end_tokens - start_tokens)
                + self.attention_flops_per_token_sq * (end_tokens**2 - start_tokens**2))

    def step_flops(self, num_tokens: int, sum_squares: int, num_samples: int) -> float:
        """FLOPs of a step computing `num_tokens` positions whose chunks [s, e) add up to
        sum(e² - s²) = `sum_squares`, sampling `num_samples` tokens (one LM head each)."""
        return (self.linear_flops_per_token * float(num_tokens)
                + self.attention_flops_per_token_sq * float(sum_squares)
                + self.lm_head_flops * num_samples)

    def decode_run_flops(self, batch: int, num_steps: int, context_tokens: int) -> float:
        """FLOPs of `num_steps` decode steps of `batch` requests holding `context_tokens` in
        all at the start: each step computes and samples one token per request; the attention
        term sum((c + n)² - c²) over the batch is 2·n·C + B·n², an exact integer."""
        squares = 2 * num_steps * context_tokens + batch * num_steps * num_steps
        return (batch * num_steps * (self.linear_flops_per_token + self.lm_head_flops)
                + self.attention_flops_per_token_sq * float(squares))

    def recomputation(self, start: np.ndarray, end: np.ndarray, dropped: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Of computing positions [start, end) per request: which recompute KV that a
        preemption dropped (positions below `dropped`), how many tokens and their FLOPs
        (`chunk_flops`). The one accounting of the simulator, replay and the vLLM plugin."""
        redo_end = np.minimum(end, dropped)
        redo = redo_end > start
        if not redo.any():  # the common case: nothing was dropped
            return redo, redo_end[:0], np.zeros(0)
        return redo, redo_end[redo] - start[redo], self.chunk_flops(start[redo], redo_end[redo])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256),
        ModelSpec("llama-3-70b", 80, 8192, 64, 8, 128, 28672, 128256),
        ModelSpec("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000),
        ModelSpec("mistral-7b", 32, 4096, 32, 8, 128, 14336, 32000),
        ModelSpec("qwen2.5-7b", 28, 3584, 28, 4, 128, 18944, 152064),
        ModelSpec("qwen2.5-0.5b", 24, 896, 14, 2, 64, 4864, 151936),
        ModelSpec("tiny", 2, 64, 4, 2, 16, 128, 256, dtype="float32"),
    )
}


def get_model(name: str, dtype: str | None = None, tp: int = 1) -> ModelSpec:
    """A preset by name, optionally in another dtype or split over `tp` GPUs."""
    if check_name("model", name) not in MODELS:
        raise KvbenchError(f"unknown model {name!r}; presets: {', '.join(MODELS)} "
                         "(or pass a Hugging Face config.json)")
    spec = MODELS[name]
    return dataclasses.replace(spec, dtype=dtype or spec.dtype, tp=tp)


HF_REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
               "vocab_size")
HF_OPTIONAL = ("num_key_value_heads", "head_dim")


def from_hf_config(path: str | Path, dtype: str | None = None, tp: int = 1) -> ModelSpec:
    """Read a local Hugging Face `config.json` (Llama/Mistral/Qwen style keys)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except OSError as exc:
        raise KvbenchError(f"cannot read model config {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KvbenchError(f"cannot read model config {path}: {exc}") from None
    except RecursionError:
        raise KvbenchError(f"cannot read model config {path}: JSON nested too deeply") from None
    return from_hf_dict(cfg, str(path), path.parent.name, dtype, tp)


def from_hf_dict(cfg: dict, origin: str, default_name: str = "custom", dtype: str | None = None,
                 tp: int = 1) -> ModelSpec:
    """A Hugging Face config as a dict (a config.json's content, or a loaded config's
    `to_dict()`); `origin` names it in errors."""
    if not isinstance(cfg, dict):
        raise KvbenchError(f"model config {origin}: expected a JSON object, got "
                         f"{type(cfg).__name__}")
    missing = [k for k in HF_REQUIRED if k not in cfg]
    if missing:
        raise KvbenchError(f"model config {origin}: missing key(s) {', '.join(missing)}")
    given = {k: cfg[k] for k in (*HF_REQUIRED, *HF_OPTIONAL) if cfg.get(k) is not None}
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KvbenchError(f"model config {origin}: {key} must be a positive integer, got "
                             f"{value!r}")
    heads, hidden = given["num_attention_heads"], given["hidden_size"]
    if "head_dim" not in given and hidden % heads:
        raise KvbenchError(f"model config {origin}: hidden_size {hidden} is not a multiple of "
                         f"num_attention_heads {heads}; give head_dim")
    name = cfg.get("_name_or_path") or cfg.get("model_type") or default_name or "custom"
    dtype = dtype or cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    for key, value in (("name", name), ("dtype", dtype)):
        if not isinstance(value, str):
            raise KvbenchError(f"model config {origin}: the model's {key} must be a string, got "
                             f"{value!r}")
    return ModelSpec(
        name=name,
        num_layers=given["num_hidden_layers"],
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=given.get("num_key_value_heads", heads),
        head_dim=given.get("head_dim", hidden // heads),
        intermediate_size=given["intermediate_size"],
        vocab_size=given["vocab_size"],
        # transformers >= 4.56 writes "dtype"; older versions wrote "torch_dtype".
        dtype=dtype,
        tp=tp,
    )


def presets_table() -> Table:
    """The model presets with their shapes, KV bytes per token and parameters (billions)."""
    table = Table(title="model presets")
    for col in ("name", "layers", "hidden", "heads", "kv_heads", "head_dim", "dtype",
                "kv_bytes_per_token", "params_b"):
        table.add_column(col, justify="left" if col in ("name", "dtype") else "right")
    for spec in MODELS.values():
        params_b = (spec.non_embedding_params + 2 * spec.vocab_size * spec.hidden_size) / 1e9
        table.add_row(spec.name, str(spec.num_layers), str(spec.hidden_size),
                      str(spec.num_heads), str(spec.num_kv_heads), str(spec.head_dim),
                      spec.dtype, f"{spec.kv_bytes_per_token:,.0f}", f"{params_b:.2f}")
    return table

# The fields that make two specs price alike (a profile's model against a served one).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size", "vocab_size")
