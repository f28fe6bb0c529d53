"""The in-memory form of a compeft file: what ``compress`` and ``read`` return and ``save`` writes.

A ``CompressedTensor`` is the manifest's description of a tensor (``TensorDescription``) plus its
payload; a ``CompressedAdapter`` is those tensors plus the manifest's descriptive objects. The
reference meaning of a compressed tensor (spec section 5) is its codec's ``to_dense``; decoding a
saved file must reproduce it bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import constants as C
from .binding import BaseBinding
from .codecs import Payload, get_codec
from .dtypes import name_of
from .errors import InvalidArgument
from .manifest import AdapterInfo, CompressionInfo, ProvenanceInfo, Requirement, TensorDescription


@dataclass(frozen=True, eq=False, kw_only=True)
class CompressedTensor(TensorDescription):
    """One tensor in compressed form: its description plus the payload of its ``encoding``.

    ternary: ``indices`` (strictly increasing flat positions, int64) and ``negative`` (bool per
    kept entry), one ``scale``; value at a kept position is ``offset +/- scale``.
    sparse: ``indices`` and ``values`` (torch, value dtype); value is ``offset + value``.
    dense: ``values`` holds every element (torch, value dtype).
    Positions not kept hold ``offset``. Build one with ``ternary``, ``sparse`` or ``dense``.
    """

    encoding: str
    indices: np.ndarray | None = None
    negative: np.ndarray | None = None
    values: torch.Tensor | None = None
    #: the scale at alpha 1 (sigma for the paper's method; in memory only; lets alpha change later)
    sigma: float | None = None

    def __post_init__(self) -> None:
        every = get_codec(self.encoding).every_element
        count = self.numel if every else (None if self.indices is None else self.indices.size)
        if count != self.nnz:
            raise InvalidArgument(f"tensor {self.name!r}: nnz {self.nnz} disagrees with its payload ({count})")

    @classmethod
    def ternary(cls, name: str, shape: tuple[int, ...], dtype: str, indices: np.ndarray, negative: np.ndarray,
                scale: float, offset: float = 0.0, sigma: float | None = None) -> CompressedTensor:
        indices = np.asarray(indices, dtype=np.int64)
        return cls(name=name, shape=tuple(shape), dtype=dtype, nnz=int(indices.size), scale=scale, offset=offset,
                   encoding=C.ENC_TERNARY, indices=indices, negative=np.asarray(negative, dtype=bool), sigma=sigma)

    @classmethod
    def sparse(cls, name: str, shape: tuple[int, ...], dtype: str, indices: np.ndarray, values: torch.Tensor,
               offset: float = 0.0) -> CompressedTensor:
        indices = np.asarray(indices, dtype=np.int64)
        return cls(name=name, shape=tuple(shape), dtype=dtype, nnz=int(indices.size), offset=offset,
                   encoding=C.ENC_SPARSE, indices=indices, values=values)

    @classmethod
    def dense(cls, name: str, shape: tuple[int, ...], dtype: str, values: torch.Tensor) -> CompressedTensor:
        shape = tuple(shape)
        return cls(name=name, shape=shape, dtype=dtype, nnz=int(np.prod(shape, dtype=np.int64)),
                   encoding=C.ENC_DENSE, values=values.reshape(-1))

    @classmethod
    def from_payload(cls, description: TensorDescription, encoding: str, payload: Payload,
                     sigma: float | None = None) -> CompressedTensor:
        """The tensor a file describes, with the payload its codec unpacked."""
        return cls(name=description.name, shape=description.shape, dtype=description.dtype, nnz=description.nnz,
                   scale=description.scale, offset=description.offset, encoding=encoding, indices=payload.indices,
                   negative=payload.negative, values=payload.values, sigma=sigma)

    @property
    def value_dtype(self) -> str | None:
        return None if self.values is None else name_of(self.values.dtype)

    def to_dense(self, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor this compressed form stands for, rounded once to ``dtype``."""
        return get_codec(self.encoding).to_dense(self, dtype, device)


@dataclass(eq=False)
class CompressedAdapter:
    """A compressed adapter: tensors in manifest order plus the metadata the manifest carries."""

    tensors: dict[str, CompressedTensor]
    adapter: AdapterInfo = field(default_factory=AdapterInfo)
    base_model: BaseBinding = field(default_factory=BaseBinding)
    compression: CompressionInfo = field(default_factory=CompressionInfo)
    provenance: ProvenanceInfo = field(default_factory=ProvenanceInfo)
    #: artifacts to apply before this one (spec 3.6), by their manifest digests
    requires: list[Requirement] = field(default_factory=list)

    def state_dict(self, dtype: str | torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Dense tensors, each in its target dtype unless ``dtype`` is given."""
        return {n: t.to_dense(dtype, device) for n, t in self.tensors.items()}

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())


__all__ = ["CompressedTensor", "CompressedAdapter"]
