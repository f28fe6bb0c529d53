"""``ternary`` (spec 4.2): a position bit-plane over the group's elements and one sign bit per
kept entry (1 = negative), in position order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import constants as C
from ..dtypes import ternary_levels, to_torch
from ..errors import StreamCorrupt
from .bits import pack_bits, popcount, unpack_bits, unpack_range
from .layout import element_offsets, positions_bitmap


def encode(members: Sequence[Any], params: dict[str, Any]) -> dict[str, bytes]:
    mask = positions_bitmap([m.numel for m in members], [m.indices for m in members])
    signs = np.concatenate([np.asarray(m.negative, dtype=bool) for m in members]) if members else np.zeros(0, bool)
    return {C.ROLE_POSITIONS: pack_bits(mask), C.ROLE_SIGNS: pack_bits(signs)}


def kept_masks(raw_positions: torch.Tensor, members: Sequence[Any], select: Sequence[int]):
    """Yield (member index, kept mask, first entry index) for the selected members, checking that
    the bit-plane's counts agree with the declared ``nnz`` values (spec 4.6)."""
    offs = element_offsets([m.numel for m in members])
    declared = np.concatenate([[0], np.cumsum([m.nnz for m in members], dtype=np.int64)])
    if len(select) == len(members):  # whole group: one unpack, each member's own count
        bits = unpack_bits(raw_positions, int(offs[-1]))
        for j in select:
            mask = bits[int(offs[j]):int(offs[j + 1])]
            if int(mask.sum()) != members[j].nnz:
                raise StreamCorrupt(f"tensor {members[j].name!r}: position bit-plane disagrees with nnz")
            yield j, mask, int(declared[j])
        return
    n = int(offs[-1])
    if raw_positions.numel() != (n + 7) // 8:
        raise StreamCorrupt(f"position bit-plane has {raw_positions.numel()} bytes, {n} bits need {(n + 7) // 8}")
    if n % 8 and int(raw_positions[-1]) >> (n % 8):
        raise StreamCorrupt("padding bits of a bit stream are not zero")
    for j in select:  # one member: unpack its bytes only, count the bits before it by bytes
        a, b = int(offs[j]), int(offs[j + 1])
        mask = unpack_range(raw_positions, a, b)
        before = popcount(raw_positions[:a // 8]) + int(unpack_range(raw_positions, 8 * (a // 8), a).sum())
        if before != int(declared[j]) or int(mask.sum()) != members[j].nnz:
            raise StreamCorrupt(f"tensor {members[j].name!r}: position bit-plane disagrees with nnz")
        yield j, mask, before


def decode(raw: dict[str, torch.Tensor], members: Sequence[Any], params: dict[str, Any],
           select: Sequence[int], dtype: str | torch.dtype | None) -> dict[int, torch.Tensor]:
    total_nnz = sum(m.nnz for m in members)
    signs = unpack_bits(raw[C.ROLE_SIGNS], total_nnz)
    out: dict[int, torch.Tensor] = {}
    for j, mask, first in kept_masks(raw[C.ROLE_POSITIONS], members, select):
        m = members[j]
        tdt = to_torch(dtype or m.dtype)
        levels = torch.from_numpy(ternary_levels(m.scale, m.offset)).to(tdt).to(mask.device)
        t = torch.empty(m.numel, dtype=tdt, device=mask.device).fill_(levels[0])
        t.masked_scatter_(mask, torch.where(signs[first:first + m.nnz], levels[2], levels[1]))
        out[j] = t.view(m.shape)
    return out
