"""Issue 13, defect 1: the calibration's memory plan (kvbench.calibration.memory), refusal before
any allocation, and out-of-memory errors that still happen (the CPU allocator's included).
Issue 20, item 7: no calibration grows past the plan it prints."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbench.calibration import memory, pipeline, sweeps
from kvbench.calibration.memory import (
    GIB,
    MemoryPlanError,
    decode_bytes,
    fit_plan,
    prefill_bytes,
    swap_bytes,
)
from kvbench.calibration.plans import PLANS, CalibrationPlan, TokenSweep, geometric_sizes
from kvbench.calibration.sweeps import is_out_of_memory
from kvbench.models import ModelSpec, get_model

CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
           "memory: you tried to allocate 17179869184 bytes. Error code 12 (Cannot allocate "
           "memory)")
TINY_PLAN = CalibrationPlan(swap_tokens=TokenSweep(16, 2048, 6),
                            prefill_tokens=TokenSweep(16, 512, 6), decode_batch_sizes=(1, 4, 8),
                            decode_contexts=(32, 128), per_block_max_tokens=None,
                            swap_interleave_s=0.2, prefill_interleave_s=0.2)
# The two configs: hidden 65536 x 200 layers, and a 120-layer one whose full plan wanted
# a 16.1 GB cache and an 8.05 GB host buffer on a 24 GB machine.
HUGE = {"num_hidden_layers": 200, "hidden_size": 65536, "num_attention_heads": 64,
        "intermediate_size": 262144, "vocab_size": 32000}
BIG = ModelSpec("big-120", 120, 8192, 64, 64, 128, 28672, 32000)
MID = ModelSpec("mid", 4, 512, 8, 2, 64, 1536, 32000, dtype="bfloat16")
# Its weights dominate its prefill: the LM head's float32 draw (0.76 GiB) beside its bfloat16
# copy. Drawn, then divided out of place, it took a second float32 copy: past the estimate.
HEAD_HEAVY = ModelSpec("head-heavy", 2, 1024, 8, 8, 128, 1024, 200_000, dtype="bfloat16")
# Inputs that grew a calibration past its plan, or past any machine's memory (issue 20, item 7).
OFFENDERS = {
    # 2.4 GiB a layer: drawing the weights peaked 8.4 GiB above the start, the plan said 7.9
    "wide-mlp": {"num_hidden_layers": 2, "hidden_size": 1024, "num_attention_heads": 8,
                 "intermediate_size": 400_000, "vocab_size": 1000},
    # a 100B-parameter model: its prefill's smallest points need 26 GiB
    "100b": {"num_hidden_layers": 96, "hidden_size": 12288, "num_attention_heads": 96,
             "num_key_value_heads": 8, "intermediate_size": 49152, "vocab_size": 256000},
}
CHILD_LIMIT_BYTES = 4 * GIB


@pytest.mark.parametrize("exc, oom", [
    (RuntimeError(CPU_OOM), True),
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("can't allocate memory"), False),
])
def test_out_of_memory_is_recognised_on_cpu_too(exc, oom):
    """Defect 1: torch's CPU allocator says "can't allocate memory", not "out of memory"."""
    assert is_out_of_memory(exc) is oom


def test_huge_config_is_refused_from_the_estimate(tmp_path, run_cli, monkeypatch):
    """Defect 1: hidden 65536 x 200 layers ended in a traceback after 11 s of allocating; now
    the estimate refuses it in one line before any sweep allocates."""
    def never(*args, **kwargs):
        raise AssertionError("a sweep started")

    for name in ("swap_sweep", "prefill_sweep", "decode_sweep"):
        monkeypatch.setattr(pipeline, name, never)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(HUGE))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, out, err = run_cli("calibrate", "--device", "cpu", "--config-json", str(config),
                             "--out", str(tmp_path / "p.json"))
    assert code == 2 and out == ""
    assert err.startswith("error: not enough memory to calibrate ") and err.count("\n") == 1
    assert "swap needs" in err and "GiB usable of" in err
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kib < 2**20  # nothing near the GiBs the plan needs was allocated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_plan_shrinks_to_what_fits():
    """Defect 1: the 120-layer config's plan (16.1 GB cache + 8.05 GB host buffer) grew past
    18 GB of RSS on a 24 GB machine; the plan keeps the sizes that fit and says what it dropped."""
    plan = PLANS[("cpu", False)]
    available = {"host": 24 * GIB, "device": 24 * GIB}
    args = (BIG, "cpu", 16, plan.swap_tokens.sizes(), plan.prefill_tokens.sizes(),
            plan.decode_batch_sizes, plan.decode_contexts)
    fitted = fit_plan(*args, available=available)
    usable = memory.USABLE_FRACTION * 24 * GIB
    assert len(fitted.swap_sizes) >= memory.MIN_POINTS["swap"]
    assert sum(swap_bytes(BIG, 16, fitted.swap_sizes[-1]).values()) <= usable
    assert fitted.swap_sizes[-1] < 2048 < plan.swap_tokens.max_tokens
    assert prefill_bytes(BIG, fitted.prefill_sizes[-1]) <= usable
    assert decode_bytes(BIG, fitted.decode_batches[-1], fitted.decode_contexts[-1]) <= usable
    assert fitted.notes[0].startswith("swap: sizes from ") and "GiB usable" in fitted.notes[0]
    assert fit_plan(*args, available={"host": 2000 * GIB, "device": 2000 * GIB}).notes == []
    with pytest.raises(MemoryPlanError, match="not enough memory .* 0.40 GiB usable of 0.50"):
        fit_plan(*args, available={"host": GIB // 2, "device": GIB // 2})


def test_cuda_plan_counts_gpu_and_host_separately():
    """On CUDA the cache is on the GPU and the swap space in RAM: each side has its budget."""
    spec = get_model("llama-3-8b")
    sizes = geometric_sizes(16, 65536, 14)
    small_gpu = fit_plan(spec, "cuda", 16, sizes, [128, 256, 512, 1024, 2048], [1, 2], [512, 1024],
                         available={"host": 512 * GIB, "device": 20 * GIB})
    small_ram = fit_plan(spec, "cuda", 16, sizes, [128, 256, 512, 1024, 2048], [1, 2], [512, 1024],
                         available={"host": 10 * GIB, "device": 80 * GIB})
    assert swap_bytes(spec, 16, small_gpu.swap_sizes[-1])["device"] <= 16 * GIB
    assert swap_bytes(spec, 16, small_ram.swap_sizes[-1])["host"] <= 8 * GIB
    assert small_ram.swap_sizes[-1] != small_gpu.swap_sizes[-1]


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux 4.0+)
        return True
    except OSError:
        return False


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.mark.skipif(not _reset_peak_rss(), reason="needs Linux's resettable peak RSS")
# The swap space over glibc's 32 MiB mmap threshold: fresh pages, not heap earlier tests freed.
@pytest.mark.parametrize("phase, spec, size", [("swap", MID, 32768), ("prefill", MID, 2048),
                                               ("decode", MID, 2048), ("prefill", HEAD_HEAVY, 16)])
def test_estimates_bound_the_measured_peaks(phase, spec, size):
    """Each phase's estimate is at least the peak RSS its sweep reaches (one point each)."""
    quiet = lambda phase, text, start=False: None  # noqa: E731
    runs = {"swap": (lambda: sweeps.swap_sweep(spec, "cpu", 16, [size], ("torch",), quiet),
                     sum(swap_bytes(spec, 16, size).values())),
            "prefill": (lambda: sweeps.prefill_sweep(spec, "cpu", [size], quiet),
                        prefill_bytes(spec, size)),
            "decode": (lambda: sweeps.decode_sweep(spec, "cpu", [16], [size], quiet),
                       decode_bytes(spec, 16, size))}
    run, estimate = runs[phase]
    _reset_peak_rss()
    base = _rss_bytes("VmRSS")
    run()
    peak = _rss_bytes("VmHWM") - base
    assert 0 < peak <= estimate, (peak / GIB, estimate / GIB)


def test_the_printed_peak_adds_the_resident_memory():
    """The plan's line says the most RAM the process will hold: what it held when planning (the
    interpreter, torch) plus its largest phase; on CUDA the GPU's peak beside it."""
    sizes = ([16, 32, 64, 128, 256], [16, 32, 64, 128, 256], [1, 2], [32, 64])
    plan = fit_plan(MID, "cpu", 16, *sizes, available={"host": 8 * GIB, "device": 8 * GIB})
    largest = max(sum(need.values()) for need in plan.need_bytes.values())
    assert 0 < plan.resident_bytes <= _rss_bytes("VmRSS")
    assert plan.peak_bytes() == {"host": plan.resident_bytes + largest}
    assert plan.line() == (f"RAM {memory.gib(largest + plan.resident_bytes)} at most (prefill, "
                           f"{memory.gib(plan.resident_bytes)} held before); 6.40 GiB usable of "
                           "8.00 GiB free RAM")
    cuda = fit_plan(MID, "cuda", 16, *sizes, available={"host": 8 * GIB, "device": 8 * GIB})
    assert cuda.peak_bytes() == {
        "device": max(need["device"] for need in cuda.need_bytes.values()),
        "host": cuda.resident_bytes + cuda.need_bytes["swap"]["host"]}
    assert cuda.line().startswith("GPU ") and ", RAM " in cuda.line()


def _run_child(args: list[str], tmp_path: Path, timeout_s: float = 120
               ) -> tuple[int, str, str, int]:
    """`kvbench ARGS` in a child process under an address-space limit of CHILD_LIMIT_BYTES (one
    torch thread, so its stacks and arenas stay small): (exit code, stdout, stderr, the child's
    own peak RSS in bytes, from wait4)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_LIMIT_BYTES, CHILD_LIMIT_BYTES))

    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as out_fh, err.open("w") as err_fh:
        child = subprocess.Popen([sys.executable, "-m", "kvbench.cli", *args], stdout=out_fh,
                                 stderr=err_fh, preexec_fn=limit,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout_s
    while not (waited := os.wait4(child.pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            child.kill()
        time.sleep(0.05)
    child.returncode = os.waitstatus_to_exitcode(waited[1])
    return child.returncode, out.read_text(), err.read_text(), waited[2].ru_maxrss * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("name", OFFENDERS)
def test_offenders_are_refused_in_one_line_before_allocating(tmp_path, name):
    """Issue 20, item 7: a calibration past the machine's memory is refused by its plan, in one
    line, before any weights or caches exist. The child's address-space limit (`ulimit -v`) is
    what the plan sees as free, so the refusal does not depend on this machine's RAM."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(OFFENDERS[name]))
    code, out, err, peak_bytes = _run_child(
        ["calibrate", "--device", "cpu", "--quick", "--config-json", str(config), "--out",
         str(tmp_path / "p.json")], tmp_path)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("error: not enough memory to calibrate "), err
    free_gib = float(re.search(r"of ([\d.]+) GiB free RAM", err).group(1))
    assert free_gib < CHILD_LIMIT_BYTES / GIB  # the limit, not the machine's RAM
    assert peak_bytes < GIB, peak_bytes / GIB  # the interpreter, torch, the dtype probe
    assert not (tmp_path / "p.json").exists()


def test_weights_out_of_memory_ends_the_run_in_one_line(tmp_path, run_cli, monkeypatch):
    """Defect 1: `cold_layers` and the LM head allocated outside any guard; an allocator failure
    there is now one line (exit 2), and nothing is written."""
    def no_memory(*args, **kwargs):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setitem(PLANS, ("cpu", True), TINY_PLAN)
    monkeypatch.setattr(sweeps, "LMHead", no_memory)
    out = tmp_path / "p.json"
    code, stdout, err = run_cli("calibrate", "--device", "cpu", "--model", "tiny", "--quick",
                                "--out", str(out))
    assert code == 2 and stdout == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [err.splitlines()[-1]] and errors[0].startswith(
        "error: prefill sweep ran out of memory before its first point ([enforce fail")
    assert not out.exists()


def test_out_of_memory_during_a_sweep_ends_it_and_is_recorded(monkeypatch):
    """Defect 1: an out-of-memory error that still happens (the CPU allocator's message) ends
    that sweep at that size; the profile records it and fits the points before it."""
    real_hidden, real_cache = sweeps.random_hidden, sweeps.allocate_kv_cache

    def hidden(num_tokens, *args):
        if num_tokens >= 512:
            raise RuntimeError(CPU_OOM)
        return real_hidden(num_tokens, *args)

    def cache(num_layers, num_blocks, *args):
        if num_blocks * 8 >= 2 * 2048:  # the pool for the largest swap size
            raise RuntimeError(CPU_OOM)
        return real_cache(num_layers, num_blocks, *args)

    monkeypatch.setattr(sweeps, "random_hidden", hidden)
    monkeypatch.setattr(sweeps, "allocate_kv_cache", cache)
    plan = dataclasses.replace(TINY_PLAN, prefill_tokens=TokenSweep(16, 512, 7),
                               swap_tokens=TokenSweep(16, 2048, 7))
    run = pipeline.calibrate(pipeline.calibration_model("cpu", "tiny"), "cpu", block_size=8,
                             quick=True, plan=plan)
    stopped = run.profile.extra["stopped"]
    assert stopped["prefill"] == "out of memory at 512 tokens"
    assert stopped["swap"] == "out of memory allocating 2048 tokens"
    assert run.profile.recompute.fit.max_tokens < 512 and run.profile.swap_out.fit.max_tokens < 2048
    lines = pipeline.calibration_summary(run.profile, [Path("p.json")] * 3)
    assert "note: sweep ended early: out of memory at 512 tokens" in lines


def test_too_few_points_left_is_one_line(monkeypatch):
    """An out-of-memory error that leaves fewer points than a fit needs is a MemoryPlanError
    (one line through the CLI), not a fitting error."""
    real_hidden = sweeps.random_hidden

    def hidden(num_tokens, *args):
        if num_tokens >= 64:
            raise RuntimeError(CPU_OOM)
        return real_hidden(num_tokens, *args)

    monkeypatch.setattr(sweeps, "random_hidden", hidden)
    with pytest.raises(MemoryPlanError, match=r"prefill sweep ended early \(out of memory at "
                                              r"\d+ tokens\) after \d points; 5 are needed"):
        pipeline.calibrate(pipeline.calibration_model("cpu", "tiny"), "cpu", block_size=8,
                           quick=True, plan=TINY_PLAN)
