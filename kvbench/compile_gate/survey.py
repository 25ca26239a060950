"""The attention configs the op could launch, and the rule that picks one per target and
(dtype, head_dim).

`python -m kvbench.compile_gate --survey` compiles every candidate below for each target
(causal, one long sequence), ranks those that pass the gate's checks by the largest tile
(BLOCK_M·BLOCK_N), then the most stages, then the fewest warps, and takes the first that also
passes in every variant the gate compiles (causal or not, one sequence or packed).
`TRITON_CONFIGS` in kvbench.ops.prefill_attention must equal these picks (a test holds it to
the committed survey). The rule ranks what compiles cleanly; no candidate has been timed on a
GPU. fp16 compiles as bf16 does: it takes bf16's pick and the gate checks it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvbench.compile_gate.driver import StandInDriver, Target
from kvbench.compile_gate.gate import attention_cases, result, run
from kvbench.ops.prefill_attention import TRITON_HEAD_DIMS, AttentionConfig

# 16-bit: the tiles of the former autotune list, plus 8-warp 64-row tiles.
_HALF = ([AttentionConfig(128, n, w, s) for n in (64, 128) for w in (4, 8) for s in (2, 3, 4)
          if w == 4 or n == 128]
         + [AttentionConfig(64, n, w, s) for n in (32, 64) for w in (4, 8) for s in (2, 3)])
# float32 "ieee" dots run on FMA units: small tiles (64-row and larger spill heavily).
_FP32 = [AttentionConfig(m, 16, w, 2) for m in (16, 32) for w in (4, 8)] \
    + [AttentionConfig(32, 16, 4, 3), AttentionConfig(32, 32, 4, 2)] \
    + [AttentionConfig(16, 16, w, 1) for w in (4, 8)]
CANDIDATES = {**{(torch.bfloat16, d): _HALF for d in TRITON_HEAD_DIMS},
              **{(torch.float32, d): _FP32 for d in TRITON_HEAD_DIMS}}


def rank(config: AttentionConfig) -> tuple[int, int, int]:
    """Higher is preferred: tile area, then stages, then fewer warps."""
    return (config.block_m * config.block_n, config.num_stages, -config.num_warps)


POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _rows_of(rows: dict, dtype: torch.dtype, head_dim: int) -> list[dict]:
    return [r for r in rows.values() if r["kernel"] and r["pointer_type"] ==
            POINTER_TYPES[dtype] and r["config"]["HEAD_DIM"] == head_dim]


def _config_of(row: dict) -> AttentionConfig:
    c = row["config"]
    return AttentionConfig(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"])


def run_survey(target: Target, driver: StandInDriver, progress: Callable[[str], None]) -> dict:
    """Compile the candidates for `target` and pick one per (dtype, head_dim); the result has
    every compiled row and "picks": {"dtype/head_dim": config as a dict}."""
    rows = run(target, attention_cases(CANDIDATES, [(True, False)]), driver, progress)
    picks = {}
    for (dtype, head_dim), candidates in CANDIDATES.items():
        clean = {_config_of(r) for r in _rows_of(rows, dtype, head_dim) if not r["failures"]}
        for config in sorted(clean & set(candidates), key=rank, reverse=True):
            run(target, attention_cases({(dtype, head_dim): [config]}), driver, progress, rows)
            mine = [r for r in _rows_of(rows, dtype, head_dim) if _config_of(r) == config]
            if not any(r["failures"] for r in mine) and not any(
                    r["kernel"] is None and str(config) in r["cases"][0] for r in rows.values()):
                picks[f"{str(dtype).removeprefix('torch.')}/{head_dim}"] = config.to_dict()
                break
    return result(target, rows, picks=picks)
