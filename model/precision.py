"""The one table from a precision name (``fp32``, ``bf16``, ``fp16``) to its torch dtype."""

from __future__ import annotations

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Precision names as configs and export files write them, and their dtypes."""


def dtype_of(precision: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; ValueError naming the valid precisions otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype a locked tower runs its forward in: None for fp32 (no autocast)."""
    dtype = dtype_of(precision)
    return None if dtype == torch.float32 else dtype
