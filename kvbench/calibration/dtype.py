"""Which dtype a CPU calibration runs in: the fastest one this CPU really supports.

A CPU without native bfloat16 (no AVX512-BF16, no AMX) runs torch's bfloat16 matrix products
emulated: one 512x896 by 896x4864 product took 6,550 ms in bfloat16 against 108 ms in float32
on one thread of an AVX2-only AMD EPYC (Zen 3), 60x. Calibrating there in bfloat16 measures the
emulation, for many minutes. So on CPU the default dtype is decided by

1. the ISA torch reports: bfloat16 needs AVX512-BF16 or AMX tiles in the CPU and oneDNN allowed
   to use them (`torch.ops.mkldnn._is_mkldnn_bf16_supported`, which honours
   `ONEDNN_MAX_CPU_ISA`); float16 needs oneDNN's float16 support (AMX-FP16, AVX512-FP16);
2. a short probe: one product of the model's shape (capped at `PROBE_DIM`) timed in the model's
   dtype and in float32 (a call slower than `PROBE_SLOW_MS` is its own only sample: an emulated
   dtype costs the probe a fraction of a second). A dtype the ISA calls native is kept unless
   the probe runs it more than `EMULATED_SLOWDOWN` times slower than float32.

An explicit `--dtype` wins; a dtype the CPU emulates gets a warning with the probe's slowdown.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields

import torch

from kvbench.hardware import cpu_info
from kvbench.models import ModelSpec
from kvbench.ops.dtypes import torch_dtype

PROBE_ROWS = 64  # tokens of the probe's product
PROBE_DIM = 1024  # its inner and outer sizes at most (any model's product is 134 MFLOP at most)
PROBE_WARMUP, PROBE_REPS = 2, 3
PROBE_SLOW_MS = 50.0  # a call this slow is not repeated
EMULATED_SLOWDOWN = 2.0  # slower than float32 by more than this: the dtype is emulated


def isa_report() -> dict[str, bool | str]:
    """What torch reports of this CPU (`kvbench.hardware.cpu_info`'s `isa`): the ATen kernels'
    capability, the ISA features of the reduced-precision paths, and what oneDNN may use."""
    return cpu_info()["isa"]


def native_by_isa(dtype: str, isa: dict) -> tuple[bool, str]:
    """Whether `isa` (an `isa_report`) runs `dtype`'s products natively, and why in words."""
    if dtype == "float32":
        return True, "float32 runs natively on every CPU"
    if dtype == "bfloat16":
        units = [name for key, name in (("avx512_bf16", "AVX512-BF16"), ("amx", "AMX"))
                 if isa.get(key)]
        if not units:
            return False, f"this CPU has no native bfloat16 (no AVX512-BF16 or AMX; torch's " \
                          f"kernels use {isa.get('capability')})"
        if not isa.get("onednn_bf16"):
            return False, f"the CPU has {'/'.join(units)} but oneDNN may not use it " \
                          "(ONEDNN_MAX_CPU_ISA?)"
        return True, f"native bfloat16 ({'/'.join(units)})"
    if dtype == "float16":
        if isa.get("onednn_fp16"):
            return True, "native float16 (oneDNN float16 support)"
        return False, "this CPU has no native float16 (no AMX-FP16 or AVX512-FP16)"
    return False, f"{dtype} has no CPU matrix product"


def product_dims(spec: ModelSpec, cap: int = PROBE_DIM) -> tuple[int, int]:
    """The inner and outer sizes of a probe's product: the model's hidden size and this GPU's
    share of its intermediate size, each capped at `cap`."""
    return min(spec.hidden_size, cap), min(spec.intermediate_size // spec.tp, cap)


def probe_ms(spec: ModelSpec, dtype: str, reps: int = PROBE_REPS) -> float:
    """Least ms of one [PROBE_ROWS, h] x [h, I] product (h, I: the model's hidden and
    intermediate sizes, each capped at PROBE_DIM) in `dtype`, after PROBE_WARMUP calls."""
    k, n = product_dims(spec)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(PROBE_ROWS, k, generator=gen).to(torch_dtype(dtype))
    b = torch.randn(k, n, generator=gen).to(torch_dtype(dtype))
    samples: list[float] = []
    for _ in range(PROBE_WARMUP + reps):  # warm-up calls (oneDNN compiles its kernel in the
        start = time.perf_counter()         # first ones), unless the first is slow enough
        a @ b
        samples.append((time.perf_counter() - start) * 1e3)
        if samples[0] > PROBE_SLOW_MS:
            return samples[0]
    return min(samples[PROBE_WARMUP:])  # the least disturbed call: a probe, not a figure


def probe_shape(spec: ModelSpec) -> str:
    k, n = product_dims(spec)
    return f"{PROBE_ROWS}x{k}·{k}x{n}"


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a CPU calibration runs in and why: `asked` is the model's or --dtype's,
    `probe_ms` the probe's time per dtype tried, `slowdown` asked over float32."""

    dtype: str
    asked: str
    explicit: bool
    native: bool  # the asked dtype, by the ISA and the probe
    reason: str
    probe_ms: dict[str, float]
    probe_shape: str

    @property
    def slowdown(self) -> float | None:
        times = self.probe_ms
        return times[self.asked] / times["float32"] if len(times) == 2 else None

    def probe_text(self) -> str:
        if self.slowdown is None:
            return ""
        times, digits = self.probe_ms, 2 if self.slowdown < 10 else 0
        return f"; probe {self.probe_shape}: {self.asked} {times[self.asked]:.1f} ms, " \
               f"float32 {times['float32']:.1f} ms ({self.slowdown:.{digits}f}x)"

    @property
    def warning(self) -> str | None:
        """For an explicit dtype this CPU emulates: why, and how much slower the probe ran it."""
        if not self.explicit or self.native:
            return None
        return f"{self.asked} is emulated on this CPU ({self.reason}{self.probe_text()}): the " \
               "calibration will measure the emulation and take that much longer; leave out " \
               "--dtype for the native one"

    def line(self) -> str:
        """What `kvbench calibrate` prints: the dtype and the reason."""
        how = "asked for with --dtype" if self.explicit else (
            "the model's" if self.dtype == self.asked else f"instead of the model's {self.asked}")
        return f"{self.dtype} ({how}): {self.reason}{self.probe_text()}"

    def to_dict(self) -> dict:
        return {**asdict(self), "slowdown": self.slowdown}

    @classmethod
    def from_dict(cls, data: dict) -> DtypeChoice:
        """What `to_dict` wrote (a profile's `extra.dtype_choice`)."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def choose_cpu_dtype(spec: ModelSpec, explicit: bool, isa: dict | None = None) -> DtypeChoice:
    """The dtype to calibrate `spec` in on this CPU: `spec.dtype` if explicit (with a verdict on
    whether it is native), else the fastest native one of `spec.dtype` and float32."""
    asked = spec.dtype
    isa = isa_report() if isa is None else isa
    shape = probe_shape(spec)
    if asked == "float32":
        return DtypeChoice("float32", asked, explicit, True, native_by_isa(asked, isa)[1], {},
                           shape)
    native, reason = native_by_isa(asked, isa)
    times = {"float32": probe_ms(spec, "float32"), asked: probe_ms(spec, asked)}
    if native and times[asked] > EMULATED_SLOWDOWN * times["float32"]:
        native, reason = False, f"{reason} by the ISA, but not by the probe"
    dtype = asked if native or explicit else "float32"
    return DtypeChoice(dtype, asked, explicit, native, reason, times, shape)
