"""The one dtype table: every name harp accepts for a dtype, and its size in bytes."""

from __future__ import annotations

from typing import Any

import torch

# The one dtype table: every name harp accepts for a dtype (loading, the streamed search, the memory
# planner's byte counts; the exports' short names point into it).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from a name in `DTYPES` (or a torch dtype as it is); None is float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of float32, bfloat16, float16.")
    return DTYPES[dtype]


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a torch dtype or a dtype name ('float32', 'bf16', ...)."""

    if hasattr(dtype, "itemsize"):
        return int(dtype.itemsize)
    return torch_dtype(str(dtype).removeprefix("torch.")).itemsize
