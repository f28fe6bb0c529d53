"""``sparse`` (spec 4.3, 5.3): the group's positions (4.7) and the kept values in
``value_dtype``, little-endian, in position order. An element is its value plus the member's
offset (one binary32 addition), or the offset where nothing is kept."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import constants as C
from ..dtypes import rounded_scalar, to_torch
from .base import DType, Payload, PositionalCodec, log2_binomial, parse_value_dtype, value_bytes, values_view
from .positions import kept_indices
from .types import Member

if TYPE_CHECKING:
    from ..manifest import TensorDescription


class Sparse(PositionalCodec):
    name = C.ENC_SPARSE
    own_roles = (C.ROLE_VALUES,)

    def parse_params(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        params = super().parse_params(params, where)
        parse_value_dtype(params, where)
        return params

    def own_raw_sizes(self, params: Mapping[str, Any], members: Sequence[TensorDescription]) -> dict[str, tuple[int, bool]]:
        item = C.DTYPE_ITEMSIZE[params[C.PARAM_VALUE_DTYPE]]
        return {C.ROLE_VALUES: (sum(m.nnz for m in members) * item, True)}

    def bound_bits(self, params: Mapping[str, Any], member: TensorDescription) -> float:
        return log2_binomial(member.numel, member.nnz) + member.nnz * 8 * C.DTYPE_ITEMSIZE[params[C.PARAM_VALUE_DTYPE]]

    def choose_params(self, tensor: Member, *, positions: str = "auto") -> dict[str, Any]:
        return {**super().choose_params(tensor, positions=positions), C.PARAM_VALUE_DTYPE: tensor.value_dtype}

    def encode(self, members: Sequence[Member], params: Mapping[str, Any]) -> dict[str, bytes]:
        values = [m.values for m in members if m.values is not None]
        return {**self.coding(params).encode(members),
                C.ROLE_VALUES: value_bytes(values, params[C.PARAM_VALUE_DTYPE])}

    def decode(self, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription], params: Mapping[str, Any],
               select: Sequence[int], dtype: DType, memo: dict[str, Any] | None = None) -> dict[int, torch.Tensor]:
        values = values_view(raw[C.ROLE_VALUES], params[C.PARAM_VALUE_DTYPE])
        out: dict[int, torch.Tensor] = {}
        for j, where, first in self.coding(params).locate(raw, members, select, memo):
            m = members[j]
            tdt = to_torch(dtype or m.dtype)
            v = values[first:first + m.nnz]
            if m.offset != 0.0:
                v = v.to(torch.float32) + float(np.float32(m.offset))
            t = torch.empty(m.numel, dtype=tdt, device=where.device).fill_(rounded_scalar(m.offset, tdt, where.device))
            t[where] = v.to(tdt)
            out[j] = t.view(m.shape)
        return out

    def unpack(self, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription],
               params: Mapping[str, Any]) -> list[Payload]:
        values = values_view(raw[C.ROLE_VALUES], params[C.PARAM_VALUE_DTYPE])
        return [Payload(indices=kept_indices(where), values=values[first:first + members[j].nnz].clone())
                for j, where, first in self.coding(params).locate(raw, members, range(len(members)))]

    def to_dense(self, tensor: Member, dtype: DType = None,
                 device: str | torch.device = "cpu") -> torch.Tensor:
        assert tensor.indices is not None and tensor.values is not None
        tdt = to_torch(dtype or tensor.dtype)
        idx = torch.from_numpy(tensor.indices).to(device)
        v = tensor.values.to(device)
        if tensor.offset != 0.0:
            v = v.to(torch.float32) + torch.tensor(tensor.offset, dtype=torch.float32, device=device)
        out = torch.empty(tensor.numel, dtype=tdt, device=device).fill_(rounded_scalar(tensor.offset, tdt, device))
        out[idx] = v.to(tdt)
        return out.reshape(tensor.shape)
