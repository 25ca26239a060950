"""What every kernel launch needs, shared by the ops: where Triton can run, the device context,
small host inputs on the device, and the CUDA grid limits.

Triton runs compiled on CUDA tensors, and on CPU tensors only in its interpreter
(TRITON_INTERPRET=1, read once when the kernel modules are imported).
"""

from __future__ import annotations

import contextlib
import os

import torch

from kvbench.errors import KvbenchError

# CUDA's launch limits: gridDim.x up to 2**31 - 1, gridDim.y and gridDim.z up to 65535.
MAX_GRID = (2**31 - 1, 65535, 65535)


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """Why impl='triton' cannot run on `device`, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    if torch.device(device).type == "cpu" and not interpreting():
        return ("impl='triton' on CPU tensors runs only in Triton's interpreter: set "
                "TRITON_INTERPRET=1 before starting Python, or use impl='torch'")
    return None


def require_triton(device: torch.device, kernel=None) -> None:
    """Raise ValueError when Triton cannot run on `device` (kernel: check how it was built)."""
    reason = triton_unavailable_reason(device)
    if reason is None and kernel is not None and device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        if not (isinstance(kernel, InterpretedFunction)
                or isinstance(getattr(kernel, "fn", None), InterpretedFunction)):
            reason = ("kvbench's Triton kernels were imported before TRITON_INTERPRET=1 was set; "
                      "set it before starting Python to run them on CPU tensors")
    if reason is not None:
        raise KvbenchError(reason)


def device_context(device: torch.device):
    """Make `device` current for a launch on CUDA (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (block ids, cu_seqlens) on `device` without blocking the host: on
    CUDA it goes through pinned memory, as a copy from pageable memory may wait for the stream
    (the CUDA branch has not yet been run on a GPU)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def check_grid(op: str, grid: tuple[int, ...]) -> None:
    """Raise ValueError when `grid` exceeds CUDA's launch limits (it would fail at launch)."""
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID)):
        if size > limit:
            raise KvbenchError(f"{op}: grid axis {axis} has {size} programs, over CUDA's limit "
                             f"of {limit}; split the call")
