"""Bit-plane packing (spec section 4.1): element i is bit ``i % 8`` of byte ``i // 8`` (LSB first);
padding bits of the last byte are zero."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import StreamCorrupt

_SHIFTS = {}


def pack_bits(mask: np.ndarray) -> bytes:
    """Pack a boolean vector into bytes, LSB first, zero padding."""
    return np.packbits(np.ascontiguousarray(mask, dtype=bool), bitorder="little").tobytes()


def unpack_bits(buf: torch.Tensor, count: int) -> torch.Tensor:
    """Unpack ``count`` bits from a uint8 tensor on any device into a bool tensor there.

    Raises StreamCorrupt when the byte length is wrong or padding bits are set.
    """
    nbytes = (count + 7) // 8
    if buf.numel() != nbytes:
        raise StreamCorrupt(f"bit stream has {buf.numel()} bytes, {count} bits need {nbytes}")
    if count % 8 and int(buf[-1]) >> (count % 8):
        raise StreamCorrupt("padding bits of a bit stream are not zero")
    key = buf.device
    shifts = _SHIFTS.get(key)
    if shifts is None:
        shifts = _SHIFTS[key] = torch.arange(8, dtype=torch.uint8, device=buf.device)
    bits = (buf.unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)
    return bits[:count].view(torch.bool)
