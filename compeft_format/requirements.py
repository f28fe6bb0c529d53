"""Artifacts that must be applied before others (spec 3.6): the ``Requirement`` that names a file,
and the file that satisfies a requirement, found by its ``compeft.manifest_sha256``, which a file's
header holds: finding one among many files reads no tensor data.

Example:
    >>> req = requirement("recovery.cpeft.safetensors")       # to list in a task adapter's requires
    >>> find(req, folder="./artifacts")                        # the file whose manifest digest it names
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from . import constants as C
from .container import read_safetensors_header
from .errors import CompeftError, RequirementMissing
from .manifest import Requirement
from .reader import CompeftFile

PathLike = str | os.PathLike[str]

#: How a compeft file's name ends; the files a folder is searched through.
SUFFIX = ".cpeft.safetensors"


def requirement(path: PathLike) -> Requirement:
    """The requirement that names the compeft file at ``path``: its ``adapter.kind``, its
    manifest digest and its file name (the header and manifest are checked; no stream is read).

    Raises:
        The file errors of ``open_file``.
    """
    with CompeftFile(path) as f:
        return Requirement(kind=f.manifest.adapter.kind, manifest_sha256=f.metadata[C.META_MANIFEST_SHA256],
                           name=Path(path).name)


def manifest_digest(path: PathLike) -> str | None:
    """The ``compeft.manifest_sha256`` a file's header declares; None when it declares none.

    Raises:
        FileNotFound, InputError, IOFailure, TruncatedFile, NotSafetensors: not a readable
        safetensors file.
    """
    _, meta, _ = read_safetensors_header(path)
    if meta.get(C.META_FORMAT) != C.FORMAT_NAME:
        return None
    return meta.get(C.META_MANIFEST_SHA256)


def _quiet_digest(path: Path) -> str | None:
    """``manifest_digest`` of a file met while searching a folder: one that cannot be read is
    simply not the one searched for."""
    try:
        return manifest_digest(path)
    except CompeftError:
        return None


def find(req: Requirement, *, candidates: Sequence[PathLike] = (), folder: PathLike | None = None) -> Path:
    """The file whose manifest digest ``req`` names: among ``candidates`` (files the caller
    names, which must be readable), else in ``folder``: the file ``req.name`` when it is a plain
    file name, then every ``*.cpeft.safetensors`` file, in name order. Only headers are read; the
    file found is not verified here.

    Raises:
        RequirementMissing: no such file.
        FileNotFound, InputError, IOFailure, TruncatedFile, NotSafetensors: a candidate cannot be
            read.
    """
    for c in candidates:
        if manifest_digest(c) == req.manifest_sha256:
            return Path(c)
    places: list[str] = []
    if candidates:
        places.append(f"among the {len(candidates)} file(s) given")
    if folder is not None:
        base = Path(folder)
        places.append(f"in {base}")
        tried: set[Path] = set()
        if req.name and Path(req.name).name == req.name and req.name not in (".", ".."):
            hint = base / req.name
            tried.add(hint)
            if hint.is_file() and _quiet_digest(hint) == req.manifest_sha256:
                return hint
        for p in sorted(base.glob(f"*{SUFFIX}")):
            if p not in tried and p.is_file() and _quiet_digest(p) == req.manifest_sha256:
                return p
    raise RequirementMissing(f"the required {req.kind} artifact {req.name or ''} (manifest sha256 "
                             f"{req.manifest_sha256}) is not " + (" nor ".join(places) or "given"),
                             manifest_sha256=req.manifest_sha256, kind=req.kind, name=req.name)


__all__ = ["Requirement", "requirement", "manifest_digest", "find", "SUFFIX"]
