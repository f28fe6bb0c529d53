"""Writing files whole or not at all, and hashing them: shared by the compeft writer, the PEFT
folder writer, ``pull`` and the Hub server.

A write goes to a file in a hidden temporary folder beside its destination, the folder named for
the destination, this host and the writer's process id (``.<name>.<host>-<pid>.<random>.tmp``).
The folder also catches what the write function itself puts beside its output (safetensors writes
through a ``.tmpXXXXXX`` file of its own). A writer killed before its rename leaves that folder
behind; the next write to the same destination removes it once the process named in it is no
longer running on this host. Temporary folders of live writers, of other hosts and of other
programs are never touched.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import CompeftError, FileNotFound, InvalidArgument, IOFailure

PathLike = str | os.PathLike[str]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: a destination's name as temporary names carry it (the whole name could pass the 255-byte limit)
_NAME_CHARS = 64
#: what follows ``.<name>.`` in a temporary name: host tag, writer's pid, mkdtemp's random part
_TEMP_TAIL = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})\.[A-Za-z0-9_]{8}\.tmp")


@functools.cache
def _host_tag() -> str:
    """Eight hex digits naming this host (a folder may be shared with other machines)."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _temp_prefix(dest: Path) -> str:
    return f".{dest.name[:_NAME_CHARS]}."


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host; True when that cannot be told (so its files stay)."""
    if os.name != "posix" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it runs under another user
        return True
    try:  # a zombie has exited and writes nothing more
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:][:1] != "Z"
    except (OSError, ValueError):
        return True


def _remove(entry: os.DirEntry[str]) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path)
    else:
        os.unlink(entry.path)


def remove_stale_temp_files(path: PathLike) -> list[str]:
    """Remove the temporary folders (and files, as earlier versions named them) that writers of
    ``path`` on this host left when they died before their rename; return their names. Those of
    running writers stay."""
    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    prefix, host = _temp_prefix(dest), _host_tag()
    removed: list[str] = []
    try:
        with os.scandir(parent) as it:
            entries = [e for e in it if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_TAIL.fullmatch(entry.name[len(prefix):])
        if m is None or m["host"] != host or _process_alive(int(m["pid"])):
            continue
        try:
            _remove(entry)
            removed.append(entry.name)
        except OSError:
            pass  # another writer removed it first, or the folder is read-only
    return removed


def atomic_write(path: PathLike, write: Callable[[str], object], *, mode: int | None = None,
                 sweep: bool = True) -> None:
    """Call ``write(tmp_path)``, then move the finished file into place: the temporary file (in a
    temporary folder of its own beside ``path``) is flushed to disk, takes the permissions ``mode``
    (default: what the umask gives a new file) and replaces ``path`` in one rename. A failure leaves
    neither a partial file nor the temporary folder; temporary folders of earlier writers of
    ``path`` that were killed are removed after the rename (``sweep``: that costs a listing of the
    folder, which a caller that sweeps the folder itself, such as the Hub server at its start,
    skips).

    Raises:
        FileNotFound: the folder of ``path`` does not exist.
        IOFailure: the operating system refused a step (``write``'s own errors pass through).
    """
    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFound(f"output folder does not exist: {parent}", path=str(parent))
    folder = str(_temp_folder_beside(dest))
    # hidden and ending in .tmp like the folder, for sweepers that look for such files
    tmp = os.path.join(folder, f"{_temp_prefix(dest)}tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as e:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, CompeftError):
            raise IOFailure(f"cannot write {dest}: {e.strerror or e}", path=str(dest)) from None
        raise
    shutil.rmtree(folder, ignore_errors=True)  # empty unless ``write`` left files of its own
    if sweep:
        remove_stale_temp_files(dest)
    _fsync_folder(parent)


def _temp_folder_beside(dest: Path) -> Path:
    """A new private folder beside ``dest``, named so that ``remove_stale_temp_files`` removes it
    once its writer has died."""
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        return Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(dest)}{_host_tag()}-{os.getpid()}.", suffix=".tmp",
                                     dir=parent))
    except OSError as e:
        raise IOFailure(f"cannot write into {parent}: {e.strerror or e}", path=str(parent)) from None


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some file systems cannot sync a folder


def atomic_folder(path: PathLike, fill: Callable[[Path], object], *, replace: bool = True) -> None:
    """Build a folder by calling ``fill(tmp)`` on an empty temporary folder beside ``path``, then
    move it into place: its files and itself take the permissions the umask gives new ones and are
    flushed to disk, and one rename publishes it. An existing ``path`` is replaced (``replace``;
    it is moved aside first, so ``path`` is briefly absent, never half written) unless it is an
    empty folder, which is always replaced. A failure leaves no temporary folder, and those of
    earlier writers of ``path`` that were killed are removed first.

    Raises:
        FileNotFound: the folder of ``path`` does not exist.
        InvalidArgument: ``path`` exists, is not an empty folder, and ``replace`` is false.
        IOFailure: the operating system refused a step (``fill``'s own errors pass through).
    """
    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFound(f"output folder does not exist: {parent}", path=str(parent))
    remove_stale_temp_files(dest)
    tmp = _temp_folder_beside(dest)
    try:
        fill(tmp)
        mask = _umask()
        for f in tmp.iterdir():  # the folder's own files take the umask's permissions
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)
        for root, _, files in os.walk(tmp):  # everything in it reaches the disk before the rename
            for name in files:
                with open(os.path.join(root, name), "rb+") as fh:
                    os.fsync(fh.fileno())
            _fsync_folder(Path(root))
        os.chmod(tmp, 0o777 & ~mask)
        aside: Path | None = None
        if dest.exists() or dest.is_symlink():
            if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
                dest.rmdir()
            elif not replace:
                raise InvalidArgument(f"{dest} exists and is not an empty folder", path=str(dest))
            else:
                aside = _temp_folder_beside(dest)
                aside.rmdir()
                os.rename(dest, aside)
        try:
            os.rename(tmp, dest)
        except BaseException:
            if aside is not None and not dest.exists():
                os.rename(aside, dest)  # the old folder goes back
            raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, CompeftError):
            raise IOFailure(f"cannot write {dest}: {e.strerror or e}", path=str(dest)) from None
        raise
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink()
    _fsync_folder(parent)


def atomic_write_bytes(path: PathLike, data: bytes, *, mode: int | None = None, sweep: bool = True) -> None:
    """Write ``data`` to ``path`` with ``atomic_write``."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), mode=mode, sweep=sweep)


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
