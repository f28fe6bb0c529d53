"""What codecs take and give: a member with its payload (``Member``, which
``compressed.CompressedTensor`` is), a payload alone (``Payload``) and the dtype argument of the
decoders (``DType``)."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np
import torch

#: dtype argument of the decoders: a spec name, a torch dtype, or None for each member's own
DType = str | torch.dtype | None


class Payload(NamedTuple):
    """The compressed content of one member: ``indices`` (int64, strictly increasing flat positions
    of the entries), ``negative`` (bool per entry, ternary), ``values`` (torch, in the group's value
    dtype: the entries of a sparse member or every element of a dense one)."""

    indices: np.ndarray | None = None
    negative: np.ndarray | None = None
    values: torch.Tensor | None = None


class Member(Protocol):
    """A tensor's description (``manifest.TensorDescription``) with its encoding and payload."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> str: ...

    @property
    def nnz(self) -> int: ...

    @property
    def numel(self) -> int: ...

    @property
    def scale(self) -> float | None: ...

    @property
    def offset(self) -> float: ...

    @property
    def encoding(self) -> str: ...

    @property
    def indices(self) -> np.ndarray | None: ...

    @property
    def negative(self) -> np.ndarray | None: ...

    @property
    def values(self) -> torch.Tensor | None: ...

    @property
    def value_dtype(self) -> str | None: ...
