"""Moving packed stream bytes to the device that decodes them. Only packed bytes cross; the dense
tensors are built on the device."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def as_tensor(buf: np.ndarray | bytes | bytearray | memoryview) -> torch.Tensor:
    """A uint8 tensor over ``buf`` (no copy)."""
    if len(buf) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffers are never written to
        return torch.frombuffer(buf, dtype=torch.uint8)


def to_device(packed: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """``packed`` on ``device``: through pinned host memory with a non-blocking copy for CUDA, as
    it is for the CPU."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return packed
    if dev.type == "cuda":
        return packed.pin_memory().to(dev, non_blocking=True)
    return packed.to(dev)
