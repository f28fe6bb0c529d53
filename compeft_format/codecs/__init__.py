"""Codec registry: encoding name -> codec (spec section 4).

A codec is two pure functions over one group (its streams are ``constants.stream_roles``):
``encode(members, params) -> {role: raw bytes}`` and
``decode(raw, members, params, select, dtype) -> {member index: tensor}``, where ``raw`` maps each
role to a uint8 tensor on the device that will hold the output. Framing (zstd), hashing and file
I/O happen in ``container``; nothing here touches a file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import constants as C
from ..errors import UnknownEncoding
from . import dense, sparse, ternary


@dataclass(frozen=True)
class Codec:
    name: str
    encode: Callable[..., dict[str, bytes]]
    decode: Callable[..., dict[int, Any]]


REGISTRY: dict[str, Codec] = {
    C.ENC_TERNARY: Codec(C.ENC_TERNARY, ternary.encode, ternary.decode),
    C.ENC_SPARSE: Codec(C.ENC_SPARSE, sparse.encode, sparse.decode),
    C.ENC_DENSE: Codec(C.ENC_DENSE, dense.encode, dense.decode),
}


def get_codec(encoding: str) -> Codec:
    try:
        return REGISTRY[encoding]
    except KeyError:
        raise UnknownEncoding(f"unknown encoding {encoding!r}") from None


__all__ = ["Codec", "REGISTRY", "get_codec"]
