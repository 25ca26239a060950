"""The one table from kvbench's dtype names (`kvbench.models.DTYPE_BYTES`) to torch dtypes."""

from __future__ import annotations

import torch

from kvbench.models import canonical_dtype

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "fp8": torch.float8_e4m3fn}


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a torch dtype or any name `canonical_dtype` accepts ('bf16', ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return TORCH_DTYPES[canonical_dtype(dtype)]
