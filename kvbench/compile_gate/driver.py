"""A stand-in Triton driver: compile for a GPU this machine does not have.

Triton asks its active driver for the target, the device and a launcher. This one answers
`GPUTarget("cuda", arch, 32)` and device 0, so calling the real op wrappers on "meta" tensors
(shapes and addresses, no memory) makes Triton specialize, compile and assemble the kernels
exactly as on that GPU, with Triton's bundled ptxas. Loading a binary reads its resource
usage with the cuobjdump shipped in the Triton wheel; Triton then applies its own launch
checks (shared memory, threads per block) against the target's limits; a launch is recorded,
never run. Nothing here runs on a GPU.
"""

from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.knobs import nvidia as nvidia_tools

MAX_THREADS_PER_BLOCK = 1024
REGISTERS_PER_SM = 65536


@dataclass(frozen=True)
class Target:
    """A GPU generation as the compiler and the launch see it (CUDA occupancy tables)."""

    arch: int  # compute capability ×10
    gpu: str  # the part the limits are taken from
    max_shared_bytes: int  # cudaDevAttrMaxSharedMemoryPerBlockOptin
    num_sms: int
    tensor_core_op: str  # the PTX instruction 16-bit dots must become

    @property
    def name(self) -> str:
        return f"sm_{self.arch}"


TARGETS = {
    90: Target(90, "H100 SXM", 227 * 1024, 132, "wgmma.mma_async"),
    80: Target(80, "A100", 163 * 1024, 108, "mma.sync.aligned"),
}

_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuobjdump() -> str:
    """Path of the cuobjdump in the Triton wheel (or TRITON_CUOBJDUMP_PATH)."""
    return nvidia_tools.cuobjdump.path


def ptxas_version(arch: int) -> str:
    """Release of the ptxas Triton assembles `arch` with (Triton 3.9: ptxas-blackwell from
    sm_90 on), e.g. "13.4"."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).version


@functools.lru_cache(maxsize=1024)
def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread, stack and local bytes per thread (spills), static shared bytes,
    as `cuobjdump --dump-resource-usage` reports them for the cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    match = _USAGE.search(text)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    regs, stack, shared, local = map(int, match.groups())
    return {"registers": regs, "stack_bytes": stack, "local_bytes": local,
            "static_shared_bytes": shared}


def max_threads(registers: int) -> int:
    """Threads per block a kernel using `registers` per thread can launch with: registers are
    allocated per warp in units of 256 (8 per thread), from the SM's 64 K."""
    per_warp = 32 * -(-max(registers, 1) // 8) * 8
    return min(MAX_THREADS_PER_BLOCK, REGISTERS_PER_SM // per_warp * 32)


@dataclass(frozen=True)
class Function:
    """What 'loading' a cubin gives: its name and resource usage."""

    name: str
    usage: dict[str, int]


@dataclass
class Launch:
    """One recorded launch: the compiled kernel (by Triton's hash) and its grid."""

    name: str
    hash: str
    grid: tuple[int, int, int]
    usage: dict[str, int]


class _Utils:
    def __init__(self, target: Target):
        self.target = target

    def load_binary(self, name, cubin, shared, device):
        usage = resource_usage(cubin)
        spills = usage["stack_bytes"] + usage["local_bytes"]
        return None, Function(name, usage), usage["registers"], spills, \
            max_threads(usage["registers"])

    def get_device_properties(self, device):
        return {"max_shared_mem": self.target.max_shared_bytes,
                "multiprocessor_count": self.target.num_sms, "max_num_regs": REGISTERS_PER_SM,
                "warpSize": 32}


class _Launcher:
    """Stands where Triton's CUDA launcher would: records the launch instead of running it."""

    def __init__(self, launches: list[Launch], src, metadata):
        self.launches, self.metadata = launches, metadata

    def __call__(self, grid_x, grid_y, grid_z, stream, function, *args):
        self.launches.append(Launch(self.metadata.name, self.metadata.hash,
                                    (grid_x, grid_y, grid_z), function.usage))


class StandInDriver(DriverBase):
    """Triton's active driver for compile-only runs against `target` (see the module doc)."""

    def __init__(self, target: Target):
        self.target = target
        self.launches: list[Launch] = []
        self.utils = _Utils(target)
        self.launcher_cls = functools.partial(_Launcher, self.launches)

    @classmethod
    def is_active(cls) -> bool:
        return False  # never picked by Triton itself: installed with `install`

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("compile only: no launcher source is built")

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.target.arch, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")

    def get_benchmarker(self):
        raise RuntimeError("compile only: nothing can be timed without a GPU")

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return divmod(self.target.arch, 10)


def install(target: Target, cache_dir: Path | None = None) -> StandInDriver:
    """Make a StandInDriver for `target` Triton's active driver (for the rest of the process:
    Triton caches per-device state, so one process compiles for one target). `cache_dir`:
    Triton's on-disk kernel cache (keyed by source, options, target and ptxas)."""
    import triton

    if cache_dir is not None:
        triton.knobs.cache.dir = str(cache_dir)
    driver = StandInDriver(target)
    triton.runtime.driver.set_active(driver)
    return driver
