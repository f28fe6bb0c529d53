"""The codec interface: one class per encoding (spec section 4), registered by name.

A codec owns everything about its encoding: the group parameters it takes and checks, its stream
roles, the raw stream sizes that shapes and counts imply, the information bound of a member, how
a writer picks parameters for a tensor, how members are encoded into streams, decoded to dense
tensors or unpacked back to their compressed payload, and the reference meaning of a compressed
tensor. Codecs are pure: bytes and arrays in, bytes and arrays out. Framing (zstd), hashing and
file I/O happen in the reader and writer.

Subclasses register themselves when defined (``name`` set on the class); ``codecs.get_codec``
looks them up. A new encoding is one module with one such class, plus the spec, a conformance
vector and the second reader.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .. import constants as C
from ..dtypes import to_torch
from ..errors import UnknownEncoding
from .positions import CODINGS, PositionCoding, choose, get_position_coding
from .types import DType, Member, Payload

if TYPE_CHECKING:
    from ..manifest import TensorDescription

#: encoding name -> its codec (filled as codec classes are defined)
REGISTRY: dict[str, Codec] = {}


def log2_binomial(n: int, k: int) -> float:
    """``log2 C(n, k)``: bits to name ``k`` positions among ``n``."""
    if k <= 0 or k >= n:
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


class Codec(ABC):
    """Everything about one encoding. Members are ``manifest.TensorDescription`` objects when
    reading, and ``types.Member`` objects (a description with its payload) when writing."""

    #: the encoding's name in the manifest (spec 3.3)
    name: ClassVar[str]
    #: members carry a ``scale`` (required), others must not (spec 3.2)
    member_scale: ClassVar[bool] = False
    #: members may carry a non-zero ``offset``
    member_offset: ClassVar[bool] = True
    #: every element is an entry: ``nnz == numel``
    every_element: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in REGISTRY:
                raise TypeError(f"encoding {cls.name!r} is registered twice")
            REGISTRY[cls.name] = cls()

    # -- the manifest's rules (manifest.EncodingRules) ---------------------------------------
    @abstractmethod
    def parse_params(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        """The group's ``params`` checked (``UnknownEncoding`` for a missing or unknown required
        parameter); other members are kept as they are."""

    @abstractmethod
    def roles(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The group's stream roles, in order."""

    @abstractmethod
    def raw_sizes(self, params: Mapping[str, Any], members: Sequence[TensorDescription]) -> dict[str, tuple[int, bool]]:
        """Per role: (raw size implied by shapes and counts, exact) (spec 8.4)."""

    # -- sizes --------------------------------------------------------------------------------
    @abstractmethod
    def bound_bits(self, params: Mapping[str, Any], member: TensorDescription) -> float:
        """Bits a member needs at least under this encoding's model of it."""

    # -- writing ------------------------------------------------------------------------------
    @abstractmethod
    def choose_params(self, tensor: Member, *, positions: str = "auto") -> dict[str, Any]:
        """Parameters of the group a tensor joins; ``positions`` is the writer's position-coding
        option (a coding name or ``"auto"``), for encodings that have positions."""

    @abstractmethod
    def encode(self, members: Sequence[Member], params: Mapping[str, Any]) -> dict[str, bytes]:
        """The group's raw streams, by role."""

    # -- reading ------------------------------------------------------------------------------
    @abstractmethod
    def decode(self, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription], params: Mapping[str, Any],
               select: Sequence[int], dtype: DType, memo: dict[str, Any] | None = None) -> dict[int, torch.Tensor]:
        """Dense tensors of the selected members (indices into ``members``), each in ``dtype`` or
        its own target dtype. ``raw`` maps each role to a uint8 tensor on the device that holds
        the output; ``memo`` keeps group-wide work between calls on the same streams. A stream
        that does not decode raises ``StreamCorrupt``."""

    @abstractmethod
    def unpack(self, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription],
               params: Mapping[str, Any]) -> list[Payload]:
        """Every member's compressed payload, from raw streams on the CPU (the inverse of
        ``encode``), with the checks ``decode`` makes."""

    @abstractmethod
    def to_dense(self, tensor: Member, dtype: DType = None,
                 device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor a compressed form stands for, rounded once to ``dtype`` (spec 5): the
        reference meaning that decoding a file must reproduce bit for bit."""


def get_codec(encoding: str) -> Codec:
    """The codec of an encoding; ``UnknownEncoding`` if there is none."""
    try:
        return REGISTRY[encoding]
    except KeyError:
        raise UnknownEncoding(f"unknown encoding {encoding!r}") from None




# ---------------------------------------------------------------------------------------------
# parameters shared by several encodings
# ---------------------------------------------------------------------------------------------
class PositionalCodec(Codec):
    """An encoding whose groups store where their entries are with a position coding
    (``params.positions``, spec 4.7), followed by streams of its own."""

    #: the encoding's own stream roles, after the position coding's
    own_roles: ClassVar[tuple[str, ...]]

    def parse_params(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        coding = params.get(C.PARAM_POSITIONS)
        if not isinstance(coding, str) or coding not in CODINGS:
            raise UnknownEncoding(f"{where} uses unknown position coding {coding!r}")
        return dict(params)

    def coding(self, params: Mapping[str, Any]) -> PositionCoding:
        return get_position_coding(params[C.PARAM_POSITIONS])

    def roles(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        return self.coding(params).roles + self.own_roles

    def raw_sizes(self, params: Mapping[str, Any], members: Sequence[TensorDescription]) -> dict[str, tuple[int, bool]]:
        return {**self.coding(params).raw_sizes(members), **self.own_raw_sizes(params, members)}

    @abstractmethod
    def own_raw_sizes(self, params: Mapping[str, Any], members: Sequence[TensorDescription]) -> dict[str, tuple[int, bool]]:
        """Sizes of the encoding's own streams (spec 8.4)."""

    def choose_params(self, tensor: Member, *, positions: str = "auto") -> dict[str, Any]:
        return {C.PARAM_POSITIONS: choose(tensor, positions)}


def parse_value_dtype(params: Mapping[str, Any], where: str) -> str:
    """``params.value_dtype`` (spec 3.3), a float dtype name."""
    vd = params.get(C.PARAM_VALUE_DTYPE)
    if vd not in C.FLOAT_DTYPES:
        raise UnknownEncoding(f"{where} uses unknown value dtype {vd!r}")
    return str(vd)


def value_bytes(values: Sequence[torch.Tensor], value_dtype: str) -> bytes:
    """Values in ``value_dtype``, little-endian, one tensor after another."""
    tdt = to_torch(value_dtype)
    if not values:
        return b""
    flat = torch.cat([v.reshape(-1).to(tdt) for v in values]).contiguous()
    return flat.view(torch.uint8).numpy().tobytes()


def values_view(raw: torch.Tensor, value_dtype: str) -> torch.Tensor:
    """A ``values`` stream as a tensor of ``value_dtype`` (sharing its memory)."""
    return raw.view(to_torch(value_dtype)) if raw.numel() else raw.new_empty(0, dtype=to_torch(value_dtype))


__all__ = ["Codec", "PositionalCodec", "Payload", "Member", "REGISTRY", "get_codec", "log2_binomial", "DType",
           "parse_value_dtype", "value_bytes", "values_view"]
