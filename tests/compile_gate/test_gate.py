"""The compile gate: its readers (PTX, resource limits, checks), a real compile of the copy
kernel for sm_90 on aligned and unaligned buffers, and the committed results against the
configs the op launches today. The full gate is `make compile-gate` (CI)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from kvbench.compile_gate.driver import TARGETS, max_threads  # noqa: E402
from kvbench.compile_gate.gate import _check  # noqa: E402
from kvbench.compile_gate.ptx import global_access_bytes, uses  # noqa: E402
from kvbench.ops.prefill_attention import TRITON_CONFIGS, target_family  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "results" / "compile-gate"
PTX = """
\tld.global.b32 \t%r1, [%rd1];
\t@%p1 ld.global.v4.b32 \t{ %r2, %r3, %r4, %r5 }, [ %rd2 + 0 ];
\tld.global.L1::evict_last.v2.b16 \t{ %rs1, %rs2 }, [%rd3];
\t@!%p2 st.global.v4.b32 \t[ %rd4 + 0 ], { %r2, %r3, %r4, %r5 };
\tcp.async.cg.shared.global [ %r6 + 0 ], [ %rd5 + 0 ], 0x10, %r7;
\t// wgmma.mma_async in a comment is not an instruction
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
"""


def test_ptx_access_widths_and_instructions():
    assert global_access_bytes(PTX) == {"load": [4, 16], "store": [16]}
    assert global_access_bytes("ld.global.b16 %rs1, [%rd1];\nst.global.b8 [%rd2], %rs1;") == \
        {"load": [2], "store": [1]}
    assert uses(PTX, "mma.sync.aligned") and not uses(PTX, "wgmma.mma_async")
    assert uses("\t@%p3 wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {}", "wgmma")


def test_threads_per_block_from_registers():
    assert max_threads(255) == 256 and max_threads(128) == 512 and max_threads(32) == 1024


def row(**changes):
    base = {"kernel": "copy_blocks_kernel", "stack_bytes": 0, "local_bytes": 0,
            "shared_bytes": 0, "static_shared_bytes": 0, "load_bytes": [4, 16],
            "store_bytes": [16], "tensor_cores": None}
    return {**base, **changes}


@pytest.mark.parametrize("changes, failure", [
    ({}, None),
    ({"stack_bytes": 152}, "spills: 152 B stack"),
    ({"load_bytes": [2, 4]}, "not all 16 bytes wide"),
    ({"store_bytes": [2, 16]}, "not all 16 bytes wide"),
    ({"shared_bytes": 231424, "static_shared_bytes": 1024}, None),
    ({"shared_bytes": 232448, "static_shared_bytes": 1024}, "over H100 SXM's 232448 B"),
    ({"kernel": "prefill_attention_kernel", "load_bytes": [2], "tensor_cores": False},
     "without wgmma.mma_async"),
])
def test_checks(changes, failure):
    failures = _check(TARGETS[90], row(**changes))
    assert failures == [] if failure is None else any(failure in f for f in failures)


MINI_GATE = """
import json, sys, torch
from kvbench.compile_gate.driver import TARGETS, install
from kvbench.compile_gate.gate import ordered, run
from kvbench.ops import allocate_kv_cache, packed_shape, prepare_block_ids, swap_out

target = TARGETS[90]
driver = install(target)
cache = allocate_kv_cache(32, 64, 16, 8, 128, "bf16", device="meta")
ids = prepare_block_ids(cache, [3, 9, 27])
host = torch.empty(cache.numel() // 2, dtype=cache.dtype, device="meta")
size = torch.Size(packed_shape(cache, 3)).numel()
cases = [(f"offset {o}", lambda o=o: swap_out(cache, ids, dst=host[o:o + size].view(
    packed_shape(cache, 3)), impl="triton")) for o in (0, 8, 3)]
print(json.dumps(ordered(run(target, cases, driver, lambda text: None))))
"""


def test_gate_compiles_the_copy_for_sm90_and_catches_an_unaligned_buffer(tmp_path):
    """Offsets 0 and 8 elements (16 bytes) compile to one kernel with 16-byte loads and
    stores; offset 3 (6 bytes) compiles to another with 2-byte stores, and the wrapper warned:
    both fail the gate."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, "-c", MINI_GATE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    by_case = {case: r for r in rows for case in r["cases"]}
    aligned, unaligned = by_case["offset 0"], by_case["offset 3"]
    assert by_case["offset 8"] is aligned and aligned["launches"] == 2
    assert aligned["failures"] == [] and aligned["load_bytes"] == [4, 16]
    assert aligned["registers"] > 0 and aligned["stack_bytes"] == 0
    assert "dst_ptr" in aligned["config"]["divisible_by_16"]
    assert "dst_ptr" not in unaligned["config"]["divisible_by_16"]
    assert 16 not in unaligned["store_bytes"] or len(unaligned["store_bytes"]) > 1
    assert any("not all 16 bytes wide" in f for f in unaligned["failures"])
    assert any("UnalignedCopyWarning: Triton KV copy: destination starts 6 bytes" in f
               for f in unaligned["failures"])


@pytest.mark.parametrize("arch", [90, 80])
def test_committed_gate_results_cover_todays_configs(arch):
    """results/compile-gate/sm<arch>.json passed, and compiled every attention config the op
    launches on that target today: rerun `make compile-gate` after changing one."""
    result = json.loads((RESULTS / f"sm{arch}.json").read_text())
    assert result["compile_only"] and result["failures"] == 0
    compiled = {(r["pointer_type"], r["config"]["HEAD_DIM"],
                 (r["config"]["BLOCK_M"], r["config"]["BLOCK_N"], r["config"]["num_warps"],
                  r["config"]["num_stages"]))
                for r in result["kernels"] if r["kernel"] == "prefill_attention_kernel"}
    pointer = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    expected = {(pointer[dtype], d, (c.block_m, c.block_n, c.num_warps, c.num_stages))
                for (dtype, d), c in TRITON_CONFIGS[target_family(arch)].items()}
    assert compiled == expected
    assert {r["kernel"] for r in result["kernels"]} == {"copy_blocks_kernel",
                                                        "prefill_attention_kernel"}


@pytest.mark.parametrize("arch", [90, 80])
def test_configs_are_the_surveys_picks(arch):
    """TRITON_CONFIGS is what the survey's rule picked (fp16 takes bf16's pick)."""
    picks = json.loads((RESULTS / f"candidates-sm{arch}.json").read_text())["picks"]
    table = TRITON_CONFIGS[target_family(arch)]
    assert {f"{str(dtype).removeprefix('torch.')}/{d}": c.to_dict()
            for (dtype, d), c in table.items() if dtype != torch.float16} == picks
    assert all(table[(torch.float16, d)] == table[(torch.bfloat16, d)]
               for _, d in table)
