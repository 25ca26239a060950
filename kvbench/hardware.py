"""Hardware descriptions for analytic costs, device detection and the environment fingerprint.

`HardwareSpec` presets are nominal datasheet figures (PCIe link, dense matrix rate, HBM bandwidth)
with an assumed achieved fraction: leads for an analytic estimate, never measurements. Measured
figures come from `kvbench calibrate` and live in profiles.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import platform
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from kvbench import __version__
from kvbench.errors import KvbenchError
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
                raise KvbenchError(f"hardware {self.name!r}: {field.name} must be a finite "
                                 f"non-negative number, got {value!r}")
        for field in ("h2d_gbps", "d2h_gbps", "peak_tflops", "achieved_fraction", "hbm_gbps",
                      "memory_gib"):
            if getattr(self, field) == 0:
                raise KvbenchError(f"hardware {self.name!r}: {field} must be positive")
        if self.achieved_fraction > 1:
            raise KvbenchError(f"hardware {self.name!r}: achieved_fraction must be in (0, 1]")
        if not self.peak_tflops * 1e12 * self.achieved_fraction > 0:  # underflowed to 0
            raise KvbenchError(f"hardware {self.name!r}: peak_tflops {self.peak_tflops:g} x "
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
        raise KvbenchError(f"unknown hardware {name!r}; presets: {', '.join(HARDWARE)}")
    unknown = set(overrides) - set(HARDWARE_FIELDS)
    if unknown:
        raise KvbenchError(f"unknown hardware field(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(HARDWARE_FIELDS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(HARDWARE[name], **given)


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is an error."""
    import torch

    if device not in ("auto", "cuda", "cpu"):
        raise KvbenchError(f"unknown device {device!r}; use auto, cuda or cpu")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise KvbenchError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


@functools.lru_cache(maxsize=1)
def proc_cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is none, e.g. off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    lines = text.split("\n\n", 1)[0].splitlines()
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    return proc_cpuinfo().get("model name") or platform.processor() or platform.machine()


# The instruction sets that change a CPU's numbers, best first: AMX and AVX512-BF16 run bfloat16
# matrix products natively, without them torch emulates bfloat16 (tens of times slower).
ISA_LEVELS = {"amx": "AMX", "avx512_bf16": "AVX512-BF16", "avx512": "AVX-512", "avx2": "AVX2"}


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """This machine's CPU: vendor, family, model and stepping as /proc/cpuinfo gives them (None
    where it gives none, e.g. off Linux), and `isa`: which of `ISA_LEVELS` torch reports, and
    `capability`, the instruction set ATen's kernels dispatch to ('AVX512', 'AVX2', 'DEFAULT'),
    and whether oneDNN may run bfloat16 and float16 products natively (`onednn_*`)."""
    import torch

    fields = proc_cpuinfo()

    def number(key: str) -> int | None:
        return int(fields[key]) if fields.get(key, "").isdigit() else None

    return {"vendor": fields.get("vendor_id"), "family": number("cpu family"),
            "model": number("model"), "stepping": number("stepping"),
            "isa": {"amx": torch.cpu._is_amx_tile_supported(),
                    "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                    "avx512": torch.cpu._is_avx512_supported(),
                    "avx2": torch.cpu._is_avx2_supported(),
                    "amx_fp16": torch.cpu._is_amx_fp16_supported(),
                    "capability": torch.backends.cpu.get_cpu_capability(),
                    # what oneDNN may use (ONEDNN_MAX_CPU_ISA can forbid what the CPU has)
                    "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    "onednn_fp16": bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())}}


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def recorded_isa(env: dict) -> dict:
    """A fingerprint's `cpu.isa` (`cpu_info`), {} where it has none (an older fingerprint)."""
    cpu = env.get("cpu")
    isa = cpu.get("isa") if isinstance(cpu, dict) else None
    return isa if isinstance(isa, dict) else {}


def isa_level(env: dict) -> str | None:
    """The best of `ISA_LEVELS` a fingerprint's CPU has (None: none of them, or not recorded)."""
    return next((f for f in ISA_LEVELS if recorded_isa(env).get(f)), None)


def fingerprint_slug(env: dict) -> str:
    """Short file-name-safe machine name from a fingerprint: 'nvidia-h100-80gb-hbm3' for a GPU,
    'cpu-<model>-f<family>m<model>s<stepping>-<best ISA level or baseline>-<cores>c' for a CPU
    (e.g. 'cpu-amd-epyc-f25m17s1-avx512bf16-2c'; 'cpu-<model>-<cores>c' from a fingerprint that
    predates `cpu_info`), the device name for an analytic profile."""
    if env.get("device") != "cpu":
        return slugify(str(env.get("device_name")))
    model = re.sub(r"\((r|tm)\)|cpu|processor|@.*$", "", str(env.get("cpu_model")),
                   flags=re.IGNORECASE)
    cpu = env.get("cpu")
    if not isinstance(cpu, dict):
        return slugify(f"cpu-{model}-{env.get('cpu_count')}c")
    numbers = [cpu.get(k) for k in ("family", "model", "stepping")]
    fms = "f{}m{}s{}".format(*numbers) if None not in numbers else ""
    level = (isa_level(env) or "baseline").replace("_", "")
    return slugify(f"cpu-{model}-{fms}-{level}-{env.get('cpu_count')}c")


def machine_identity(device: str) -> dict:
    """What tells this machine's `device` apart (the part of `fingerprint` that slugs and
    mismatch warnings compare): the device's name and the host CPU (model, cores, `cpu_info`),
    which a GPU's swaps go through too."""
    return {"device": device, "device_name": device_name(device), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "cpu": cpu_info()}


def device_slug(device: str) -> str:
    """`fingerprint_slug` of this machine's `device`."""
    return fingerprint_slug(machine_identity(device))


def hardware_text(env: dict, isa_differs: tuple[str, ...] = ()) -> str:
    """A fingerprint's hardware in words: a GPU's name, or a CPU's cores, model name, family,
    model, stepping and best ISA level; of the `isa_differs` keys, the features it lacks ('no X')
    and its ATen capability."""
    if env.get("device") != "cpu":
        return str(env.get("device_name"))
    text, cpu, isa = str(env.get("cpu_model")), env.get("cpu"), recorded_isa(env)
    if isinstance(cpu, dict) and cpu.get("family") is not None:
        text += f" family {cpu['family']} model {cpu.get('model')} stepping {cpu.get('stepping')}"
    if isa:
        level = isa_level(env)
        features = [ISA_LEVELS[level] if level else "no AVX2"]
        features += [f"no {ISA_LEVELS[f]}" for f in isa_differs if f in ISA_LEVELS
                     and not isa.get(f)]
        features += [f"ATen {isa.get('capability')}"] if "capability" in isa_differs else []
        features += [f"oneDNN {'with' if isa.get(k) else 'without'} {k[-4:]}" for k in
                     ("onednn_bf16", "onednn_fp16") if k in isa_differs]
        text += f" ({', '.join(dict.fromkeys(features))})"
    return f"{env.get('cpu_count')}-core {text}"


def fingerprint_mismatch(environment: dict, device: str | None = None) -> str | None:
    """One line saying that a measured profile's `environment` names other hardware than this
    machine's `device` (default: the kind the profile was measured on), None where they match
    or the profile is analytic (measured nowhere).

    A CUDA profile is compared by GPU name. A CPU profile by model name, cores and `cpu_info`
    (vendor, family, model, stepping, ISA), all of which move its costs. A CPU fingerprint from
    before kvbench recorded `cpu_info` is compared by what it has, model name and cores: where
    those match it passes (nothing it holds shows a difference), where they differ the line also
    says that its fingerprint is incomplete."""
    import torch

    measured_on = environment.get("device")
    if measured_on not in ("cpu", "cuda"):
        return None
    device = device or measured_on
    if device == "cuda" and not torch.cuda.is_available():
        return (f"profile measured on {hardware_text(environment)}, this machine has no CUDA "
                "GPU: its costs may not hold here")
    here = machine_identity(device)
    older = measured_on == "cpu" and not isinstance(environment.get("cpu"), dict)
    compared = ("device_name",) if device == "cuda" else \
        ("cpu_model", "cpu_count") + (() if older else ("cpu",))
    if device == measured_on and all(environment.get(k) == here[k] for k in compared):
        return None
    theirs_isa = recorded_isa(environment)
    isa_differs = tuple(k for k in here["cpu"]["isa"] if theirs_isa
                        and theirs_isa.get(k) != here["cpu"]["isa"][k])
    note = " (an older fingerprint, without CPU family, model and ISA)" if older else ""
    return (f"profile measured on {hardware_text(environment, isa_differs)}{note}, this machine "
            f"is {hardware_text(here, isa_differs)}: its costs may not hold here")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def code_sha256() -> str:
    """sha256 of the running kvbench package's source: each *.py under kvbench/ by its relative
    path, in sorted order. Tells apart code that one version number covers (an editable install
    after a change); computed once per process."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def provenance() -> dict:
    """What made a result and where, for a result file's `provenance` entry (as a profile's
    `environment` records it): kvbench version, commit (None outside a git checkout), the
    source's `code_sha256`, this machine's CPU slug (`device_slug`), the UTC date and the
    command line."""
    return {"kvbench": __version__, "commit": git_commit(), "code_sha256": code_sha256(),
            "machine": device_slug("cpu"), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv) if sys.argv and sys.argv[0] else None}


def fingerprint(device: str) -> dict:
    """Where a measurement was taken: device, host CPU (`machine_identity`), driver/CUDA,
    library versions, commit."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        **machine_identity(device),
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
