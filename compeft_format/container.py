"""The safetensors container (spec section 2.1): the header, checked in full before any tensor
data is read, and an open file whose tensors are read by their byte ranges.

Nothing here knows what the tensors hold: the reader matches them with the manifest's streams,
``binding`` reads checkpoints through the same header checks.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import threading
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import constants as C
from .errors import FileNotFound, InputError, IOFailure, LimitExceeded, NotSafetensors, TruncatedFile
from .fileio import sha256_of_file
from .jsonfields import loads

PathLike = str | os.PathLike[str]

_ST_ITEMSIZE = {"U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2,
                "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def _scalar_text(s: str) -> bool:
    """True when ``s`` is a sequence of Unicode scalar values (no lone surrogate from a JSON
    escape, which the safetensors library refuses as well)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_header(f: IO[bytes], size: int, where: str,
                  max_objects: int | None = None) -> tuple[dict[str, Any], dict[str, str], int]:
    head = f.read(8)
    if len(head) < 8:
        raise TruncatedFile(f"file is {size} bytes, shorter than the 8-byte header length", path=where)
    (n,) = struct.unpack("<Q", head)
    if n > C.MAX_HEADER_BYTES:
        raise NotSafetensors(f"header length {n} is over the {C.MAX_HEADER_BYTES}-byte limit", path=where)
    if n > size - 8:
        raise TruncatedFile(f"header of {n} bytes does not fit in a {size}-byte file", path=where)
    raw = f.read(n)
    if len(raw) != n:
        raise TruncatedFile(f"file ended inside its {n}-byte header", path=where)
    try:
        text = raw.decode("utf-8")
        header = json.loads(text) if max_objects is None else loads(text, max_objects=max_objects, what="header")
    except LimitExceeded as exc:
        raise LimitExceeded(str(exc), path=where) from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise NotSafetensors("header is not UTF-8 JSON", path=where) from None
    if not isinstance(header, dict):
        raise NotSafetensors("header is not a JSON object", path=where)
    meta = header.pop(C.SAFETENSORS_METADATA, None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise NotSafetensors("__metadata__ must map strings to strings", path=where)
    if not all(_scalar_text(k) and _scalar_text(v) for k, v in meta.items()):
        raise NotSafetensors("__metadata__ holds a string that is not valid Unicode (a lone surrogate)", path=where)
    spans = []
    for name, e in header.items():
        if not _scalar_text(name):
            raise NotSafetensors(f"tensor name {ascii(name)} is not valid Unicode (a lone surrogate)", path=where)
        if not isinstance(e, dict) or not isinstance(e.get("dtype"), str):
            raise NotSafetensors(f"tensor {name!r} has no dtype", path=where)
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise NotSafetensors(f"tensor {name!r} has a bad shape", path=where)
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise NotSafetensors(f"tensor {name!r} has bad data_offsets", path=where)
        item = _ST_ITEMSIZE.get(e["dtype"])
        if item is None:
            raise NotSafetensors(f"tensor {name!r} has unknown dtype {e['dtype']!r}", path=where)
        if offs[1] - offs[0] != math.prod(shape) * item:
            raise NotSafetensors(f"tensor {name!r}: data_offsets disagree with shape and dtype", path=where)
        spans.append((offs[0], offs[1], name))
    spans.sort()
    end = 0
    for a, b, name in spans:
        if a != end:
            raise NotSafetensors(f"tensor {name!r} data is not contiguous with the previous tensor", path=where)
        end = b
    data_start = 8 + n
    available = size - data_start
    if end > available:
        raise TruncatedFile(f"tensors need {end} data bytes, the file has {available}", path=where)
    if end < available:
        raise NotSafetensors(f"{available - end} bytes follow the last tensor", path=where)
    return header, meta, data_start


def _folder_hint(folder: Path) -> str:
    """What to say of a folder given where a compeft file was wanted: that its
    ``adapter_model.safetensors`` is a compeft file, which peft cannot load, when it is one, or
    that it is a PEFT folder."""
    inner = folder / "adapter_model.safetensors"
    try:
        if not inner.is_file() or read_safetensors_header(inner)[1].get(C.META_FORMAT) != C.FORMAT_NAME:
            peft = (folder / "adapter_config.json").is_file()
            return "; it is a PEFT adapter folder, which `compeft compress` compresses" if peft else ""
    except (OSError, InputError, NotSafetensors, TruncatedFile, LimitExceeded):
        return ""
    return (f"; its {inner.name} is a compeft file, which peft cannot load (it would run as the base model): "
            f"rename it to NAME.cpeft.safetensors and give that file")


def open_regular(path: PathLike) -> tuple[IO[bytes], int]:
    """Open a regular file for reading and return it with its size. A folder, a FIFO, a device or
    a socket is refused (``InputError``) without reading from it: the file is opened
    non-blocking, so a FIFO with no writer cannot stall the caller, and checked with ``fstat``
    on the open descriptor, so it cannot be swapped after the check.

    Raises:
        FileNotFound, InputError, IOFailure.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFound(f"no such file: {p}", path=str(p)) from None
    except IsADirectoryError:
        raise InputError(f"{p} is a directory, not a file{_folder_hint(p)}", path=str(p)) from None
    except OSError as e:
        raise IOFailure(f"cannot read {p}: {e.strerror or e}", path=str(p)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = f"a directory{_folder_hint(p)}" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise InputError(f"{p} is {kind}", path=str(p))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except OSError as e:
        os.close(fd)
        raise IOFailure(f"cannot read {p}: {e.strerror or e}", path=str(p)) from None
    except BaseException:
        os.close(fd)
        raise



def read_safetensors_header(path: PathLike) -> tuple[dict[str, Any], dict[str, str], int]:
    """Parse and check a safetensors header (spec 2.1) without reading tensor data.

    Returns (tensor entries, ``__metadata__``, byte offset of the data section).

    Raises:
        FileNotFound, InputError (a folder), IOFailure, TruncatedFile, NotSafetensors.
    """
    f, size = open_regular(path)
    with f:
        try:
            return _parse_header(f, size, str(path))
        except OSError as e:
            raise IOFailure(f"cannot read {path}: {e.strerror or e}", path=str(path)) from None


class ContainerFile:
    """An open safetensors file: the header checked on open (``max_objects`` bounds the JSON
    objects it may hold), tensors read by their byte ranges through one file handle. Reads are
    never memory-mapped (a file truncated by someone else while it is open gives a typed error,
    not a crash) and may come from several threads at once. After ``close`` the file is opened
    again on the next read, and refused if its size changed."""

    def __init__(self, path: PathLike, *, max_objects: int | None = None) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        f, self.size = open_regular(path)
        try:
            self.header, self.metadata, self.data_start = _parse_header(f, self.size, str(path), max_objects)
        except BaseException:
            f.close()
            raise
        self._f: IO[bytes] | None = f

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None

    def _handle(self) -> IO[bytes]:
        """The open handle (the caller holds the lock), opened again after ``close``."""
        if self._f is None:
            f, size = open_regular(self.path)
            if size != self.size:
                f.close()
                raise TruncatedFile(f"{self.path} changed size since it was opened", path=str(self.path))
            self._f = f
        return self._f

    def read_tensor_bytes(self, name: str) -> np.ndarray:
        """The bytes of one tensor of the header, as a uint8 array."""
        begin, end = self.header[name]["data_offsets"]
        n = end - begin
        out = np.empty(n, dtype=np.uint8)
        if n:
            with self._lock:
                f = self._handle()
                try:
                    f.seek(self.data_start + begin)
                    got = f.readinto(out.data)  # type: ignore[attr-defined]
                except OSError as e:
                    raise IOFailure(f"cannot read {self.path}: {e.strerror or e}", path=str(self.path)) from None
            if got != n:
                raise TruncatedFile(f"{self.path} ended while reading tensor {name!r}", path=str(self.path))
        return out

    def sha256(self) -> str:
        """sha256 of the whole file as it is now, read through the open handle."""
        with self._lock:
            f = self._handle()
            try:
                f.seek(0)
                return sha256_of_file(f)
            except OSError as e:
                raise IOFailure(f"cannot read {self.path}: {e.strerror or e}", path=str(self.path)) from None


__all__ = ["ContainerFile", "open_regular", "read_safetensors_header"]
