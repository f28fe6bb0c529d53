"""The optional C decoders (``compeft_format._native``, built from ``_native.c`` at install).

On the CPU, ternary groups and Golomb positions are decoded in one pass by the extension; on
other devices, or when it is not built, or with ``COMPEFT_NATIVE=0`` in the environment, the
codecs use torch operations. Both paths accept and refuse the same streams (tests compare them).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..errors import StreamCorrupt

try:
    from .. import _native as _ext  # type: ignore[attr-defined,unused-ignore]
except ImportError:  # not built: the torch path decodes
    _ext = None

#: spare bytes the Golomb decoders need after the unary stream (1 bits: a decoder that runs past
#: the stream's codes finds one there, and reports the stream short) and after the remainder and
#: extra-bit streams (read whole 64-bit words at a time)
UNARY_PAD = np.full(16, 0xFF, dtype=np.uint8)
PAD = np.zeros(8, dtype=np.uint8)

#: integer dtype of each element size, to hand outputs to the extension as plain buffers
INT_OF_SIZE = {2: torch.int16, 4: torch.int32}


def built() -> bool:
    """True when the extension is importable."""
    return _ext is not None


def isas() -> list[str]:
    """Instruction sets the extension can decode with on this CPU, narrowest first (all decode
    the same; the widest is used unless ``use_isa`` says otherwise)."""
    if _ext is None:
        return []
    current, found = _ext.isa(), []
    for name in _ext.ISAS:
        try:
            _ext.isa(name)
            found.append(name)
        except ValueError:
            pass
    _ext.isa(current)
    return found


def isa() -> str | None:
    """The instruction set the extension decodes with now; None when it is not built."""
    return None if _ext is None else _ext.isa()


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Decode with instruction set ``name`` (one of ``isas()``) inside the block."""
    if _ext is None:
        raise RuntimeError("compeft_format._native is not built")
    previous = _ext.isa()
    _ext.isa(name)
    try:
        yield
    finally:
        _ext.isa(previous)


def module(device: torch.device) -> ModuleType | None:
    """The extension when it should decode on ``device``, else None."""
    if _ext is None or device.type != "cpu" or os.environ.get("COMPEFT_NATIVE", "1") == "0":
        return None
    return _ext


def member_arrays(members: Sequence[Any], params: Sequence[int] | None = None) -> tuple[np.ndarray, ...]:
    numel = np.array([m.numel for m in members], dtype=np.int64)
    nnz = np.array([m.nnz for m in members], dtype=np.int64)
    if params is None:
        return numel, nnz
    return numel, nnz, np.asarray(params, dtype=np.int64)


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Run an extension function, reporting a stream defect as StreamCorrupt."""
    try:
        return fn(*args)
    except ValueError as e:
        raise StreamCorrupt(str(e)) from None


def as_buffer(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor of 2- or 4-byte elements (bfloat16 included) as a numpy array sharing its
    memory."""
    return t.view(INT_OF_SIZE[t.element_size()]).numpy()
