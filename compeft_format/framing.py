"""Stream framing (spec section 4.5): ``none`` stores the raw bytes; ``zstd`` stores exactly one
zstd frame whose header declares the content size, equal to the manifest's ``raw_size``."""

from __future__ import annotations

import numpy as np
import zstandard

from . import constants as C
from .errors import StreamCorrupt, UnknownEncoding

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

#: what a stream can be held in
Bytes = bytes | bytearray | memoryview | np.ndarray


def frame(raw: bytes, compression: str, level: int = C.DEFAULT_ZSTD_LEVEL,
          dictionary: zstandard.ZstdCompressionDict | None = None) -> bytes:
    """Store ``raw`` under ``compression`` (zstd with a raw-content ``dictionary`` for the
    manifest encoding that has one; its frames carry no dictionary ID)."""
    if compression == C.COMP_NONE:
        return raw
    if compression == C.COMP_ZSTD:
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False,
                                        dict_data=dictionary, write_dict_id=False)
        return cctx.compress(raw)
    raise UnknownEncoding(f"unknown stream compression {compression!r}")


#: Streams at least this long are first compressed at level 1; when that saves under 1/64 of the
#: bytes the stream is stored raw without trying the (much slower) requested level.
PROBE_BYTES = 1 << 14


def smallest_frame(raw: bytes, level: int | None = C.DEFAULT_ZSTD_LEVEL) -> tuple[str, bytes]:
    """zstd when it saves bytes, otherwise the raw bytes; ``level=None`` always stores raw.
    Entropy-coded streams (Golomb codes, signs) do not shrink, and are recognised by a fast probe."""
    if level is None:
        return C.COMP_NONE, raw
    if len(raw) >= PROBE_BYTES and level > 1:
        probe = frame(raw, C.COMP_ZSTD, 1)
        if len(probe) > len(raw) - len(raw) // 64:
            return C.COMP_NONE, raw
    z = frame(raw, C.COMP_ZSTD, level)
    return (C.COMP_ZSTD, z) if len(z) < len(raw) else (C.COMP_NONE, raw)


def unframe(stored: Bytes, compression: str, raw_size: int,
            dictionary: zstandard.ZstdCompressionDict | None = None) -> Bytes:
    """Recover the raw bytes of a stream, refusing anything that would exceed ``raw_size``.

    The frame header's content size is checked before any output is allocated, so a stream that
    claims more than the manifest declares is refused without decompressing it. ``dictionary``
    (the manifest's, spec 2.4) is the only dictionary a frame may use, and frames never name one.
    """
    if compression == C.COMP_NONE:
        if len(stored) != raw_size:
            raise StreamCorrupt(f"stream holds {len(stored)} bytes, manifest declares {raw_size}")
        return stored
    if compression != C.COMP_ZSTD:
        raise UnknownEncoding(f"unknown stream compression {compression!r}")
    if isinstance(stored, np.ndarray):
        stored = stored.data
    if bytes(stored[:4]) != ZSTD_MAGIC:  # also refuses skippable frames (spec 4.5)
        raise StreamCorrupt("stream does not start with a zstd frame")
    try:
        params = zstandard.get_frame_parameters(stored)
    except zstandard.ZstdError as e:
        raise StreamCorrupt(f"not a zstd frame: {e}") from None
    if params.dict_id:
        raise StreamCorrupt("zstd frames that need a dictionary are not allowed")
    if params.content_size != raw_size:
        raise StreamCorrupt(
            f"zstd frame declares {params.content_size} bytes, manifest declares {raw_size}"
        )
    try:
        out = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(
            stored, max_output_size=raw_size, allow_extra_data=False
        )
    except zstandard.ZstdError as e:
        raise StreamCorrupt(f"zstd frame does not decode: {e}") from None
    if len(out) != raw_size:
        raise StreamCorrupt(f"zstd frame decoded to {len(out)} bytes, expected {raw_size}")
    return out
