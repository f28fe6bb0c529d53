"""``dense`` (spec 4.4, 5.4): every element in ``value_dtype``, little-endian, C order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .. import constants as C
from ..dtypes import to_torch
from .base import Codec, DType, Payload, parse_value_dtype, value_bytes, values_view
from .layout import element_offsets
from .types import Member

if TYPE_CHECKING:
    from ..manifest import TensorDescription


class Dense(Codec):
    name = C.ENC_DENSE
    member_offset = False
    every_element = True

    def parse_params(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        parse_value_dtype(params, where)
        return dict(params)

    def roles(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        return (C.ROLE_VALUES,)

    def raw_sizes(self, params: Mapping[str, Any], members: Sequence[TensorDescription]) -> dict[str, tuple[int, bool]]:
        item = C.DTYPE_ITEMSIZE[params[C.PARAM_VALUE_DTYPE]]
        return {C.ROLE_VALUES: (sum(m.numel for m in members) * item, True)}

    def bound_bits(self, params: Mapping[str, Any], member: TensorDescription) -> float:
        return member.numel * 8 * C.DTYPE_ITEMSIZE[params[C.PARAM_VALUE_DTYPE]]

    def choose_params(self, tensor: Member, *, positions: str = "auto") -> dict[str, Any]:
        return {C.PARAM_VALUE_DTYPE: tensor.value_dtype}

    def encode(self, members: Sequence[Member], params: Mapping[str, Any]) -> dict[str, bytes]:
        values = [m.values for m in members if m.values is not None]
        return {C.ROLE_VALUES: value_bytes(values, params[C.PARAM_VALUE_DTYPE])}

    def _slices(self, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription],
                params: Mapping[str, Any], select: Sequence[int]) -> dict[int, torch.Tensor]:
        values = values_view(raw[C.ROLE_VALUES], params[C.PARAM_VALUE_DTYPE])
        offs = element_offsets([m.numel for m in members])
        return {j: values[int(offs[j]):int(offs[j + 1])] for j in select}

    def decode(self, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription], params: Mapping[str, Any],
               select: Sequence[int], dtype: DType, memo: dict[str, Any] | None = None) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for j, v in self._slices(raw, members, params, select).items():
            t = v.to(to_torch(dtype or members[j].dtype))
            if t.dtype == v.dtype:  # .to() returned a view of the stream buffer
                t = t.clone()
            out[j] = t.view(members[j].shape)
        return out

    def unpack(self, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription],
               params: Mapping[str, Any]) -> list[Payload]:
        slices = self._slices(raw, members, params, range(len(members)))
        return [Payload(values=slices[j].clone()) for j in range(len(members))]

    def to_dense(self, tensor: Member, dtype: DType = None,
                 device: str | torch.device = "cpu") -> torch.Tensor:
        assert tensor.values is not None
        return tensor.values.reshape(tensor.shape).to(device=device, dtype=to_torch(dtype or tensor.dtype))
