"""``ternary`` (spec 4.2, 5.2): the group's positions (4.7) and one sign bit per kept entry
(1 = negative), in position order. Every element is one of three binary32 levels of its member:
the offset, offset + scale, offset - scale, rounded once to the output dtype."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import constants as C
from ..dtypes import ternary_levels, to_torch
from . import native
from .base import DType, Payload, PositionalCodec, log2_binomial
from .bits import check_bit_stream, pack_bits, unpack_bits
from .positions import kept_indices
from .types import Member

if TYPE_CHECKING:
    from ..manifest import TensorDescription


def bound_bits(n: int, k: int) -> float:
    """``log2 C(n, k) + k``: bits needed for k signed non-zeros among n entries, uniform model."""
    if k <= 0 or k >= n:
        return float(k)
    return log2_binomial(n, k) + k


def member_levels(members: Sequence[TensorDescription], tdt: torch.dtype) -> torch.Tensor:
    """(members, 3) tensor of each member's background, +level and -level in ``tdt``: the binary32
    values of ``ternary_levels`` (one addition, none when the offset is 0), rounded once."""
    s = np.array([m.scale for m in members], dtype=np.float32)
    o = np.array([m.offset for m in members], dtype=np.float32)
    plain = np.array([m.offset == 0.0 for m in members], dtype=bool)
    lv = np.stack([np.where(plain, np.float32(0.0), o), np.where(plain, s, o + s), np.where(plain, -s, o - s)], axis=1)
    return torch.from_numpy(lv.astype(np.float32, copy=False)).to(tdt)


class Ternary(PositionalCodec):
    name = C.ENC_TERNARY
    own_roles = (C.ROLE_SIGNS,)
    member_scale = True

    def own_raw_sizes(self, params: Mapping[str, Any], members: Sequence[TensorDescription]) -> dict[str, tuple[int, bool]]:
        return {C.ROLE_SIGNS: ((sum(m.nnz for m in members) + 7) // 8, True)}

    def bound_bits(self, params: Mapping[str, Any], member: TensorDescription) -> float:
        return bound_bits(member.numel, member.nnz)

    def encode(self, members: Sequence[Member], params: Mapping[str, Any]) -> dict[str, bytes]:
        signs = (np.concatenate([np.asarray(m.negative, dtype=bool).reshape(-1) for m in members]) if members
                 else np.zeros(0, bool))
        return {**self.coding(params).encode(members), C.ROLE_SIGNS: pack_bits(signs)}

    def decode(self, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription], params: Mapping[str, Any],
               select: Sequence[int], dtype: DType, memo: dict[str, Any] | None = None) -> dict[int, torch.Tensor]:
        lib = native.module(raw[C.ROLE_SIGNS].device) if self.coding(params).native_ternary else None
        if lib is not None:
            return self._decode_native(lib, raw, members, params, select, dtype)
        signs = unpack_bits(raw[C.ROLE_SIGNS], sum(m.nnz for m in members))
        out: dict[int, torch.Tensor] = {}
        for j, where, first in self.coding(params).locate(raw, members, select, memo):
            m = members[j]
            tdt = to_torch(dtype or m.dtype)
            levels = torch.from_numpy(ternary_levels(_scale(m), m.offset)).to(tdt).to(where.device)
            t = torch.empty(m.numel, dtype=tdt, device=where.device).fill_(levels[0])
            t[where] = torch.where(signs[first:first + m.nnz], levels[2], levels[1])
            out[j] = t.view(m.shape)
        return out

    def _decode_native(self, lib: Any, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription],
                       params: Mapping[str, Any], select: Sequence[int], dtype: DType) -> dict[int, torch.Tensor]:
        """One pass of the C decoder per element size among the selected members' output dtypes
        (one in practice); it writes every element of the outputs."""
        signs = raw[C.ROLE_SIGNS]
        check_bit_stream(signs, sum(m.nnz for m in members))
        coding = self.coding(params)
        out: dict[int, torch.Tensor] = {}
        by_dtype: dict[torch.dtype, list[int]] = {}
        for j in select:
            by_dtype.setdefault(to_torch(dtype or members[j].dtype), []).append(j)
        for es in sorted({t.itemsize for t in by_dtype}):
            outs: list[Any] = [None] * len(members)
            levels = torch.zeros(len(members), 3, dtype=native.INT_OF_SIZE[es])
            for tdt, js in by_dtype.items():
                if tdt.itemsize == es:
                    levels[js] = member_levels([members[j] for j in js], tdt).view(levels.dtype)
                    for j in js:
                        out[j] = torch.empty(members[j].numel, dtype=tdt)
                        outs[j] = native.as_buffer(out[j])
            coding.fill_ternary(lib, raw, members, signs.numpy(), outs, levels.numpy(), es)
        return {j: out[j].view(members[j].shape) for j in select}

    def unpack(self, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription],
               params: Mapping[str, Any]) -> list[Payload]:
        signs = unpack_bits(raw[C.ROLE_SIGNS], sum(m.nnz for m in members))
        out: list[Payload] = []
        for j, where, first in self.coding(params).locate(raw, members, range(len(members))):
            negative = signs[first:first + members[j].nnz].numpy().copy()
            out.append(Payload(indices=kept_indices(where), negative=negative))
        return out

    def to_dense(self, tensor: Member, dtype: DType = None,
                 device: str | torch.device = "cpu") -> torch.Tensor:
        assert tensor.indices is not None and tensor.negative is not None
        tdt = to_torch(dtype or tensor.dtype)
        idx = torch.from_numpy(tensor.indices).to(device)
        levels = torch.from_numpy(ternary_levels(_scale(tensor), tensor.offset)).to(tdt).to(device)
        out = torch.empty(tensor.numel, dtype=tdt, device=device).fill_(levels[0])
        out[idx] = torch.where(torch.from_numpy(tensor.negative).to(device), levels[2], levels[1])
        return out.reshape(tensor.shape)


def _scale(m: TensorDescription | Member) -> float:
    assert m.scale is not None  # the manifest requires one for every ternary member
    return m.scale
