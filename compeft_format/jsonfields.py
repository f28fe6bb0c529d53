"""Checked reads of JSON values from a file's manifest (spec 3.1): each returns the value or raises
``ManifestError`` naming where it is (``what``); and ``loads``, the JSON parser for untrusted text,
which keeps the sign of an integer ``-0`` and refuses text holding more objects than a budget
allows before building them."""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from typing import Any

from .errors import LimitExceeded, ManifestError


class NegativeZero(int):
    """The JSON number ``-0`` written without a fraction: the integer 0, and as a number -0.0
    (spec 3.1 parses numbers as binary64, where ``-0`` keeps its sign)."""


NEGATIVE_ZERO = NegativeZero(0)


class _TooManyObjects(Exception):
    pass


def _parse_int(literal: str) -> int:
    return NEGATIVE_ZERO if literal == "-0" else int(literal)


def loads(text: str, *, max_objects: int, what: str,
          parse_constant: Callable[[str], Any] | None = None) -> Any:
    """Parse untrusted JSON text. Raises ``LimitExceeded`` when it holds more than ``max_objects``
    objects (counted as they are built, and only when the text has that many opening braces, so
    the common case runs at the C parser's speed), ``ValueError`` or ``RecursionError`` when it is
    not JSON."""
    hooks: dict[str, Any] = {}
    if parse_constant is not None:
        hooks["parse_constant"] = parse_constant
    if "-0" in text:
        hooks["parse_int"] = _parse_int
    if text.count("{") > max_objects:
        count = 0

        def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            nonlocal count
            count += 1
            if count > max_objects:
                raise _TooManyObjects
            return dict(pairs)

        hooks["object_pairs_hook"] = build
    try:
        return json.loads(text, **hooks)
    except _TooManyObjects:
        raise LimitExceeded(f"{what} holds more than {max_objects:,} JSON objects, over this reader's budget") from None

_F32 = struct.Struct("<f")

#: a hex digest: 64 lowercase hex digits (spec 1)
HEX64 = re.compile(r"[0-9a-f]{64}")


def as_object(x: Any, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise ManifestError(f"{what} must be an object")
    return x


def as_list(x: Any, what: str) -> list[Any]:
    if not isinstance(x, list):
        raise ManifestError(f"{what} must be an array")
    return x


def as_int(x: Any, what: str, lo: int = 0) -> int:
    """An integer (not a boolean) of at least ``lo``."""
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ManifestError(f"{what} must be an integer >= {lo}")
    return int(x)


def as_str(x: Any, what: str) -> str:
    if not isinstance(x, str):
        raise ManifestError(f"{what} must be a string")
    return x


def as_opt_str(x: Any, what: str) -> str | None:
    return None if x is None else as_str(x, what)


def as_finite(x: Any, what: str) -> float:
    """A JSON number read as binary64; integers too large for binary64 are not finite."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ManifestError(f"{what} must be a number")
    if type(x) is NegativeZero:
        return -0.0
    try:
        v = float(x)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v):
        raise ManifestError(f"{what} must be a finite number")
    return v


def as_opt_number(x: Any, what: str) -> float | None:
    return None if x is None else as_finite(x, what)


def as_f32(x: Any, what: str) -> float:
    """A finite JSON number that is exactly a binary32 value."""
    v = as_finite(x, what)
    try:
        exact = _F32.unpack(_F32.pack(v))[0] == v
    except OverflowError:  # beyond binary32's range
        exact = False
    if not exact:
        raise ManifestError(f"{what} must be a finite value exactly representable in binary32")
    return v


def as_hex64(x: Any, what: str) -> str:
    s = as_str(x, what)
    if HEX64.fullmatch(s) is None:
        raise ManifestError(f"{what} must be 64 lowercase hex digits")
    return s


def utf8_len(s: str, what: str) -> int:
    """Length in UTF-8 of text that must consist of Unicode scalar values."""
    try:
        return len(s.encode("utf-8"))
    except UnicodeEncodeError:
        raise ManifestError(f"{what} is not valid Unicode text") from None
