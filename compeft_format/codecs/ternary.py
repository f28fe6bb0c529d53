"""``ternary`` (spec 4.2): the group's positions (4.7) and one sign bit per kept entry
(1 = negative), in position order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import constants as C
from ..dtypes import ternary_levels, to_torch
from . import positions
from .bits import pack_bits, unpack_bits


def encode(members: Sequence[Any], params: dict[str, Any]) -> dict[str, bytes]:
    signs = np.concatenate([np.asarray(m.negative, dtype=bool) for m in members]) if members else np.zeros(0, bool)
    return {**positions.encode(params["positions"], members), C.ROLE_SIGNS: pack_bits(signs)}


def decode(raw: dict[str, torch.Tensor], members: Sequence[Any], params: dict[str, Any],
           select: Sequence[int], dtype: str | torch.dtype | None, memo: dict | None = None) -> dict[int, torch.Tensor]:
    signs = unpack_bits(raw[C.ROLE_SIGNS], sum(m.nnz for m in members))
    out: dict[int, torch.Tensor] = {}
    for j, where, first in positions.locate(params["positions"], raw, members, select, memo):
        m = members[j]
        tdt = to_torch(dtype or m.dtype)
        levels = torch.from_numpy(ternary_levels(m.scale, m.offset)).to(tdt).to(where.device)
        t = torch.empty(m.numel, dtype=tdt, device=where.device).fill_(levels[0])
        t[where] = torch.where(signs[first:first + m.nnz], levels[2], levels[1])
        out[j] = t.view(m.shape)
    return out
