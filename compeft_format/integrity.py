"""Digests (spec section 7): of streams, of the manifest, of decoded tensors. Fingerprints of
base models are in ``binding``."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import torch


def sha256_hex(data: bytes | bytearray | memoryview | np.ndarray) -> str:
    """sha256 of a bytes-like object (bytes, memoryview, a contiguous numpy array)."""
    return hashlib.sha256(data.data if isinstance(data, np.ndarray) else data).hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's elements as hashed here: C order, little-endian, in its own dtype (on the CPU)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's elements: C order, little-endian, in the tensor's own dtype."""
    return hashlib.sha256(tensor_bytes(t) if t.numel() else b"").hexdigest()


def group_sha256(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 of several decoded tensors, each as ``tensor_sha256`` hashes it, one after another
    (an iterator is consumed one tensor at a time)."""
    h = hashlib.sha256()
    for t in tensors:
        if t.numel():
            h.update(tensor_bytes(t))
    return h.hexdigest()
