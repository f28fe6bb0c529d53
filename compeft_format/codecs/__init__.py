"""Codecs: one class per encoding of spec section 4, registered by name in ``REGISTRY``
(``codecs.base`` describes the interface), and the position codings they share
(``codecs.positions``). Every module of this package is imported here, so a codec module
registers its class by being in the package. Nothing here touches a file."""

from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, Codec, Payload, PositionalCodec, get_codec
from .positions import CODINGS, PositionCoding, get_position_coding

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Codec", "PositionalCodec", "Payload", "REGISTRY", "get_codec", "CODINGS", "PositionCoding",
           "get_position_coding"]
