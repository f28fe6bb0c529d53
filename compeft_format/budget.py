"""The resource budget a reader holds (spec 8.5): how many manifest entries it will parse and how
many bytes one decode may hold. The format's limits (spec 8.3) bound what a valid file may declare;
the budget bounds what this reader, on this machine, agrees to spend, so a file within the limits
that would need more memory or time than the machine has is refused up front with
``LIMIT_EXCEEDED``, before anything is allocated.

Defaults are sized to the machine: half its physical memory for decoding, 100,000 manifest entries
(tensors and groups; a LoRA of a 70B model with every linear layer adapted has about 1,200). The
environment variables ``COMPEFT_MAX_DECODED_BYTES`` and ``COMPEFT_MAX_ENTRIES`` change them for a
process (the CLI included); ``Budget(...)`` passed to ``open_file``, ``load``, ``verify`` or
``read`` changes them for one call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import InvalidArgument, LimitExceeded

ENV_DECODED_BYTES = "COMPEFT_MAX_DECODED_BYTES"
ENV_ENTRIES = "COMPEFT_MAX_ENTRIES"

DEFAULT_ENTRIES = 100_000
#: The decoding budget when the machine's memory cannot be read.
FALLBACK_DECODED_BYTES = 8 << 30
#: JSON objects a manifest may hold per entry: a group is itself, its ``streams``, up to four
#: stream objects and its ``params``; informative members add a few more.
OBJECTS_PER_ENTRY = 8
OBJECTS_SLACK = 10_000


def physical_memory() -> int:
    """Physical memory of this machine in bytes (0 when unknown)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        raise InvalidArgument(f"{name}={text!r} is not an integer") from None
    if value <= 0:
        raise InvalidArgument(f"{name} must be positive, not {value}")
    return value


@dataclass(frozen=True)
class Budget:
    """What one reader may spend on one file.

    Attributes:
        decoded_bytes: the most bytes one decode may hold at once: a group's stored and unframed
            streams, its decoded outputs and the positions decoding works through.
        entries: the most tensors plus groups a manifest may list.
    """

    decoded_bytes: int
    entries: int = DEFAULT_ENTRIES

    def __post_init__(self) -> None:
        for name in ("decoded_bytes", "entries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidArgument(f"Budget.{name} must be a positive integer, not {v!r}")

    @classmethod
    def default(cls) -> Budget:
        """Half this machine's memory and 100,000 entries, unless the environment says otherwise."""
        memory = physical_memory()
        return cls(decoded_bytes=_env_int(ENV_DECODED_BYTES, memory // 2 if memory else FALLBACK_DECODED_BYTES),
                   entries=_env_int(ENV_ENTRIES, DEFAULT_ENTRIES))

    @property
    def json_objects(self) -> int:
        """The most JSON objects a manifest (or a file header) within this budget can hold."""
        return self.entries * OBJECTS_PER_ENTRY + OBJECTS_SLACK

    def check_entries(self, count: int, what: str) -> None:
        if count > self.entries:
            raise LimitExceeded(f"{what}: {count:,} entries, over this reader's budget of {self.entries:,} "
                                f"(set {ENV_ENTRIES} to allow more)")

    def check_bytes(self, need: int, what: str) -> None:
        if need > self.decoded_bytes:
            raise LimitExceeded(f"{what} needs {need:,} bytes, over this reader's budget of {self.decoded_bytes:,} "
                                f"(set {ENV_DECODED_BYTES} to allow more)")


def resolve(budget: Budget | None) -> Budget:
    return Budget.default() if budget is None else budget


__all__ = ["Budget", "physical_memory", "resolve", "ENV_DECODED_BYTES", "ENV_ENTRIES"]
