"""``sparse`` (spec 4.3): a position bit-plane and the kept values in ``value_dtype``,
little-endian, in position order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import constants as C
from ..dtypes import to_torch
from .bits import pack_bits
from .layout import positions_bitmap
from .ternary import kept_masks


def values_bytes(values: Sequence[torch.Tensor], value_dtype: str) -> bytes:
    tdt = to_torch(value_dtype)
    if not values:
        return b""
    flat = torch.cat([v.reshape(-1).to(tdt) for v in values]).contiguous()
    return flat.view(torch.uint8).numpy().tobytes()


def values_view(raw: torch.Tensor, value_dtype: str) -> torch.Tensor:
    return raw.view(to_torch(value_dtype)) if raw.numel() else raw.new_empty(0, dtype=to_torch(value_dtype))


def encode(members: Sequence[Any], params: dict[str, Any]) -> dict[str, bytes]:
    mask = positions_bitmap([m.numel for m in members], [m.indices for m in members])
    return {
        C.ROLE_POSITIONS: pack_bits(mask),
        C.ROLE_VALUES: values_bytes([m.values for m in members], params["value_dtype"]),
    }


def decode(raw: dict[str, torch.Tensor], members: Sequence[Any], params: dict[str, Any],
           select: Sequence[int], dtype: str | torch.dtype | None) -> dict[int, torch.Tensor]:
    values = values_view(raw[C.ROLE_VALUES], params["value_dtype"])
    out: dict[int, torch.Tensor] = {}
    for j, mask, first in kept_masks(raw[C.ROLE_POSITIONS], members, select):
        m = members[j]
        tdt = to_torch(dtype or m.dtype)
        v = values[first:first + m.nnz]
        if m.offset != 0.0:
            v = v.to(torch.float32) + float(np.float32(m.offset))
        t = torch.full((m.numel,), float(np.float32(m.offset)), dtype=tdt, device=mask.device)
        t.masked_scatter_(mask, v.to(tdt))
        out[j] = t.view(m.shape)
    return out
