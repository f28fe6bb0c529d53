"""``dense`` (spec 4.4): every element in ``value_dtype``, little-endian, C order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import constants as C
from ..dtypes import to_torch
from .layout import element_offsets
from .sparse import values_bytes, values_view


def encode(members: Sequence[Any], params: dict[str, Any]) -> dict[str, bytes]:
    return {C.ROLE_VALUES: values_bytes([m.values for m in members], params["value_dtype"])}


def decode(raw: dict[str, torch.Tensor], members: Sequence[Any], params: dict[str, Any],
           select: Sequence[int], dtype: str | torch.dtype | None, memo: dict | None = None) -> dict[int, torch.Tensor]:
    values = values_view(raw[C.ROLE_VALUES], params["value_dtype"])
    offs = element_offsets([m.numel for m in members])
    out: dict[int, torch.Tensor] = {}
    for j in select:
        m = members[j]
        t = values[int(offs[j]):int(offs[j + 1])].to(to_torch(dtype or m.dtype))
        if t.dtype == values.dtype:  # .to() returned a view of the stream buffer
            t = t.clone()
        out[j] = t.view(m.shape)
    return out
