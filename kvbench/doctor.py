"""`kvbench doctor`: whether this machine is ready to calibrate, on one screen.

Checks, each ok / warn / fail / skip with what was found: library versions; the CUDA runtime
and driver, and whether the ptxas Triton assembles this GPU's kernels with is newer than the
driver supports (the fix: point Triton at an older ptxas); the GPU and its free memory; a
pinned host allocation; a zero-copy Triton copy through the GPU's mapping of pinned memory
(UVA), checked against the reference; the PCIe link (NVML through nvidia-ml-py, else
nvidia-smi); and the memory and time the calibration of a model would take, failing when it
cannot fit (`require_calibration_fits` lets `kvbench calibrate` refuse before it starts).

Only the CPU branches have run: no GPU has been lent to this project, so every GPU check here
is unrun code (on this machine they say what they would check and skip).
"""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvbench import __version__
from kvbench.models import ModelSpec

GIB = 2**30
MEMORY_MARGIN = 1.1  # allocator slack over the estimated peak


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "warn", "fail" or "skip"
    detail: str


def _versions() -> list[Check]:
    try:
        import triton

        triton_check = Check("triton", "ok", triton.__version__)
    except ImportError:
        triton_check = Check("triton", "fail", "not installed: the Triton kernels cannot run "
                                               "(pip install triton)")
    cuda = f", built for CUDA {torch.version.cuda}" if torch.version.cuda else " (CPU build)"
    return [Check("python", "ok", platform.python_version()),
            Check("torch", "ok", f"{torch.__version__}{cuda}"), triton_check,
            Check("kvbench", "ok", __version__)]


def _nvml():
    """nvidia-ml-py, initialised, or None (not installed, or no NVIDIA driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - ImportError or an NVMLError: no NVML here
        return None


def _nvidia_smi(query: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the installed driver supports, e.g. (12, 4), or None."""
    nvml = _nvml()
    if nvml is not None:
        version = nvml.nvmlSystemGetCudaDriverVersion_v2()
        return version // 1000, version % 1000 // 10
    text = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout \
        if shutil.which("nvidia-smi") else ""
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _ptxas(arch: int, driver: tuple[int, int] | None) -> Check:
    """Triton's ptxas for `arch` against what the driver supports (a cubin from a newer ptxas
    may be refused: "device kernel image is invalid")."""
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.knobs import nvidia

    tool = get_ptxas(arch)
    knob = "ptxas" if tool.path == nvidia.ptxas.path else "ptxas_blackwell"
    env = type(nvidia).__dict__[knob].key  # the variable that overrides this ptxas
    detail = f"Triton assembles sm_{arch} with ptxas {tool.version} ({tool.path})"
    if driver is None:
        return Check(f"ptxas sm_{arch}", "ok" if not torch.cuda.is_available() else "warn",
                     f"{detail}; no NVIDIA driver found to compare with")
    newer = tuple(map(int, tool.version.split(".")[:2])) > driver
    if not newer:
        return Check(f"ptxas sm_{arch}", "ok",
                     f"{detail}; the driver supports CUDA {driver[0]}.{driver[1]}")
    return Check(f"ptxas sm_{arch}", "warn",
                 f"{detail}, newer than the driver's CUDA {driver[0]}.{driver[1]}: the driver "
                 f"may reject the kernels; set {env}=/usr/local/cuda/bin/ptxas (a ptxas no "
                 "newer than the driver)")


def _zero_copy() -> Check:
    """A Triton copy that writes pinned host memory through its device mapping (UVA)."""
    from kvbench.ops import allocate_kv_cache, packed_shape, swap_out
    from kvbench.reference import swap_out_ref

    cache = allocate_kv_cache(2, 16, 16, 2, 64, torch.bfloat16, device="cuda", seed=1)
    ids = [11, 2, 7]
    dst = torch.full(packed_shape(cache, 3), float("nan"), dtype=cache.dtype, pin_memory=True)
    swap_out(cache, ids, dst, impl="triton", zero_copy=True)
    torch.cuda.synchronize()
    if torch.equal(dst, swap_out_ref(cache, ids).cpu()):
        return Check("zero-copy (UVA)", "ok", "a Triton kernel wrote pinned host memory "
                                              "through its device mapping, bit-exact")
    return Check("zero-copy (UVA)", "fail", "the zero-copy Triton copy differs from the "
                                            "reference: use impl='torch' or zero_copy=False")


def _pcie(index: int) -> Check:
    nvml = _nvml()
    if nvml is not None:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        gen, width = (nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle),
                      nvml.nvmlDeviceGetCurrPcieLinkWidth(handle))
        top = (nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle),
               nvml.nvmlDeviceGetMaxPcieLinkWidth(handle))
    else:
        text = _nvidia_smi("pcie.link.gen.current,pcie.link.width.current,"
                           "pcie.link.gen.max,pcie.link.width.max")
        if text is None:
            return Check("PCIe link", "skip", "neither nvidia-ml-py nor nvidia-smi found")
        gen, width, *top = (int(x) for x in text.split(","))
    status = "ok" if (gen, width) == tuple(top) else "warn"
    note = "" if status == "ok" else f" (the slot allows Gen{top[0]} x{top[1]}: an idle GPU " \
                                     "may downclock its link; check under load)"
    return Check("PCIe link", status, f"Gen{gen} x{width}{note}")


def _gpu() -> list[Check]:
    if not torch.cuda.is_available():
        why = "a CPU build of torch" if torch.version.cuda is None else "no GPU visible"
        return [Check("GPU", "skip", f"torch sees no CUDA GPU ({why}): GPU checks skipped "
                                     "(driver, pinned memory, zero-copy, PCIe)")]
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    driver = driver_cuda_version()
    checks = [Check("GPU", "ok", f"{props.name}, sm_{props.major}{props.minor}, "
                                 f"{props.multi_processor_count} SMs, {free / GIB:.1f} of "
                                 f"{total / GIB:.1f} GiB free"),
              Check("CUDA driver", "ok" if driver else "warn",
                    f"supports CUDA {driver[0]}.{driver[1]}" if driver else "version unknown "
                    "(install nvidia-ml-py or put nvidia-smi on PATH)"),
              _ptxas(props.major * 10 + props.minor, driver)]
    try:
        pinned = torch.empty(64 * 2**20, dtype=torch.uint8, pin_memory=True)
        checks.append(Check("pinned memory", "ok" if pinned.is_pinned() else "fail",
                            "64 MiB page-locked host allocation"))
    except RuntimeError as exc:
        checks.append(Check("pinned memory", "fail", f"cannot pin host memory: {exc}"))
    checks += [_zero_copy(), _pcie(index)]
    return checks


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages."""
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(),
                          re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class CalibrationEstimate:
    """Peak memory of each phase of `kvbench calibrate` (bytes) and the sum of its timing
    budgets (seconds): the repetitions of a point stop at its budget (at least 3 of them)."""

    swap_device_bytes: int  # the KV cache the swaps gather from (2x the largest request)
    swap_host_bytes: int  # the swap space, pinned on CUDA (half the cache)
    prefill_bytes: int  # cold layers, LM head, activations at the longest prompt
    decode_bytes: int  # cold layers, LM head, one layer's K/V at the largest batch and context
    timed_seconds: float

    @property
    def device_peak_bytes(self) -> int:
        return int(MEMORY_MARGIN * max(self.swap_device_bytes, self.prefill_bytes,
                                       self.decode_bytes))


def estimate_calibration(spec: ModelSpec, device: str, block_size: int = 16,
                         quick: bool = False) -> CalibrationEstimate:
    """What `calibrate(spec, device, block_size, quick)` will allocate and time, from its plan
    (`kvbench.calibration.pipeline.PLANS`) and the sweeps' shapes; an estimate, not a
    measurement."""
    from kvbench.calibration.pipeline import PLANS, geometric_sizes
    from kvbench.calibration.sweeps import cold_layer_count, kv_shape
    from kvbench.ops import copy_impls

    plan = PLANS[(device, quick)]
    nbytes = spec.dtype_bytes
    swap_sizes = geometric_sizes(*plan["swap"])
    cache = math.prod(kv_shape(spec, 2 * -(-max(swap_sizes) // block_size), block_size)) * nbytes
    hq, hkv = spec.num_heads // spec.tp, spec.kv_heads_per_gpu
    inter = spec.intermediate_size // spec.tp
    weights = (cold_layer_count(spec) * spec.layer_params / spec.tp
               + spec.vocab_size // spec.tp * spec.hidden_size) * nbytes
    n = max(geometric_sizes(*plan["prefill"]))
    # per token: hidden states and norms (float32 copies), q/k/v, attention out, gate/up, act
    activations = n * ((6 * spec.hidden_size + (2 * hq + 2 * hkv) * spec.head_dim + 3 * inter)
                       * nbytes + 2 * 4 * spec.hidden_size)
    batches, contexts = plan["decode"]
    kv = 2 * max(batches) * hkv * max(contexts) * spec.head_dim * nbytes
    impls = [i for i in copy_impls(device) if device == "cuda" or i != "triton"]
    swap_points = len(swap_sizes) * len(impls)
    timed_ms = (2 * 300 * swap_points + (1500 + 500) * len(geometric_sizes(*plan["prefill"]))
                + (300 + 100) * len(batches) * len(contexts))
    return CalibrationEstimate(int(cache), int(cache // 2), int(weights + activations),
                               int(weights + kv), timed_ms / 1e3)


def calibration_problem(spec: ModelSpec, device: str, block_size: int = 16,
                        quick: bool = False) -> tuple[CalibrationEstimate, str | None]:
    """The estimate, and why the calibration cannot fit this machine (None: it fits)."""
    est = estimate_calibration(spec, device, block_size, quick)
    host = host_available_bytes()
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
        if est.device_peak_bytes > free:
            return est, (f"calibrating {spec.name} needs about {est.device_peak_bytes / GIB:.1f}"
                         f" GiB of GPU memory, {free / GIB:.1f} GiB is free: free the GPU, use "
                         "--quick, a smaller model or a larger GPU")
        if est.swap_host_bytes > host:
            return est, (f"the pinned swap space for {spec.name} needs "
                         f"{est.swap_host_bytes / GIB:.1f} GiB of host memory, "
                         f"{host / GIB:.1f} GiB is available")
    elif est.device_peak_bytes + est.swap_host_bytes > host:
        return est, (f"calibrating {spec.name} on the CPU needs about "
                     f"{(est.device_peak_bytes + est.swap_host_bytes) / GIB:.1f} GiB of memory, "
                     f"{host / GIB:.1f} GiB is available: use --quick or a smaller model")
    return est, None


def require_calibration_fits(spec: ModelSpec, device: str, block_size: int = 16,
                             quick: bool = False) -> None:
    """Raise ValueError (one line for the CLI) when the calibration cannot fit."""
    problem = calibration_problem(spec, device, block_size, quick)[1]
    if problem is not None:
        raise ValueError(problem)


def _calibration(spec: ModelSpec, device: str, block_size: int, quick: bool) -> Check:
    est, problem = calibration_problem(spec, device, block_size, quick)
    where = "GPU" if device == "cuda" else "host"
    detail = (f"{spec.name} on {device}{' --quick' if quick else ''}: about "
              f"{est.device_peak_bytes / GIB:.1f} GiB {where} peak + "
              f"{est.swap_host_bytes / GIB:.1f} GiB swap space; timed repetitions "
              f"≤ {est.timed_seconds / 60:.1f} min (budgets) plus warm-up and first compiles")
    return Check("calibration", "fail", f"{detail}. {problem}") if problem else \
        Check("calibration", "ok", detail)


def run_checks(spec: ModelSpec, device: str, block_size: int = 16,
               quick: bool = False) -> list[Check]:
    """Every check, in the order the screen shows them."""
    checks = _versions() + _gpu()
    if not torch.cuda.is_available():
        try:
            driver = driver_cuda_version()
            checks += [_ptxas(arch, driver) for arch in (80, 90)]
        except ImportError:
            pass  # no Triton: already a failed check
    checks.append(_calibration(spec, device, block_size, quick))
    return checks


def ready(checks: list[Check]) -> bool:
    return not any(c.status == "fail" for c in checks)


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]


def table(checks: list[Check]):
    """The screen: a rich table of the checks."""
    from rich.table import Table

    colors = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "dim"}
    out = Table(title="kvbench doctor", show_lines=False)
    for column in ("check", "status", "found"):
        out.add_column(column, overflow="fold")
    for c in checks:
        out.add_row(c.name, f"[{colors[c.status]}]{c.status}[/]", c.detail)
    return out
