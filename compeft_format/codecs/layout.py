"""Where each member of a group sits in the group's concatenated element and entry sequences."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def element_offsets(numels: Sequence[int]) -> np.ndarray:
    """Start of each member in the concatenated elements, plus the total at the end."""
    out = np.zeros(len(numels) + 1, dtype=np.int64)
    np.cumsum(np.asarray(numels, dtype=np.int64), out=out[1:])
    return out


def positions_bitmap(numels: Sequence[int], indices: Sequence[np.ndarray]) -> np.ndarray:
    """Boolean vector over the group's elements, True where a member keeps an entry."""
    offs = element_offsets(numels)
    mask = np.zeros(int(offs[-1]), dtype=bool)
    if indices:
        flat = np.concatenate([np.asarray(ix, dtype=np.int64) + o for ix, o in zip(indices, offs[:-1], strict=True)])
        mask[flat] = True
    return mask
