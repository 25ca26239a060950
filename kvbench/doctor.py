"""`kvbench doctor`: whether this machine is ready to calibrate, on one screen.

Checks, each ok / warn / fail / skip with what was found: library versions; the CUDA runtime
and driver, and whether the ptxas Triton assembles this GPU's kernels with is newer than the
driver supports (the fix: point Triton at an older ptxas); the GPU and its free memory; a
pinned host allocation; a zero-copy Triton copy through the GPU's mapping of pinned memory
(UVA), checked against the reference; the PCIe link (NVML through nvidia-ml-py, else
nvidia-smi); and the memory and time the calibration of a model would take, failing when it
cannot fit (the memory plan `kvbench calibrate` itself checks before it starts).

Only the CPU branches have run: no GPU has been lent to this project, so every GPU check here
is unrun code (on this machine they say what they would check and skip).
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass

import torch

from kvbench import __version__
from kvbench.models import ModelSpec

GIB = 2**30


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


def _calibration(spec: ModelSpec, device: str, block_size: int, quick: bool) -> Check:
    """Does the calibration fit: the very memory plan `kvbench calibrate` checks before it
    allocates (`kvbench.calibration.memory`) and the time plan it makes from a second of probes
    (`kvbench.calibration.timeplan`), in the dtype it would choose."""
    from kvbench.calibration.memory import MemoryPlanError
    from kvbench.calibration.pipeline import calibration_dtype, plan_calibration
    from kvbench.calibration.timeplan import TimePlanError

    spec, choice = calibration_dtype(spec, device, explicit=False)
    what = f"{spec.name} ({spec.dtype}) on {device}{' --quick' if quick else ''}"
    try:
        plan, time_plan = plan_calibration(spec, device, block_size, quick)
    except (MemoryPlanError, TimePlanError) as exc:
        return Check("calibration", "fail", f"{what}: {exc}")
    notes = f" ({'; '.join(plan.notes)})" if plan.notes else ""
    dtype = f"; dtype {choice.line()}" if choice else ""
    return Check("calibration", "ok" if time_plan.fits else "warn",
                 f"{what}: fits in memory{notes}; {'; '.join(time_plan.lines())}{dtype}")


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
