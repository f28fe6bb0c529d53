"""Mapping between the spec's dtype names and torch dtypes, and the spec's rounding rule."""

from __future__ import annotations

import numpy as np
import torch

from . import constants as C
from .errors import UnsupportedDtype

TORCH_DTYPES: dict[str, torch.dtype] = {
    C.DTYPE_F32: torch.float32,
    C.DTYPE_F16: torch.float16,
    C.DTYPE_BF16: torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def to_torch(dtype: str | torch.dtype) -> torch.dtype:
    """Accept a spec name ('float16'), a short alias ('fp16', 'bf16') or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise UnsupportedDtype(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    alias = {"fp32": C.DTYPE_F32, "fp16": C.DTYPE_F16, "bf16": C.DTYPE_BF16, "half": C.DTYPE_F16}
    name = alias.get(str(dtype), str(dtype))
    if name not in TORCH_DTYPES:
        raise UnsupportedDtype(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
    return TORCH_DTYPES[name]


def name_of(dtype: str | torch.dtype) -> str:
    return DTYPE_NAMES[to_torch(dtype)]


def ternary_levels(scale: float, offset: float) -> np.ndarray:
    """The three binary32 values a ternary tensor takes: background, +level, -level (spec 5.2).

    The sum is one IEEE binary32 addition; with offset 0 no addition is made.
    """
    s = np.float32(scale)
    o = np.float32(offset)
    if offset == 0.0:
        return np.array([np.float32(0.0), s, -s], dtype=np.float32)
    return np.array([o, o + s, o - s], dtype=np.float32)


def rounded_scalar(value: float, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    """A 0-d tensor holding binary32(value) rounded once (RNE) to ``dtype``; values beyond the
    dtype's range round to infinity as IEEE conversion does, instead of raising."""
    return torch.tensor(np.float32(value), dtype=torch.float32, device=device).to(dtype)
