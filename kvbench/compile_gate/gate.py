"""The compile gate: every kernel the ops launch, compiled for sm_90 and sm_80, and checked.

The cases call the real wrappers (`swap_out`, `swap_in`, `prefill_attention`) on "meta"
tensors under the stand-in driver (`driver.py`), with the shapes calibration and the
benchmarks use:
  copy       llama-3-8b and qwen2.5-0.5b KV geometry, bf16 and fp16, block sizes 16 and 32,
             both directions, every request buffer calibration's CUDA plans rotate through
             (`kvbench.calibration.sweeps.swap_requests`, at their real offsets);
  attention  every (dtype, head_dim) config of the target's `TRITON_CONFIGS` table (fp16,
             bf16, fp32; head_dim 16-256), causal and not, one sequence of 32768 tokens and a
             packed batch (llama-3-8b heads at head_dim 128, qwen2.5-0.5b at 64, 8 query / 2
             KV heads otherwise).
Each distinct compiled kernel is a row, checked: it compiled and "launched" (Triton's own
shared-memory and thread checks passed against the target's limits); no spills (cuobjdump:
stack and local bytes 0); dynamic plus static shared memory within the limit; the copy's
global loads and stores 16 bytes wide (its one 4-byte load is the block id) and the wrapper
raised no UnalignedCopyWarning; 16-bit attention dots on tensor cores (wgmma on sm_90,
mma.sync on sm_80). Compile-only: no kernel here has run on a GPU.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator

import torch

from kvbench.compile_gate.driver import (
    StandInDriver,
    Target,
    ptxas_version,
    resource_usage,
)
from kvbench.compile_gate.ptx import global_access_bytes, uses
from kvbench.ops.kv_copy import UnalignedCopyWarning

COPY_MODELS = ("llama-3-8b", "qwen2.5-0.5b")
BLOCK_SIZES = (16, 32)
HALF_DTYPES = ("bfloat16", "float16")
ATTENTION_HEADS = {64: "qwen2.5-0.5b", 128: "llama-3-8b"}  # head_dim -> model; else 8/2 heads
ATTENTION_TOKENS = 32768  # calibration's and the benchmark's longest prefill
PACKED_LENGTHS = (1, 1000, 0, 17, 2048, 129)  # as the GPU test's packed batch
ID_LOAD_BYTES = 4  # the copy's one non-data load: the block id (int32)

Case = tuple[str, Callable[[], None]]  # (label, what to call)


def _copy_cases(target: Target) -> Iterator[Case]:
    from kvbench.calibration.plans import PLANS
    from kvbench.calibration.sweeps import swap_requests, swap_space
    from kvbench.models import get_model
    from kvbench.ops import swap_in, swap_out

    sizes = sorted({n for quick in (True, False)
                    for n in PLANS[("cuda", quick)].swap_tokens.sizes()})
    for model in COPY_MODELS:
        for dtype in HALF_DTYPES:
            spec = dataclasses.replace(get_model(model), dtype=dtype)
            for block_size in BLOCK_SIZES:
                cache, host = swap_space(spec, "meta", block_size, -(-max(sizes) // block_size))
                options = dict(impl="triton", num_programs=4 * target.num_sms)
                requests = [r for n in sizes
                            for r in swap_requests(spec, cache, host, block_size, n,
                                                   torch.Generator().manual_seed(n))]

                def out(requests=requests, cache=cache, options=options):
                    for ids, dst in requests:
                        swap_out(cache, ids, dst=dst, **options)

                def back(requests=requests, cache=cache, options=options):
                    for ids, src in requests:
                        swap_in(src, cache, ids, **options)

                label = f"{model} {dtype} block {block_size}"
                yield f"{label} swap_out", out
                yield f"{label} swap_in", back


def _attention_inputs(dtype: torch.dtype, head_dim: int, num_tokens: int):
    from kvbench.models import get_model

    model = ATTENTION_HEADS.get(head_dim)
    heads = (8, 2) if model is None else (get_model(model).num_heads,
                                          get_model(model).num_kv_heads)
    q, k, v = (torch.empty(num_tokens, h, head_dim, dtype=dtype, device="meta")
               for h in (heads[0], heads[1], heads[1]))
    return model or "8/2 heads", q, k, v


VARIANTS = [(causal, packed) for causal in (True, False) for packed in (False, True)]


def attention_cases(configs: dict, variants=VARIANTS) -> Iterator[Case]:
    """prefill_attention for each (dtype, head_dim) of `configs` with each of its configs
    (None: the op's own choice), in each (causal, packed) variant: one sequence of
    ATTENTION_TOKENS, or a packed batch of PACKED_LENGTHS."""
    from kvbench.ops import prefill_attention

    packed = torch.tensor([0, *PACKED_LENGTHS]).cumsum(0).to(torch.int32)
    for (dtype, head_dim), choices in configs.items():
        for causal, is_packed in variants:
            cu_seqlens = packed if is_packed else None
            n = int(packed[-1]) if is_packed else ATTENTION_TOKENS
            model, q, k, v = _attention_inputs(dtype, head_dim, n)
            label = (f"{model} {str(dtype).removeprefix('torch.')} d{head_dim} "
                     f"{'causal' if causal else 'full'}, "
                     + (f"{len(PACKED_LENGTHS)} sequences" if is_packed else f"{n} tokens"))
            for config in choices:
                options = {} if config is None else {"config": config}

                def call(q=q, k=k, v=v, causal=causal, cu_seqlens=cu_seqlens, options=options):
                    prefill_attention(q, k, v, causal=causal, impl="triton",
                                      cu_seqlens=cu_seqlens, **options)

                yield label + ("" if config is None else f", {config}"), call


def _compiled_kernels() -> dict:
    """Triton's compiled kernels of the two JIT functions, by hash."""
    from kvbench.kernels.kv_copy import copy_blocks_kernel
    from kvbench.kernels.prefill_attention import prefill_attention_kernel

    return {k.hash: (jit, k) for jit in (copy_blocks_kernel, prefill_attention_kernel)
            for k in jit.device_caches[0][0].values()}


def _describe(jit, kernel) -> dict:
    """The compile-time choices of a compiled kernel: its constants (constexprs, and integer
    arguments specialized because they equal 1), warps, stages, and the arguments Triton may
    assume divisible by 16 (aligned pointers, integers)."""
    names = jit.arg_names
    constants = {names[path[0]]: value if isinstance(value, (bool, int, float, str))
                 else str(value) for path, value in sorted(kernel.src.constants.items())}
    divisible = [names[path[0]] for path, attrs in sorted(kernel.src.attrs.items())
                 if ("tt.divisibility", 16) in [tuple(a) for a in attrs]]
    return {**constants, "num_warps": kernel.metadata.num_warps,
            "num_stages": kernel.metadata.num_stages, "divisible_by_16": divisible}


def _check(target: Target, row: dict) -> list[str]:
    failures = []
    if row["stack_bytes"] or row["local_bytes"]:
        failures.append(f"spills: {row['stack_bytes']} B stack, {row['local_bytes']} B local "
                        "per thread")
    shared = row["shared_bytes"] + row["static_shared_bytes"]
    if shared > target.max_shared_bytes:
        failures.append(f"shared memory {shared} B over {target.gpu}'s "
                        f"{target.max_shared_bytes} B")
    loads, stores = row["load_bytes"], row["store_bytes"]
    if row["kernel"] == "copy_blocks_kernel":
        if set(loads) - {ID_LOAD_BYTES} != {16} or stores != [16]:
            failures.append(f"copy accesses not all 16 bytes wide: loads {loads} B, stores "
                            f"{stores} B")
    elif row["tensor_cores"] is False:
        failures.append(f"16-bit dots without {target.tensor_core_op}")
    return failures


def _row(target: Target, jit, kernel) -> dict:
    ptx = kernel.asm["ptx"]
    half = kernel.src.signature.get("q_ptr") in ("*fp16", "*bf16")
    row = {"kernel": kernel.name, "pointer_type": kernel.src.signature[jit.arg_names[0]],
           "config": _describe(jit, kernel), "cases": [], "launches": 0,
           **resource_usage(kernel.asm["cubin"]), "shared_bytes": kernel.metadata.shared,
           **{f"{kind}_bytes": widths for kind, widths in global_access_bytes(ptx).items()},
           "tensor_cores": uses(ptx, target.tensor_core_op) if half else None}
    row["failures"] = _check(target, row)
    return row


def run(target: Target, cases: Iterator[Case], driver: StandInDriver,
        progress: Callable[[str], None], rows: dict | None = None) -> dict[str, dict]:
    """Run `cases` under `driver`; into `rows` (returned), one row per distinct compiled kernel
    (by Triton's hash), with the cases that compiled or launched it, its resource usage,
    access widths and failures (a case that failed before compiling anything is a row of its
    own, without a kernel)."""
    rows = {} if rows is None else rows
    for label, call in cases:
        progress(label)
        seen, before = set(_compiled_kernels()), len(driver.launches)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call()
                error = None
            except Exception as exc:  # noqa: BLE001 - any failure to compile or launch is data
                error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        warned = sorted({f"UnalignedCopyWarning: {w.message}" for w in caught
                         if issubclass(w.category, UnalignedCopyWarning)})
        compiled = _compiled_kernels()
        launched = [launch.hash for launch in driver.launches[before:]]
        touched = dict.fromkeys([h for h in compiled if h not in seen] + launched)
        if not touched:
            rows[label] = {"kernel": None, "cases": [label], "failures": [error or "no launch"]}
        for h in touched:
            row = rows.get(h) or rows.setdefault(h, _row(target, *compiled[h]))
            if label not in row["cases"]:
                row["cases"].append(label)
            row["launches"] += launched.count(h)
            failures = warned + ([error] if error and h not in launched else [])
            row["failures"] += [f for f in failures if f not in row["failures"]]
    return rows


def ordered(rows: dict[str, dict]) -> list[dict]:
    return sorted(rows.values(), key=lambda r: (r["kernel"] or "", r["cases"][0]))


def result(target: Target, rows: dict[str, dict], **extra) -> dict:
    """A target's results as written to sm<arch>.json."""
    import triton

    kernels = ordered(rows)
    return {"target": target.name, "gpu_limits_of": target.gpu,
            "max_shared_bytes": target.max_shared_bytes, "triton": triton.__version__,
            "ptxas": ptxas_version(target.arch), "compile_only": True,
            "failures": sum(bool(r["failures"]) for r in kernels), **extra, "kernels": kernels}


def run_gate(target: Target, driver: StandInDriver, progress: Callable[[str], None]) -> dict:
    """The gate for `target`: the copy cases, then the attention configs of the target's
    `TRITON_CONFIGS`."""
    from kvbench.ops.prefill_attention import TRITON_CONFIGS, target_family

    rows = run(target, _copy_cases(target), driver, progress)
    own = {key: [None] for key in TRITON_CONFIGS[target_family(target.arch)]}
    return result(target, run(target, attention_cases(own), driver, progress, rows))
