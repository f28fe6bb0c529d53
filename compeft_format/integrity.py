"""Digests (spec section 7): of streams, of the manifest, of decoded tensors, of a base model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import torch

from . import constants as C
from .dtypes import name_of


def sha256_hex(data) -> str:
    """sha256 of any bytes-like object (bytes, memoryview, numpy array, contiguous buffer)."""
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's elements: C order, little-endian, in the tensor's own dtype."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def group_sha256(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 of several decoded tensors, each as ``tensor_sha256`` hashes it, one after another
    (an iterator is consumed one tensor at a time)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def state_dict_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Fingerprint of a model's weights (``sha256-state-dict-v1``, spec 3.4).

    sha256 over, for each tensor in sorted name order: a JSON line
    ``{"name":..,"dtype":..,"shape":[..]}\\n`` followed by the tensor's bytes as ``tensor_sha256``
    hashes them. Renaming, reshaping, recasting or changing any weight changes it.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        try:
            dtype = name_of(t.dtype)
        except Exception:
            dtype = str(t.dtype).removeprefix("torch.")
        line = json.dumps({"name": name, "dtype": dtype, "shape": list(t.shape)}, separators=(",", ":"))
        h.update(line.encode() + b"\n")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return {"algorithm": C.FINGERPRINT_ALGORITHM, "value": h.hexdigest()}
