"""``ternary`` (spec 4.2): the group's positions (4.7) and one sign bit per kept entry
(1 = negative), in position order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import constants as C
from ..dtypes import ternary_levels, to_torch
from . import native, positions
from .bits import check_bit_stream, pack_bits, unpack_bits


def encode(members: Sequence[Any], params: dict[str, Any]) -> dict[str, bytes]:
    signs = np.concatenate([np.asarray(m.negative, dtype=bool) for m in members]) if members else np.zeros(0, bool)
    return {**positions.encode(params["positions"], members), C.ROLE_SIGNS: pack_bits(signs)}


def decode(raw: dict[str, torch.Tensor], members: Sequence[Any], params: dict[str, Any],
           select: Sequence[int], dtype: str | torch.dtype | None, memo: dict | None = None) -> dict[int, torch.Tensor]:
    lib = native.module(raw[C.ROLE_SIGNS].device)
    if lib is not None:
        return _decode_native(lib, raw, members, params["positions"], select, dtype)
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


def member_levels(members: Sequence[Any], tdt: torch.dtype) -> torch.Tensor:
    """(members, 3) tensor of each member's background, +level and -level in ``tdt``: the binary32
    values of ``ternary_levels`` (one addition, none when the offset is 0), rounded once."""
    s = np.array([m.scale for m in members], dtype=np.float32)
    o = np.array([m.offset for m in members], dtype=np.float32)
    plain = np.array([m.offset == 0.0 for m in members], dtype=bool)
    lv = np.stack([np.where(plain, np.float32(0.0), o), np.where(plain, s, o + s), np.where(plain, -s, o - s)], axis=1)
    return torch.from_numpy(lv.astype(np.float32, copy=False)).to(tdt)


def _decode_native(lib, raw: dict[str, torch.Tensor], members: Sequence[Any], coding: str,
                   select: Sequence[int], dtype: str | torch.dtype | None) -> dict[int, torch.Tensor]:
    """One pass of the C decoder per element size among the selected members' output dtypes
    (one in practice); it writes every element of the outputs."""
    total = sum(m.nnz for m in members)
    signs = raw[C.ROLE_SIGNS]
    check_bit_stream(signs, total)
    if coding == C.POSITIONS_BITMAP:
        check_bit_stream(raw[C.ROLE_POSITIONS], sum(m.numel for m in members))
    out: dict[int, torch.Tensor] = {}
    by_dtype: dict[torch.dtype, list[int]] = {}
    for j in select:
        by_dtype.setdefault(to_torch(dtype or members[j].dtype), []).append(j)
    for es in sorted({t.itemsize for t in by_dtype}):
        outs: list = [None] * len(members)
        levels = torch.zeros(len(members), 3, dtype=native._INT_OF_SIZE[es])
        for tdt, js in by_dtype.items():
            if tdt.itemsize == es:
                levels[js] = member_levels([members[j] for j in js], tdt).view(levels.dtype)
                for j in js:
                    out[j] = torch.empty(members[j].numel, dtype=tdt)
                    outs[j] = native.as_buffer(out[j])
        lv_bytes = levels.numpy()
        if coding == C.POSITIONS_BITMAP:
            numel, nnz = native.member_arrays(members)
            native.call(lib.bitmap_ternary, raw[C.ROLE_POSITIONS].numpy(), signs.numpy(), numel, nnz, outs,
                        lv_bytes, es)
        else:
            positions.golomb_native(lib, raw, members, fill=(signs.numpy(), outs, lv_bytes, es))
    return {j: out[j].view(members[j].shape) for j in select}
