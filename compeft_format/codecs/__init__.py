"""Codecs: one class per encoding of spec section 4, registered by name in ``REGISTRY``
(``codecs.base`` describes the interface), and the position codings they share
(``codecs.positions``). Nothing here touches a file."""

from __future__ import annotations

from . import dense, sparse, ternary
from .base import REGISTRY, Codec, Payload, PositionalCodec, get_codec
from .positions import CODINGS, PositionCoding, get_position_coding

__all__ = ["Codec", "PositionalCodec", "Payload", "REGISTRY", "get_codec", "CODINGS", "PositionCoding",
           "get_position_coding", "dense", "sparse", "ternary"]
