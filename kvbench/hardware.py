"""Hardware descriptions for analytic costs, device detection and the environment fingerprint.

`HardwareSpec` presets are nominal datasheet figures (PCIe link, dense matrix rate, HBM bandwidth)
with an assumed achieved fraction: leads for an analytic estimate, never measurements. Measured
figures come from `kvbench calibrate` and live in profiles.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvbench import __version__
from kvbench.limits import check_name


@dataclass(frozen=True)
class HardwareSpec:
    """One GPU and its host link, as the analytic cost model needs them."""

    name: str
    h2d_gbps: float  # host -> device, GB/s (1e9 bytes/s)
    d2h_gbps: float  # device -> host, GB/s
    transfer_latency_ms: float  # fixed cost of one transfer (launch + DMA setup), each direction
    peak_tflops: float  # dense matrix rate in the model's dtype
    achieved_fraction: float  # share of peak_tflops a prefill reaches (MFU)
    hbm_gbps: float = 3350.0  # device memory bandwidth, for decode steps
    block_copy_overhead_ms: float = 0.0  # extra cost per KV block per direction (per-block copies)
    launch_overhead_ms: float = 0.05  # fixed cost of a prefill or decode step
    memory_gib: float = 80.0  # device memory as the driver reports it (sizes the KV cache)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "name":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    value == value and abs(value) != float("inf")) or value < 0:
                raise ValueError(f"hardware {self.name!r}: {field.name} must be a finite "
                                 f"non-negative number, got {value!r}")
        for field in ("h2d_gbps", "d2h_gbps", "peak_tflops", "achieved_fraction", "hbm_gbps",
                      "memory_gib"):
            if getattr(self, field) == 0:
                raise ValueError(f"hardware {self.name!r}: {field} must be positive")
        if self.achieved_fraction > 1:
            raise ValueError(f"hardware {self.name!r}: achieved_fraction must be in (0, 1]")
        if not self.peak_tflops * 1e12 * self.achieved_fraction > 0:  # underflowed to 0
            raise ValueError(f"hardware {self.name!r}: peak_tflops {self.peak_tflops:g} x "
                             f"achieved_fraction {self.achieved_fraction:g} is too small a rate")


# Nominal figures: PCIe Gen5 x16 moves ~55 GB/s each way in practice, Gen4 ~25; dense bf16 rates
# and HBM bandwidth from the vendors' datasheets; 50% MFU for prefill is an assumption.
HARDWARE: dict[str, HardwareSpec] = {
    spec.name: spec
    for spec in (
        HardwareSpec("h100-sxm", 55.0, 55.0, 0.01, 989.0, 0.5, hbm_gbps=3350.0, memory_gib=80.0),
        HardwareSpec("h200", 55.0, 55.0, 0.01, 989.0, 0.5, hbm_gbps=4800.0, memory_gib=140.0),
        HardwareSpec("a100-80gb", 25.0, 25.0, 0.01, 312.0, 0.5, hbm_gbps=2039.0,
                     memory_gib=80.0),
        HardwareSpec("l4", 25.0, 25.0, 0.01, 121.0, 0.5, hbm_gbps=300.0, memory_gib=22.5),
    )
}
# The fields that price swaps, prefills and decode steps (what an analytic config may override).
HARDWARE_FIELDS = tuple(f.name for f in dataclasses.fields(HardwareSpec)
                        if f.name not in ("name", "memory_gib"))


def get_hardware(name: str = "h100-sxm", **overrides: float) -> HardwareSpec:
    """A preset by name with any fields overridden (None values are ignored)."""
    if check_name("hardware", name) not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; presets: {', '.join(HARDWARE)}")
    unknown = set(overrides) - set(HARDWARE_FIELDS)
    if unknown:
        raise ValueError(f"unknown hardware field(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(HARDWARE_FIELDS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(HARDWARE[name], **given)


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is an error."""
    import torch

    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"unknown device {device!r}; use auto, cuda or cpu")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def fingerprint_slug(env: dict) -> str:
    """Short file-name-safe machine name from a fingerprint: 'nvidia-h100-80gb-hbm3' for a GPU,
    'cpu-<model>-<cores>c' for a CPU, the device name for an analytic profile."""
    if env.get("device") != "cpu":
        return slugify(str(env.get("device_name")))
    model = re.sub(r"\((r|tm)\)|cpu|processor|@.*$", "", str(env.get("cpu_model")),
                   flags=re.IGNORECASE)
    return f"cpu-{slugify(model)}-{env.get('cpu_count')}c"


def device_slug(device: str) -> str:
    """`fingerprint_slug` of this machine's `device`."""
    return fingerprint_slug({"device": device, "device_name": device_name(device),
                             "cpu_model": cpu_model(), "cpu_count": os.cpu_count()})


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def fingerprint(device: str) -> dict:
    """Where a measurement was taken: device, driver/CUDA, library versions, commit."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "device": device,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "kvbench": __version__,
        "commit": git_commit(),
        "cuda": torch.version.cuda,
        "driver": None,
    }
    if device == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=10)
            if out.returncode == 0:
                info["driver"] = out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return info
