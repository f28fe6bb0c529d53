"""Writing files whole or not at all, and hashing them: shared by the compeft writer, the PEFT
folder writer, ``pull`` and the Hub server."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import CompeftError, FileNotFound, IOFailure

PathLike = str | os.PathLike[str]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[str], object], *, mode: int | None = None) -> None:
    """Call ``write(tmp_path)``, then move the finished file into place: the temporary file is
    flushed to disk, takes the permissions ``mode`` (default: what the umask gives a new file) and
    replaces ``path`` in one rename. A failure leaves neither a partial file nor the temporary one.

    Raises:
        FileNotFound: the folder of ``path`` does not exist.
        IOFailure: the operating system refused a step (``write``'s own errors pass through).
    """
    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFound(f"output folder does not exist: {parent}", path=str(parent))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
    except OSError as e:
        raise IOFailure(f"cannot write into {parent}: {e.strerror or e}", path=str(parent)) from None
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)  # temporary files are created 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, CompeftError):
            raise IOFailure(f"cannot write {dest}: {e.strerror or e}", path=str(dest)) from None
        raise
    try:
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename has happened


def atomic_write_bytes(path: PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` with ``atomic_write``."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), mode=mode)


def sha256_of_file(f: IO[bytes], size: int | None = None, chunk: int = 1 << 20) -> str:
    """sha256 of an open binary file from its current position: ``size`` bytes, or to the end."""
    h = hashlib.sha256()
    while size is None or size > 0:
        block = f.read(chunk if size is None else min(chunk, size))
        if not block:
            break
        h.update(block)
        if size is not None:
            size -= len(block)
    return h.hexdigest()


def file_sha256(path: PathLike) -> str:
    """sha256 of a whole file.

    Raises:
        FileNotFound, IOFailure.
    """
    try:
        with open(path, "rb") as f:
            return sha256_of_file(f)
    except FileNotFoundError:
        raise FileNotFound(f"no such file: {path}", path=str(path)) from None
    except OSError as e:
        raise IOFailure(f"cannot read {path}: {e.strerror or e}", path=str(path)) from None
