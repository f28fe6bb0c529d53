"""The in-memory compressed adapter: what ``compress`` returns and ``save`` writes.

``CompressedTensor.to_dense`` is the reference meaning of a compressed tensor (spec section 5);
decoding a saved file must reproduce it bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import constants as C
from .dtypes import TORCH_DTYPES, name_of, rounded_scalar, ternary_levels, to_torch
from .manifest import AdapterInfo, BaseModelInfo, CompressionInfo, ProvenanceInfo


@dataclass(eq=False)
class CompressedTensor:
    """One tensor in compressed form.

    ternary: ``indices`` (strictly increasing flat positions, int64) and ``negative`` (bool per
    kept entry) with one ``scale``; value at a kept position is ``offset +/- scale``.
    sparse: ``indices`` and ``values`` (torch, value dtype); value is ``offset + value``.
    dense: ``values`` holds every element (torch, value dtype).
    Positions not kept hold ``offset``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    indices: np.ndarray | None = None
    negative: np.ndarray | None = None
    values: torch.Tensor | None = None
    scale: float | None = None
    offset: float = 0.0
    #: standard deviation the scale was derived from (in memory only; lets alpha change later)
    sigma: float | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        if self.encoding == C.ENC_DENSE:
            return self.numel
        assert self.indices is not None
        return int(self.indices.size)

    @property
    def value_dtype(self) -> str | None:
        return None if self.values is None else name_of(self.values.dtype)

    def to_dense(self, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor this compressed form stands for, rounded once to ``dtype``."""
        tdt = to_torch(dtype or self.dtype)
        if self.encoding == C.ENC_DENSE:
            assert self.values is not None
            return self.values.reshape(self.shape).to(device=device, dtype=tdt)
        assert self.indices is not None
        idx = torch.from_numpy(self.indices).to(device)
        if self.encoding == C.ENC_TERNARY:
            assert self.negative is not None and self.scale is not None
            levels = torch.from_numpy(ternary_levels(self.scale, self.offset)).to(tdt)
            out = torch.empty(self.numel, dtype=tdt, device=device).fill_(levels[0].to(device))
            out[idx] = torch.where(
                torch.from_numpy(self.negative).to(device), levels[2].to(device), levels[1].to(device)
            )
        else:
            assert self.values is not None
            v = self.values.to(device)
            if self.offset != 0.0:
                v = v.to(torch.float32) + torch.tensor(self.offset, dtype=torch.float32, device=device)
            out = torch.empty(self.numel, dtype=tdt, device=device).fill_(rounded_scalar(self.offset, tdt, device))
            out[idx] = v.to(tdt)
        return out.reshape(self.shape)


@dataclass(eq=False)
class CompressedAdapter:
    """A compressed adapter: tensors in manifest order plus the metadata the manifest carries."""

    tensors: dict[str, CompressedTensor]
    adapter: AdapterInfo = field(default_factory=AdapterInfo)
    base_model: BaseModelInfo = field(default_factory=BaseModelInfo)
    compression: CompressionInfo = field(default_factory=CompressionInfo)
    provenance: ProvenanceInfo = field(default_factory=ProvenanceInfo)

    def state_dict(self, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Dense tensors, each in its target dtype unless ``dtype`` is given."""
        return {n: t.to_dense(dtype, device) for n, t in self.tensors.items()}

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())


__all__ = ["CompressedTensor", "CompressedAdapter", "TORCH_DTYPES"]
