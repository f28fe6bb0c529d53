"""``sparse`` (spec 4.3): the group's positions (4.7) and the kept values in ``value_dtype``,
little-endian, in position order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import constants as C
from ..dtypes import rounded_scalar, to_torch
from . import positions


def values_bytes(values: Sequence[torch.Tensor], value_dtype: str) -> bytes:
    tdt = to_torch(value_dtype)
    if not values:
        return b""
    flat = torch.cat([v.reshape(-1).to(tdt) for v in values]).contiguous()
    return flat.view(torch.uint8).numpy().tobytes()


def values_view(raw: torch.Tensor, value_dtype: str) -> torch.Tensor:
    return raw.view(to_torch(value_dtype)) if raw.numel() else raw.new_empty(0, dtype=to_torch(value_dtype))


def encode(members: Sequence[Any], params: dict[str, Any]) -> dict[str, bytes]:
    return {**positions.encode(params["positions"], members),
            C.ROLE_VALUES: values_bytes([m.values for m in members], params["value_dtype"])}


def decode(raw: dict[str, torch.Tensor], members: Sequence[Any], params: dict[str, Any],
           select: Sequence[int], dtype: str | torch.dtype | None, memo: dict | None = None) -> dict[int, torch.Tensor]:
    values = values_view(raw[C.ROLE_VALUES], params["value_dtype"])
    out: dict[int, torch.Tensor] = {}
    for j, where, first in positions.locate(params["positions"], raw, members, select, memo):
        m = members[j]
        tdt = to_torch(dtype or m.dtype)
        v = values[first:first + m.nnz]
        if m.offset != 0.0:
            v = v.to(torch.float32) + float(np.float32(m.offset))
        t = torch.empty(m.numel, dtype=tdt, device=where.device).fill_(rounded_scalar(m.offset, tdt, where.device))
        t[where] = v.to(tdt)
        out[j] = t.view(m.shape)
    return out
