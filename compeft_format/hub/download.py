"""Downloads from a Hub that may be hostile.

Nothing the server sends becomes part of a path on disk: a commit id is used only after it is
checked to be 40 hex digits, file names come from the checked index (``index.safe_path``) and
temporary names are made here. Response bodies are streamed with a cap (the index's declared size
for artifacts, ``MAX_INDEX_BYTES`` for the index), hashed while they arrive and moved into the
cache only after their sha256 and size are checked; error bodies are never read. The only files
removed are the temporary files this process created.

The cache (``cache_dir``, else ``$HF_HOME/compeft``) is laid out per endpoint and repository::

    <root>/<endpoint digest>/<namespace>--<name>/refs/<revision digest>     the commit, as text
    <root>/<endpoint digest>/<namespace>--<name>/snapshots/<commit>/<path>  verified files

With ``HF_HUB_OFFLINE`` set, revisions resolve through ``refs`` and files are read from the
snapshot, still checked against the cached index.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .. import fileio
from ..errors import (
    ArtifactDigestMismatch,
    HubAuthError,
    HubEntryNotFound,
    HubError,
    HubRepoNotFound,
    HubRevisionNotFound,
    HubUnreachable,
    InvalidArgument,
    IOFailure,
)
from ..fileio import atomic_write_bytes, file_sha256
from .paths import printable

#: Largest index accepted (bytes).
MAX_INDEX_BYTES = 16 << 20
#: Longest server message quoted in an error.
MAX_MESSAGE = 200
CHUNK = 1 << 20
COMMIT = re.compile(r"[0-9a-f]{40}")
#: One part of a repository id, as the Hub allows them.
REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_model_id(ref: str, *, namespace: bool = False) -> bool:
    """``namespace/name`` (or, unless ``namespace`` is required, a bare ``name``), each part as the
    Hub allows (no ``..``, no path characters)."""
    parts = ref.split("/")
    return len(parts) in ((2,) if namespace else (1, 2)) and all(REPO_PART.fullmatch(p) and ".." not in p
                                                                   for p in parts)


def check_repo_id(repo_id: str) -> None:
    """``namespace/name``, each part as the Hub allows (no ``..``, no path characters)."""
    if not is_model_id(repo_id, namespace=True):
        raise InvalidArgument(f"repository must be namespace/name (letters, digits, '.', '_', '-'), got {repo_id!r}")


def default_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "compeft"


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@dataclass
class Fetched:
    """A body downloaded into a temporary file: its path, sha256, size and the commit the server named."""

    path: Path
    sha256: str
    size: int
    commit: str | None


class HubCache:
    """The verified files of one endpoint's repositories."""

    def __init__(self, root: str | os.PathLike[str] | None, endpoint: str):
        self.root = (Path(root) if root is not None else default_cache()) / hashlib.sha256(
            endpoint.rstrip("/").encode()).hexdigest()[:16]

    def repo(self, repo_id: str) -> Path:
        check_repo_id(repo_id)
        return self.root / repo_id.replace("/", "--")

    def ref(self, repo_id: str, revision: str) -> Path:
        return self.repo(repo_id) / "refs" / hashlib.sha256(revision.encode()).hexdigest()[:32]

    def snapshot(self, repo_id: str, commit: str) -> Path:
        if COMMIT.fullmatch(commit) is None:
            raise InvalidArgument(f"not a commit id: {commit!r}")
        return self.repo(repo_id) / "snapshots" / commit

    def cached_commit(self, repo_id: str, revision: str) -> str | None:
        """The commit ``revision`` resolved to when last online (a commit id resolves to itself)."""
        if COMMIT.fullmatch(revision):
            return revision
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = self.ref(repo_id, revision).read_text().strip()
            if COMMIT.fullmatch(text):
                return text
        return None

    def remember(self, repo_id: str, revision: str, commit: str) -> None:
        if revision != commit:
            put_bytes(self.ref(repo_id, revision), commit.encode())


def put_bytes(path: Path, data: bytes) -> None:
    """Write a file of the cache atomically (``fileio.atomic_write_bytes``), creating its folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IOFailure(f"{path.parent}: cannot write the cache: {e.strerror or e}") from None
    atomic_write_bytes(path, data)


def install(fetched: Fetched, dest: Path) -> Path:
    """Move a checked download to its place in the cache."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(fetched.path, dest)
    except OSError as e:
        discard(fetched.path)
        raise IOFailure(f"{dest}: cannot write the cache: {e.strerror or e}") from None
    return dest


def cached_file(path: Path, sha256: str, size: int) -> bool:
    """``path`` is a regular file of the cache with this size and sha256."""
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_size == size and file_sha256(path) == sha256
    except OSError:
        return False


def _temp_name(dest: Path) -> Path:
    """A download's temporary file beside ``dest``, named as ``fileio.atomic_write`` names its
    folders (``.<name>.<host>-<pid>.<random>.tmp``), so that the next download of ``dest`` removes
    what a killed one left (``fileio.remove_stale_temp_files``)."""
    return dest.parent / f".{dest.name[:64]}.{fileio._host_tag()}-{os.getpid()}.{secrets.token_hex(4)}.tmp"


def discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink()


def _raise_for_status(response: Any, what: str, repo_id: str, revision: str | None) -> None:
    """Typed errors from the status and the Hub's ``X-Error-Code``; the body is not read."""
    status = response.status_code
    if status < 400:
        return
    code = response.headers.get("X-Error-Code", "")
    msg = printable(response.headers.get("X-Error-Message"), MAX_MESSAGE)
    ctx: dict[str, Any] = {"repo_id": repo_id, "revision": revision, "status": status}
    detail = f" ({msg})" if msg else ""
    if code == "RepoNotFound":
        raise HubRepoNotFound(f"{what}: repository not found (or not visible with this token)", **ctx)
    if code == "RevisionNotFound":
        raise HubRevisionNotFound(f"{what}: revision not found", **ctx)
    if code == "EntryNotFound" or status == 404:
        raise HubEntryNotFound(f"{what}: file not found", **ctx)
    if status in (401, 403) or code == "GatedRepo":
        raise HubAuthError(f"{what}: the Hub refused the token (HTTP {status}){detail}", **ctx)
    raise HubError(f"{what}: HTTP {status}{detail}", **ctx)


@contextlib.contextmanager
def transport_errors(what: str, repo_id: str, revision: str | None) -> Iterator[None]:
    """The HTTP library's connection, timeout and protocol errors as ``HubUnreachable``."""
    try:
        yield
    except HubError:
        raise
    except Exception as e:
        if type(e).__module__.split(".")[0].startswith("httpx") or isinstance(e, ConnectionError | TimeoutError):
            raise HubUnreachable(f"{what}: {printable(e, MAX_MESSAGE) or type(e).__name__}", repo_id=repo_id,
                                 revision=revision) from None
        raise


def fetch(url: str, dest: Path, *, max_bytes: int, token: str | None, what: str, repo_id: str,
          revision: str | None) -> Fetched:
    """GET ``url`` into a temporary file beside ``dest``, at most ``max_bytes`` bytes."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    tmp = _temp_name(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fileio.remove_stale_temp_files(dest)
        fh = open(tmp, "xb")  # noqa: SIM115 - closed below, removed on any failure
    except OSError as e:
        raise IOFailure(f"{dest.parent}: cannot write the cache: {e.strerror or e}") from None
    try:
        with fh, transport_errors(what, repo_id, revision):
            h, n = hashlib.sha256(), 0
            with get_session().stream("GET", url, headers=build_hf_headers(token=token), follow_redirects=True,
                                      timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
                _raise_for_status(r, what, repo_id, revision)
                commit = r.headers.get("X-Repo-Commit")
                for chunk in r.iter_bytes(CHUNK):
                    n += len(chunk)
                    if n > max_bytes:
                        raise ArtifactDigestMismatch(f"{what}: the Hub sent more than the {max_bytes:,} bytes "
                                                     "expected", subject=what, size=n, expected_size=max_bytes)
                    h.update(chunk)
                    try:
                        fh.write(chunk)
                    except OSError as e:
                        raise IOFailure(f"{dest.parent}: cannot write the cache: {e.strerror or e}") from None
    except BaseException:
        discard(tmp)
        raise
    return Fetched(tmp, h.hexdigest(), n, commit)


def resolve_url(endpoint: str, repo_id: str, revision: str, path: str) -> str:
    """``{endpoint}/{repo}/resolve/{revision}/{path}``, every part quoted."""
    check_repo_id(repo_id)
    return (f"{endpoint.rstrip('/')}/{repo_id}/resolve/{quote(revision, safe='')}/"
            f"{quote(path, safe='/')}")


def checked_commit(value: str | None, what: str, repo_id: str, revision: str | None) -> str:
    """The server's ``X-Repo-Commit``: 40 lowercase hex digits, else ``HubError``."""
    if value is None or COMMIT.fullmatch(value) is None:
        raise HubError(f"{what}: the Hub named no valid commit (X-Repo-Commit {printable(value, MAX_MESSAGE)!r})",
                       repo_id=repo_id, revision=revision)
    return value


def endpoint_url(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


__all__ = ["HubCache", "Fetched", "fetch", "install", "cached_file", "put_bytes", "resolve_url", "checked_commit",
           "check_repo_id", "is_model_id", "endpoint_url", "offline", "default_cache", "discard", "MAX_INDEX_BYTES"]
