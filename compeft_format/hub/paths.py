"""Checks shared by the Hub client, the index and the server: file paths inside a repository,
and text from the other side made safe to print or to send as a header."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

#: Longest path in a repository, and longest path component (bytes).
MAX_PATH = 1000
MAX_PATH_PART = 255

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\\u2028\u2029]")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
#: Unicode categories a path may not hold: controls (C0 and C1), format characters (bidi
#: overrides, zero-width joiners), surrogates, line and paragraph separators
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def valid_repo_path(path: Any) -> bool:
    """A file path in a repository: ``/``-separated, no empty, ``.`` or ``..`` component, no
    backslash and no control, format, surrogate or line-separator character (so that printing a
    path cannot move the cursor or reorder the text around it), at most ``MAX_PATH`` characters
    and ``MAX_PATH_PART`` bytes a component."""
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH or _CONTROL.search(path):
        return False
    if not path.isascii() and any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in path):
        return False
    return all(part not in ("", ".", "..") and len(part.encode("utf-8", "surrogatepass")) <= MAX_PATH_PART
               for part in path.split("/"))


def printable(text: Any, limit: int) -> str:
    """``text`` as printable ASCII (anything else, CR and LF included, becomes ``?``), at most
    ``limit`` characters: safe in a one-line message or a header value."""
    return _NOT_PRINTABLE.sub("?", "" if text is None else str(text))[:limit]


__all__ = ["MAX_PATH", "MAX_PATH_PART", "valid_repo_path", "printable"]
