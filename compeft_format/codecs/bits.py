"""Bit-plane packing (spec section 4.1): element i is bit ``i % 8`` of byte ``i // 8`` (LSB first);
padding bits of the last byte are zero."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import StreamCorrupt

_SHIFTS: dict = {}
_POPCOUNT: dict = {}


def pack_bits(mask: np.ndarray) -> bytes:
    """Pack a boolean vector into bytes, LSB first, zero padding."""
    return np.packbits(np.ascontiguousarray(mask, dtype=bool), bitorder="little").tobytes()


def unpack_bits(buf: torch.Tensor, count: int) -> torch.Tensor:
    """Unpack ``count`` bits from a uint8 tensor on any device into a bool tensor there.

    Raises StreamCorrupt when the byte length is wrong or padding bits are set.
    """
    check_bit_stream(buf, count)
    return unpack_range(buf, 0, count)


def check_bit_stream(buf: torch.Tensor, count: int) -> None:
    """Raise StreamCorrupt unless ``buf`` is exactly ``count`` bits with zero padding (spec 4.1)."""
    nbytes = (count + 7) // 8
    if buf.numel() != nbytes:
        raise StreamCorrupt(f"bit stream has {buf.numel()} bytes, {count} bits need {nbytes}")
    if count % 8 and int(buf[-1]) >> (count % 8):
        raise StreamCorrupt("padding bits of a bit stream are not zero")


def unpack_range(buf: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bits ``start`` to ``stop - 1`` of a packed stream, unpacking only the bytes that hold them
    (no length or padding checks)."""
    lo, hi = start // 8, (stop + 7) // 8
    shifts = _SHIFTS.get(buf.device)
    if shifts is None:
        shifts = _SHIFTS[buf.device] = torch.arange(8, dtype=torch.uint8, device=buf.device)
    bits = (buf[lo:hi].unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)
    return bits[start - 8 * lo:stop - 8 * lo].view(torch.bool)


def popcount(buf: torch.Tensor) -> int:
    """Number of 1 bits in a uint8 tensor."""
    table = _POPCOUNT.get(buf.device)
    if table is None:
        table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device=buf.device)
        _POPCOUNT[buf.device] = table
    return int(table[buf.long()].sum()) if buf.numel() else 0
