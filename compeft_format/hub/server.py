"""A small, self-hostable server for the part of the Hugging Face Hub HTTP API that the
``huggingface_hub`` client uses to create repositories, commit files (regular and LFS), manage
branches and tags, list and download files.

Storage under ``root``: ``blobs/<sha256>`` holds every file's content once; each repository has
``repo.json``, ``refs.json``, ``commits/<id>.json`` (the full file table of that commit) and
``objects/<sha256>``, an empty file for each blob uploaded to that repository. Every write goes to
a temporary file that is fsynced and renamed before the request is answered, so a restart loses
nothing acknowledged; temporary files a killed server left behind are removed when the next one
starts. Commits to a repository are serialised by a lock; a commit whose ``parentCommit`` is not
the head of its branch is refused, so no commit is lost.

Ownership: each token may write the repositories of its namespaces (``TokenTable``); a private
repository is visible only to those tokens and answers everyone else as a missing one does; a
commit may name an LFS object only if its bytes were uploaded to the same repository (or a commit
of it already names them), so a blob of one repository cannot be published in another by its
sha256 alone. A server started without tokens lets anyone write, and shows private repositories
to no one.

    compeft hub serve --root ./hub --port 8080 --tokens tokens.json
    HF_ENDPOINT=http://127.0.0.1:8080 HF_TOKEN=tok-alice compeft push adapter.cpeft.safetensors alice/adapter
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import FileNotFound, InvalidArgument, IOFailure
from ..fileio import atomic_write_bytes
from ..jsonfields import HEX64
from .paths import printable, valid_repo_path

REPO_TYPES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
DEFAULT_BRANCH = "main"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # namespaces and repository names
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
#: Largest JSON request body (bytes); commits carry regular files base64-encoded, LFS uploads stream.
MAX_JSON_BODY = 8 << 20
MAX_COMMIT_BODY = 256 << 20
MAX_UPLOAD = 64 << 30
CHUNK = 1 << 20
#: Suffixes answered with uploadMode "lfs" when the server runs with ``lfs=True``.
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".npz", ".zst")
#: A namespace list holding this grants every namespace.
ANY_NAMESPACE = "*"
#: Largest token file read, in bytes.
MAX_TOKEN_FILE = 1 << 20
#: A token is 1 to 1024 visible ASCII characters: it travels in an HTTP header.
_TOKEN = re.compile(r"^[\x21-\x7e]{1,1024}$")
#: ``X-Error-Code`` (and ``code`` in the JSON body) of the refusals the Hub sends without a code.
E_NAMESPACE_FORBIDDEN = "NamespaceForbidden"
E_LFS_OBJECT_NOT_IN_REPO = "LfsObjectNotInRepo"
#: Names of the temporary files the store writes: ``put_blob_stream``'s and ``fileio.atomic_write``'s.
_TEMPORARY = re.compile(r"^\..+\.(part|tmp)$")


class ApiError(Exception):
    """An HTTP error answer: status, message, and the Hub's ``X-Error-Code`` when it has one."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}
        self.headers = headers or {}


@dataclass(frozen=True)
class Grant:
    """What one token may do: write, and read when private, the repositories of ``namespaces``
    (``"*"``: of every namespace)."""

    namespaces: tuple[str, ...]

    def may_write(self, namespace: str) -> bool:
        return ANY_NAMESPACE in self.namespaces or namespace in self.namespaces

    def user(self, default: str) -> str:
        """The name whoami reports, and the namespace of a repository created without one: the
        first namespace named, else ``default``."""
        return next((n for n in self.namespaces if n != ANY_NAMESPACE), default)


#: The grant of every request to a server without tokens.
OPEN = Grant((ANY_NAMESPACE,))


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("an object names the same key twice")
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class TokenTable:
    """The tokens a server accepts, each with its ``Grant``. Only the sha256 of each token is kept,
    and a token is looked up by comparing it with every one in constant time.

    Args:
        grants: token -> the namespaces it may write (``"*"`` for all). A token is 1 to 1024
            visible ASCII characters; a namespace is ``"*"`` or a repository namespace.
        source: where the grants come from, named in errors and as their ``path``.

    Raises:
        InvalidArgument: a token or a namespace list is malformed. Messages name a token by its
            position, never by its value.

    Example:
        >>> table = TokenTable({"tok-alice": ["alice", "team"], "tok-admin": ["*"]})
        >>> table.grant("Bearer tok-alice").may_write("team")
        True
    """

    def __init__(self, grants: Mapping[str, Iterable[str]] | None = None, *, source: str | None = None) -> None:
        self._grants: dict[bytes, Grant] = {}
        for i, (token, namespaces) in enumerate((grants or {}).items(), 1):
            self._add(token, namespaces, f"{source or 'tokens'}: token #{i}", source)

    def _add(self, token: Any, namespaces: Any, where: str, source: str | None) -> None:
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise InvalidArgument(f"{where} must be 1 to 1024 visible ASCII characters (no spaces)", path=source)
        if not isinstance(namespaces, (list, tuple)) or not namespaces:
            raise InvalidArgument(f"{where}: its namespaces must be a non-empty list", path=source)
        for n in namespaces:
            if not (isinstance(n, str) and (n == ANY_NAMESPACE or _NAME.fullmatch(n))):
                raise InvalidArgument(f"{where}: namespace {printable(str(n), 100)!r} is neither '*' nor a "
                                      "valid name (letters, digits, '.', '_', '-')", path=source)
        digest = hashlib.sha256(token.encode()).digest()
        known = self._grants.get(digest, Grant(()))
        self._grants[digest] = Grant(tuple(dict.fromkeys((*known.namespaces, *namespaces))))

    @classmethod
    def parse(cls, data: bytes, *, source: str = "tokens") -> TokenTable:
        """A table from the JSON text ``{"tokens": {TOKEN: [NAMESPACE, ...], ...}}``; no other
        member, no repeated key. ``{"tokens": {}}`` accepts no token: nobody may write.

        Raises:
            InvalidArgument: the text is over ``MAX_TOKEN_FILE`` bytes, not UTF-8 JSON, or not of
                that shape.
        """
        if len(data) > MAX_TOKEN_FILE:
            raise InvalidArgument(f"{source}: a token file is at most {MAX_TOKEN_FILE:,} bytes", path=source)
        try:
            doc = json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys,
                             parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise InvalidArgument(f"{source}: not UTF-8 text", path=source) from None
        except RecursionError:
            raise InvalidArgument(f"{source}: not JSON (nested too deep)", path=source) from None
        except ValueError as e:
            raise InvalidArgument(f"{source}: not JSON: {e}", path=source) from None
        if not (isinstance(doc, dict) and list(doc) == ["tokens"] and isinstance(doc["tokens"], dict)):
            raise InvalidArgument(f'{source}: must be {{"tokens": {{TOKEN: [NAMESPACE, ...], ...}}}} and nothing '
                                  "else", path=source)
        return cls(doc["tokens"], source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenTable:
        """``parse`` of the file at ``path``.

        Raises:
            FileNotFound: there is no such file.
            IOFailure: it cannot be read.
            InvalidArgument: it is not a regular file, or as for ``parse``.
        """
        source = str(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO does not block the start
        except FileNotFoundError:
            raise FileNotFound(f"{source}: no such token file", path=source) from None
        except OSError as e:
            raise IOFailure(f"{source}: cannot read the token file: {e.strerror or e}", path=source) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidArgument(f"{source}: the token file is not a regular file", path=source)
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(MAX_TOKEN_FILE + 1)
        except OSError as e:
            raise IOFailure(f"{source}: cannot read the token file: {e.strerror or e}", path=source) from None
        finally:
            os.close(fd)
        return cls.parse(data, source=source)

    def with_token(self, token: str, namespaces: Iterable[str] = (ANY_NAMESPACE,)) -> TokenTable:
        """This table and ``token`` (namespaces joined when it is in the table already)."""
        table = TokenTable()
        table._grants = dict(self._grants)
        table._add(token, list(namespaces), "--token", None)
        return table

    def grant(self, authorization: str | None) -> Grant | None:
        """The grant of the token in an ``Authorization: Bearer TOKEN`` header; None without one or
        for a token not in the table. Every token is compared, whichever matches."""
        scheme, _, credential = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        digest = hashlib.sha256(credential.strip().encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, grant in self._grants.items():
            if hmac.compare_digest(digest, known):
                found = grant
        return found

    def __len__(self) -> int:
        return len(self._grants)


def _folder_clash(files: dict[str, Any]) -> str | None:
    """A path that is both a file and a folder of other files (``a`` beside ``a/b``)."""
    folders = {p[:i] for p in files for i in range(len(p)) if p[i] == "/"}
    return next(iter(sorted(folders & files.keys())), None)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _fsync_folder(folder: Path) -> None:
    """Make the names in ``folder`` durable (a rename, a new entry); a no-op where the file
    system cannot sync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_folders(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each one durable in its own parent."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
        _fsync_folder(d.parent)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a file of the store whole or not at all, durably, creating its folders; readable by
    the server's user only (private repositories live here too). What a killed server was writing
    is removed by ``Store.sweep`` at the next start, not by each write."""
    _make_folders(path.parent)
    atomic_write_bytes(path, data, mode=0o600, sweep=False)


@dataclass
class Store:
    """Repositories, commits, refs and blobs on disk."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        _make_folders(self.root / "blobs")
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def sweep(self) -> list[Path]:
        """Remove the temporary files (``.*.part``, ``.*.tmp``) and ``fileio.atomic_write``'s
        temporary folders (``.*.tmp/``) that a server killed mid-write left in the store; returns
        them. Repository and namespace names start with a letter or digit, so neither is ever one.
        Call it only while no other server uses this root."""
        removed = []
        for folder, dirs, names in os.walk(self.root):
            for name in list(dirs):
                p = Path(folder) / name
                if _TEMPORARY.fullmatch(name) and stat.S_ISDIR(p.lstat().st_mode):
                    shutil.rmtree(p)
                    dirs.remove(name)
                    removed.append(p)
            for name in names:
                p = Path(folder) / name
                if _TEMPORARY.fullmatch(name) and stat.S_ISREG(p.lstat().st_mode):
                    p.unlink()
                    removed.append(p)
        return removed

    # -- blobs -------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        p = self.blob_path(sha256)
        return p.is_file() and (size is None or p.stat().st_size == size)

    def put_blob_stream(self, src: Any, size: int, expected: str) -> str:
        """Store ``size`` bytes read from ``src`` in chunks; their sha256 must be ``expected``. A
        blob already stored is read through and kept as it is."""
        stored = self.has_blob(expected, size)
        h = hashlib.sha256()
        tmp = self.root / "blobs" / f".{expected}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            with open(os.devnull if stored else tmp, "wb") as fh:
                remaining = size
                while remaining:
                    chunk = src.read(min(CHUNK, remaining))
                    if not chunk:
                        raise ApiError(400, "request body shorter than its Content-Length")
                    h.update(chunk)
                    fh.write(chunk)
                    remaining -= len(chunk)
                if not stored:
                    fh.flush()
                    os.fsync(fh.fileno())
            if h.hexdigest() != expected:
                raise ApiError(400, f"content sha256 {h.hexdigest()} does not match the declared oid {expected}")
            if not stored:
                os.chmod(tmp, 0o600)
                os.replace(tmp, self.blob_path(expected))
                _fsync_folder(tmp.parent)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return expected

    def put_blob(self, data: bytes, expected: str | None = None) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if expected is not None and digest != expected:
            raise ApiError(400, f"content sha256 {digest} does not match the declared oid {expected}")
        if not self.has_blob(digest, len(data)):
            _atomic_write(self.blob_path(digest), data)
        return digest

    # -- which blobs a repository may name ---------------------------------------------------
    def owns(self, rtype: str, repo_id: str, sha256: str, size: int | None = None) -> bool:
        """Whether a commit to ``repo_id`` may name the blob ``sha256`` (of ``size`` bytes): it is
        stored, and its bytes were uploaded to this repository or a commit of it names them."""
        if not self.has_blob(sha256, size):
            return False
        d = self.repo_dir(rtype, repo_id)
        if (d / "objects" / sha256).is_file():
            return True
        # Repositories written before objects/ was kept: what their commits name is theirs.
        return any(f.get("sha256") == sha256 for c in (d / "commits").glob("*.json")
                   for f in json.loads(c.read_text()).get("files", {}).values())

    def add_owned(self, rtype: str, repo_id: str, *sha256s: str) -> None:
        """Record that the bytes of the blobs ``sha256s`` were uploaded to ``repo_id``: an empty
        marker file each (created whole by one ``open``), made durable by one sync of their folder."""
        folder = self.repo_dir(rtype, repo_id) / "objects"
        _make_folders(folder)
        created = False
        for sha256 in sha256s:
            marker = folder / sha256
            if not marker.is_file():
                os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
                created = True
        if created:
            _fsync_folder(folder)

    # -- repositories ------------------------------------------------------------------------
    def repo_dir(self, rtype: str, repo_id: str) -> Path:
        ns, _, name = repo_id.partition("/")
        if rtype not in REPO_TYPES or not _NAME.fullmatch(ns) or not _NAME.fullmatch(name) or ".." in repo_id:
            raise ApiError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.root / "repos" / f"{rtype}s" / ns / name

    def lock(self, rtype: str, repo_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(f"{rtype}/{repo_id}", threading.Lock())

    def repo(self, rtype: str, repo_id: str) -> dict[str, Any]:
        p = self.repo_dir(rtype, repo_id) / "repo.json"
        if not p.is_file():
            raise ApiError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return json.loads(p.read_text())

    def create_repo(self, rtype: str, repo_id: str, private: bool) -> bool:
        with self.lock(rtype, repo_id):
            d = self.repo_dir(rtype, repo_id)
            if (d / "repo.json").is_file():
                return False
            _make_folders(d / "objects")
            commit = self._write_commit(rtype, repo_id, parents=[], files={}, title="initial commit", message="")
            _atomic_write(d / "refs.json", json.dumps({"branches": {DEFAULT_BRANCH: commit}, "tags": {}}).encode())
            _atomic_write(d / "repo.json", json.dumps({"private": private, "created": _now()}).encode())
            return True

    def refs(self, rtype: str, repo_id: str) -> dict[str, dict[str, str]]:
        return json.loads((self.repo_dir(rtype, repo_id) / "refs.json").read_text())

    def set_refs(self, rtype: str, repo_id: str, refs: dict[str, dict[str, str]]) -> None:
        _atomic_write(self.repo_dir(rtype, repo_id) / "refs.json", json.dumps(refs).encode())

    def commit(self, rtype: str, repo_id: str, oid: str) -> dict[str, Any]:
        return json.loads((self.repo_dir(rtype, repo_id) / "commits" / f"{oid}.json").read_text())

    def resolve(self, rtype: str, repo_id: str, revision: str) -> str:
        self.repo(rtype, repo_id)
        refs = self.refs(rtype, repo_id)
        name = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        if name in refs["branches"]:
            return refs["branches"][name]
        if name in refs["tags"]:
            return refs["tags"][name]
        if _HEX40.fullmatch(revision) and (self.repo_dir(rtype, repo_id) / "commits" / f"{revision}.json").is_file():
            return revision
        raise ApiError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _write_commit(self, rtype: str, repo_id: str, parents: list[str], files: dict[str, Any], title: str,
                      message: str) -> str:
        body = {"parents": parents, "files": files, "title": title, "message": message, "date": _now(),
                "author": "compeft-hub", "nonce": time.time_ns()}
        oid = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        body["id"] = oid
        _atomic_write(self.repo_dir(rtype, repo_id) / "commits" / f"{oid}.json", json.dumps(body).encode())
        return oid

    @staticmethod
    def _op_path(value: dict[str, Any]) -> str:
        """The repository path of a commit operation, checked (``valid_repo_path``)."""
        raw_path = value.get("path", "")
        path = raw_path.lstrip("/") if isinstance(raw_path, str) else raw_path
        if not valid_repo_path(path):
            raise ApiError(400, f"invalid path {str(raw_path)[:200]!r}")
        return cast(str, path)

    def apply_commit(self, rtype: str, repo_id: str, branch: str, header: dict[str, Any],
                     ops: list[tuple[str, dict[str, Any]]]) -> str:
        """Write a commit on ``branch`` and move the branch to it, or refuse it whole.

        Inline files are checked and stored as blobs before the repository is locked (blobs are
        content-addressed, and one a refused commit leaves is named by no repository), so a commit
        of many files holds the lock only to record them."""
        inline: dict[int, dict[str, Any]] = {}  # op index -> the file entry of an inline file
        for i, (key, value) in enumerate(ops):
            if key == "file" and isinstance(value, dict):
                path = self._op_path(value)
                content = value.get("content", "")
                if value.get("encoding", "base64") != "base64" or not isinstance(content, str):
                    raise ApiError(400, "file content must be base64")
                try:
                    data = base64.b64decode(content, validate=True)
                except (binascii.Error, ValueError):
                    raise ApiError(400, f"file content of {path!r} is not valid base64") from None
                inline[i] = {"sha256": self.put_blob(data), "size": len(data), "lfs": False,
                             "oid": _git_blob_oid(data)}
        with self.lock(rtype, repo_id):
            refs = self.refs(rtype, repo_id)
            if branch not in refs["branches"]:
                raise ApiError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = refs["branches"][branch]
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                raise ApiError(412, f"A commit has happened since {parent}; the head of {branch} is {head}. "
                                    "Pull the latest changes and commit again.")
            files = dict(self.commit(rtype, repo_id, head)["files"])
            for i, (key, value) in enumerate(ops):
                if not isinstance(value, dict):
                    raise ApiError(400, f"commit operation {key!r} must be an object")
                path = self._op_path(value)
                if key == "file":
                    files[path] = inline[i]
                elif key == "lfsFile":
                    oid, size = value.get("oid"), value.get("size")
                    if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not HEX64.fullmatch(oid):
                        raise ApiError(400, f"lfsFile {path!r} needs a sha256 oid")
                    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                        raise ApiError(400, f"lfsFile {path!r} needs an integer size")
                    if not self.owns(rtype, repo_id, oid, size):  # the same answer whether stored elsewhere or not
                        raise ApiError(422, f"LFS object {oid} ({size} bytes) for {path!r} was not uploaded to "
                                            f"{repo_id}", E_LFS_OBJECT_NOT_IN_REPO)
                    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
                    files[path] = {"sha256": oid, "size": size, "lfs": True, "oid": _git_blob_oid(pointer.encode()),
                                   "pointer_size": len(pointer)}
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise ApiError(404, f"{path} does not exist", "EntryNotFound")
                elif key == "deletedFolder":
                    for p in [p for p in files if p.startswith(path + "/")]:
                        del files[p]
                else:
                    raise ApiError(400, f"unsupported commit operation {str(key)[:100]!r}")
            clash = _folder_clash(files)
            if clash is not None:
                raise ApiError(400, f"{clash!r} would be both a file and a folder")
            self.add_owned(rtype, repo_id, *sorted({f["sha256"] for f in inline.values()}))
            oid = self._write_commit(rtype, repo_id, [head], files, header.get("summary") or "update",
                                     header.get("description") or "")
            refs["branches"][branch] = oid
            self.set_refs(rtype, repo_id, refs)
            return oid


# ---------------------------------------------------------------------------------------------
class HubHandler(BaseHTTPRequestHandler):
    server_version = "compeft-hub/1"
    protocol_version = "HTTP/1.1"
    #: TCP_NODELAY: a response's headers and body go out as separate writes, and with Nagle's
    #: algorithm the body waits for the client's delayed ACK of the headers (about 40 ms a request)
    disable_nagle_algorithm = True

    @property
    def hub(self) -> HubServer:
        return cast(HubServer, self.server)

    @property
    def store(self) -> Store:
        return self.hub.store

    def log_message(self, fmt: str, *args: Any) -> None:
        if self.hub.verbose:
            super().log_message(fmt, *args)

    # -- plumbing ----------------------------------------------------------------------------
    def _base(self) -> str:
        """This server's URL as the client reached it: behind a TLS proxy that sends
        ``X-Forwarded-Proto: https``, the LFS upload URLs it hands out must be https too."""
        host, port = cast(tuple[str, int], self.server.server_address)[:2]
        forwarded = self.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        return f"{'https' if forwarded == 'https' else 'http'}://{self.headers.get('Host', f'{host}:{port}')}"

    def _length(self) -> int:
        """The request's Content-Length, checked (no chunked bodies, no negative or malformed length)."""
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        raw = raw.strip()
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
            raise ApiError(400, "bad Content-Length")
        return int(raw)

    def _body(self, limit: int = MAX_JSON_BODY) -> bytes:
        """The request body, refused (413) before reading when it is over ``limit`` bytes."""
        n = self._length()
        if n > limit:
            raise ApiError(413, f"request body of {n:,} bytes is over the {limit:,} bytes accepted")
        self._body_read = True
        data = self.rfile.read(n) if n else b""
        if len(data) != n:
            raise ApiError(400, "request body shorter than its Content-Length")
        return data

    def _json_body(self) -> Any:
        raw = self._body()
        ctype = self.headers.get("Content-Type", "")
        if "application/x-www-form-urlencoded" in ctype:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            return {k: (v if k == "paths" else v[-1]) for k, v in form.items()}
        try:
            return json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            raise ApiError(400, "request body is not JSON (or nests too deep)") from None

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
              raw: bytes | None = None, head: bool = False) -> None:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        self.send_response(status)
        if raw is None:
            self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, header_value(v))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, e: ApiError, head: bool = False) -> None:
        # An error can come before the request body was read; closing the connection keeps an
        # unread body from being taken for the next request on it.
        self.close_connection = True
        headers = {**e.headers, "X-Error-Message": e.message, "Connection": "close"}
        body: dict[str, Any] = {"error": e.message}
        if e.code:
            headers["X-Error-Code"] = body["code"] = e.code
        self._send(e.status, {**body, **e.extra}, headers, head=head)

    def _grant(self) -> Grant | None:
        """What the request's token may do: None for no token or an unknown one; every
        namespace on a server without tokens."""
        access = self.hub.access
        return OPEN if access is None else access.grant(self.headers.get("Authorization"))

    def _authenticate(self) -> Grant:
        grant = self._grant()
        if grant is None:
            raise ApiError(401, "Invalid credentials in Authorization header")
        return grant

    def _require_write(self, namespace: str) -> Grant:
        """The request's grant, which must include ``namespace``: 401 without a known token, 403
        with one that may not write there (whether or not the repository exists)."""
        grant = self._authenticate()
        if not grant.may_write(namespace):
            raise ApiError(403, f"this token may not write to the namespace {namespace!r}", E_NAMESPACE_FORBIDDEN)
        return grant

    def _require_read(self, rtype: str, repo_id: str) -> dict[str, Any]:
        """The repository, when this request may read it: a private one is answered as missing
        unless the token may write its namespace (and always on a server without tokens)."""
        repo = self.store.repo(rtype, repo_id)
        if repo.get("private"):
            grant = None if self.hub.access is None else self._grant()
            if grant is None or not grant.may_write(repo_id.partition("/")[0]):
                raise ApiError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _visible(self, rtype: str, repo_id: str) -> bool:
        try:
            self._require_read(rtype, repo_id)
        except ApiError:
            return False
        return True

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        segs = [unquote(s) for s in parts.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        head = method == "HEAD"
        self._body_read = False
        try:
            self._route(method, segs, query)
        except ApiError as e:
            self._error(e, head=head)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
            self._error(ApiError(400, f"bad request: {type(e).__name__}: {e}"), head=head)
        except (OSError, MemoryError) as e:
            if isinstance(e, (BrokenPipeError, ConnectionResetError, TimeoutError)):
                self.close_connection = True  # the client went away: nothing to answer
                return
            self.log_error("%s", f"{type(e).__name__}: {e}")
            self._error(ApiError(500, f"server error: {type(e).__name__}"), head=head)
        if not self._body_read and self.headers.get("Content-Length", "0").strip() != "0":
            self.close_connection = True

    do_GET = lambda self: self._dispatch("GET")  # noqa: E731
    do_HEAD = lambda self: self._dispatch("HEAD")  # noqa: E731
    do_POST = lambda self: self._dispatch("POST")  # noqa: E731
    do_PUT = lambda self: self._dispatch("PUT")  # noqa: E731
    do_DELETE = lambda self: self._dispatch("DELETE")  # noqa: E731

    # -- routing -----------------------------------------------------------------------------
    def _route(self, method: str, s: list[str], q: dict[str, str]) -> None:
        if s[:2] == ["api", "whoami-v2"] and method == "GET":
            grant = self._authenticate()
            name = grant.user(self.hub.user)
            orgs = [{"name": n} for n in grant.namespaces if n not in (name, ANY_NAMESPACE)]
            return self._send(200, {"type": "user", "name": name, "fullname": name, "orgs": orgs,
                                    "auth": {"accessToken": {"role": "write"}}})
        if s[:2] == ["api", "validate-yaml"] and method == "POST":
            self._body()
            return self._send(200, {"errors": [], "warnings": []})
        if s[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if s[:1] == ["_lfs"]:
            return self._lfs_object(method, s[1:], q)
        if s[:1] == ["api"] and len(s) >= 4 and s[1].endswith("s") and s[1][:-1] in REPO_TYPES:
            return self._api_repo(method, s[1][:-1], f"{s[2]}/{s[3]}", s[4:], q)
        # file URLs: [prefix/]ns/name/resolve/rev/path  and  [prefix/]ns/name.git/info/lfs/objects/batch
        rtype = "model"
        if s and s[0] in ("datasets", "spaces"):
            rtype, s = s[0][:-1], s[1:]
        if len(s) >= 5 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"]:
            return self._lfs_batch(rtype, f"{s[0]}/{s[1][:-4]}")
        if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(method, rtype, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        raise ApiError(404, f"no route for {method} {self.path}")

    def _create_repo(self) -> None:
        grant = self._authenticate()
        body = self._json_body()
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        name, org = body.get("name"), body.get("organization") or grant.user(self.hub.user)
        rtype = body.get("type") or "model"
        if rtype not in REPO_TYPES or not isinstance(name, str) or not isinstance(org, str) or not _NAME.fullmatch(name) \
                or not _NAME.fullmatch(org):
            raise ApiError(400, f"invalid repository name {org}/{name}")
        repo_id = f"{org}/{name}"
        url = f"{self._base()}/{REPO_TYPES[rtype]}{repo_id}"
        # A repository this token can see exists already (409, whoever may write it); one it
        # cannot see is answered as any other namespace it may not write (403).
        if not grant.may_write(org) and self._visible(rtype, repo_id):
            raise ApiError(409, "You already created this repo", extra={"url": url})
        self._require_write(org)
        # huggingface_hub 1.x sends "private": true, 2.x "visibility": "private"
        private = body.get("private") is True or body.get("visibility") == "private"
        if not self.store.create_repo(rtype, repo_id, private):
            raise ApiError(409, "You already created this repo", extra={"url": url})
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _api_repo(self, method: str, rtype: str, repo_id: str, rest: list[str], q: dict[str, str]) -> None:
        verb = rest[0] if rest else ""
        namespace = repo_id.partition("/")[0]
        if method == "GET" and verb in ("", "revision"):
            self._require_read(rtype, repo_id)
            rev = rest[1] if verb == "revision" and len(rest) > 1 else DEFAULT_BRANCH
            return self._send(200, self._info(rtype, repo_id, rev))
        if verb == "preupload" and method == "POST":
            self._require_write(namespace)
            self.store.resolve(rtype, repo_id, rest[1] if len(rest) > 1 else DEFAULT_BRANCH)
            files = self._json_body().get("files", [])
            lfs = self.hub.lfs
            return self._send(200, {"files": [
                {"path": f["path"], "uploadMode": "lfs" if lfs and f["path"].endswith(LFS_SUFFIXES) and f.get("size", 0)
                 else "regular", "shouldIgnore": False} for f in files]})
        if verb == "commit" and method == "POST":
            self._require_write(namespace)
            self.store.repo(rtype, repo_id)
            branch = rest[1] if len(rest) > 1 else DEFAULT_BRANCH
            lines = [json.loads(line) for line in self._body(MAX_COMMIT_BODY).splitlines() if line.strip()]
            if not all(isinstance(x, dict) for x in lines):
                raise ApiError(400, "every commit line must be a JSON object")
            header: Any = next((x["value"] for x in lines if x.get("key") == "header"), {})
            if not isinstance(header, dict):
                raise ApiError(400, "the commit header must be an object")
            ops = [(x["key"], x["value"]) for x in lines if x.get("key") != "header"]
            oid = self.store.apply_commit(rtype, repo_id, branch, header, ops)
            url = f"{self._base()}/{REPO_TYPES[rtype]}{repo_id}/commit/{oid}"
            return self._send(200, {"commitOid": oid, "commitUrl": url, "success": True, "pullRequestUrl": None})
        if verb == "tree" and method == "GET":
            self._require_read(rtype, repo_id)
            oid = self.store.resolve(rtype, repo_id, rest[1] if len(rest) > 1 else DEFAULT_BRANCH)
            return self._send(200, self._tree(rtype, repo_id, oid, "/".join(rest[2:]),
                                              q.get("recursive", "").lower() in ("1", "true")))
        if verb == "paths-info" and method == "POST":
            self._require_read(rtype, repo_id)
            oid = self.store.resolve(rtype, repo_id, rest[1] if len(rest) > 1 else DEFAULT_BRANCH)
            paths = self._json_body().get("paths", [])
            paths = [paths] if isinstance(paths, str) else paths
            entries = {e["path"]: e for e in self._tree(rtype, repo_id, oid, "", True)}
            return self._send(200, [entries[p.strip("/")] for p in paths if p.strip("/") in entries])
        if verb == "refs" and method == "GET":
            self._require_read(rtype, repo_id)
            refs = self.store.refs(rtype, repo_id)
            return self._send(200, {
                "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in refs["branches"].items()],
                "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in refs["tags"].items()],
                "converts": [], "pullRequests": None})
        if verb == "commits" and method == "GET":
            self._require_read(rtype, repo_id)
            at: str | None = self.store.resolve(rtype, repo_id, rest[1] if len(rest) > 1 else DEFAULT_BRANCH)
            out = []
            while at:
                c = self.store.commit(rtype, repo_id, at)
                out.append({"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
                            "authors": [{"user": c["author"]}]})
                at = c["parents"][0] if c["parents"] else None
            return self._send(200, out)
        if verb in ("branch", "tag") and len(rest) > 1 and method in ("POST", "DELETE"):
            self._require_write(namespace)
            return self._ref(method, verb, rtype, repo_id, rest[1])
        if verb.startswith("xet-"):
            raise ApiError(404, "this server stores large files through the LFS batch API, not Xet: set "
                                "HF_HUB_DISABLE_XET=1 in the client (compeft push falls back by itself)")
        raise ApiError(404, f"no route for {method} {self.path}")

    def _ref(self, method: str, kind: str, rtype: str, repo_id: str, name: str) -> None:
        body = self._json_body() if method == "POST" else {}
        with self.store.lock(rtype, repo_id):
            refs = self.store.refs(rtype, repo_id)
            table = refs["branches" if kind == "branch" else "tags"]
            if kind == "tag" and method == "POST":  # POST .../tag/{revision} with {"tag": name}
                target, name = self.store.resolve(rtype, repo_id, name), body.get("tag", "")
            else:
                target = self.store.resolve(rtype, repo_id, body.get("startingPoint") or DEFAULT_BRANCH)
            if not isinstance(name, str) or not re.fullmatch(r"^[A-Za-z0-9._/-]{1,200}$", name) or ".." in name:
                raise ApiError(400, f"invalid {kind} name {name!r}")
            if method == "DELETE":
                if name not in table or (kind == "branch" and name == DEFAULT_BRANCH):
                    raise ApiError(404, f"{kind} {name} not found", "RevisionNotFound")
                del table[name]
            else:
                if name in table:
                    raise ApiError(409, f"{kind} {name} already exists")
                table[name] = target
            self.store.set_refs(rtype, repo_id, refs)
        self._send(200, {})

    def _info(self, rtype: str, repo_id: str, rev: str) -> dict[str, Any]:
        oid = self.store.resolve(rtype, repo_id, rev)
        c = self.store.commit(rtype, repo_id, oid)
        repo = self.store.repo(rtype, repo_id)
        return {"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": oid,
                "lastModified": c["date"], "createdAt": repo.get("created"), "private": repo.get("private", False),
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": [{"rfilename": p, "size": f["size"]} for p, f in sorted(c["files"].items())]}

    def _tree(self, rtype: str, repo_id: str, oid: str, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        files = self.store.commit(rtype, repo_id, oid)["files"]
        prefix = prefix.strip("/")
        if prefix and prefix in files:
            raise ApiError(400, f"{prefix} is a file")
        base = prefix + "/" if prefix else ""
        if prefix and not any(p.startswith(base) for p in files):
            raise ApiError(404, f"{prefix} does not exist on {oid}", "EntryNotFound")
        out, dirs = [], set()
        for path, f in sorted(files.items()):
            if not path.startswith(base):
                continue
            rel = path[len(base):].split("/")
            for i in range(1, len(rel)):
                d = base + "/".join(rel[:i])
                if (recursive or i == 1) and d not in dirs:
                    dirs.add(d)
                    out.append({"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()})
            if recursive or len(rel) == 1:
                entry = {"type": "file", "path": path, "size": f["size"], "oid": f["oid"]}
                if f["lfs"]:
                    entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": f["pointer_size"]}
                out.append(entry)
        return out

    def _resolve(self, method: str, rtype: str, repo_id: str, rev: str, path: str) -> None:
        self._require_read(rtype, repo_id)
        oid = self.store.resolve(rtype, repo_id, rev)
        files = self.store.commit(rtype, repo_id, oid)["files"]
        f = files.get(path)
        if f is None:
            raise ApiError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": oid, "ETag": f'"{f["oid"]}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if f["lfs"]:
            headers.update({"X-Linked-Etag": f'"{f["sha256"]}"', "X-Linked-Size": str(f["size"])})
        blob = self.store.blob_path(f["sha256"])
        with open(blob, "rb") as fh:  # streamed in chunks: memory stays at one chunk per download
            size = os.fstat(fh.fileno()).st_size
            start, end, status = 0, size - 1, 200
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if if_range is not None and if_range.strip() != headers["ETag"]:
                rng = None  # RFC 9110 13.1.5: the client's copy is another version; send the whole file
            if rng is not None and "," not in rng and (m := re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)):
                first, last = m.groups()
                if first:
                    start, end = int(first), min(int(last), size - 1) if last else size - 1
                elif last:  # the last N bytes
                    start = max(size - int(last), 0)
                if (not first and not last) or (first and last and int(last) < int(first)) or start >= size \
                        or (not first and int(last) == 0):
                    raise ApiError(416, f"range {rng.strip()[:100]!r} is not satisfiable for {size} bytes",
                                   headers={"Content-Range": f"bytes */{size}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, header_value(v))
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            if method == "HEAD":
                return None
            fh.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = fh.read(min(CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)
        return None

    def _lfs_batch(self, rtype: str, repo_id: str) -> None:
        self._require_write(repo_id.partition("/")[0])
        self.store.repo(rtype, repo_id)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise ApiError(400, "only uploads go through this LFS endpoint")
        objects = []
        for o in body.get("objects", []):
            oid, size = o.get("oid"), o.get("size")
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not (isinstance(oid, str) and HEX64.fullmatch(oid) and isinstance(size, int)
                    and not isinstance(size, bool) and 0 <= size <= MAX_UPLOAD):
                entry["error"] = {"code": 422, "message": "bad oid or size"}
            elif not self.store.owns(rtype, repo_id, oid, size):
                # Bytes stored for another repository are asked for too: an upload proves the
                # client holds them, and the object becomes this repository's.
                href = f"{self._base()}/_lfs/{rtype}/{repo_id}/{oid}"
                # The upload PUT carries no credentials (as with presigned storage URLs): the
                # URL itself is signed for this repository, object and size.
                sig = self._sign(rtype, repo_id, oid, size)
                entry["actions"] = {"upload": {"href": f"{href}?size={size}&sig={sig}", "header": {}},
                                    "verify": {"href": f"{href}/verify", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _sign(self, rtype: str, repo_id: str, oid: str, size: int) -> str:
        return hmac.new(self.hub.secret, f"{rtype}/{repo_id}:{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    def _lfs_object(self, method: str, rest: list[str], q: dict[str, str]) -> None:
        """``/_lfs/<type>/<namespace>/<name>/<oid>``: PUT with the signed URL of a batch answer
        stores the object for that repository; POST ``.../verify`` checks that it holds it."""
        if len(rest) < 4 or rest[0] not in REPO_TYPES or not HEX64.fullmatch(rest[3]):
            raise ApiError(404, "no such LFS route")
        rtype, repo_id, oid = rest[0], f"{rest[1]}/{rest[2]}", rest[3]
        if method == "PUT" and len(rest) == 4:
            size = q.get("size", "")
            if not (size.isascii() and size.isdigit() and len(size) <= 18
                    and hmac.compare_digest(q.get("sig", ""), self._sign(rtype, repo_id, oid, int(size)))):
                raise ApiError(403, "upload URL signature does not match")
            n = self._length()
            if n != int(size) or n > MAX_UPLOAD:
                raise ApiError(400 if n != int(size) else 413,
                               f"upload of {n:,} bytes; the batch request declared {int(size):,}")
            self._body_read = True
            self.store.put_blob_stream(self.rfile, n, expected=oid)
            self.store.add_owned(rtype, repo_id, oid)
            return self._send(200, {})
        if method == "POST" and rest[4:] == ["verify"]:
            self._require_write(rest[1])
            body = self._json_body()
            declared = body.get("size") if isinstance(body, dict) else None
            if not (isinstance(declared, int) and self.store.owns(rtype, repo_id, oid, declared)):
                raise ApiError(404, f"LFS object {oid} of size {declared} was not uploaded to {repo_id}",
                               E_LFS_OBJECT_NOT_IN_REPO)
            return self._send(200, {})
        raise ApiError(404, "no such LFS route")


MAX_HEADER_VALUE = 1024


def header_value(value: str) -> str:
    """A header value that cannot end the header or break its encoding (``paths.printable``)."""
    return printable(value, MAX_HEADER_VALUE)


class HubServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_workers`` at once: a connection over the limit is
    answered 503 (``Retry-After: 1``, which huggingface_hub retries) without a thread. Each
    connection's socket times out after ``timeout`` seconds without data, so idle and slow clients
    give their slot back."""

    daemon_threads = True
    #: the listen backlog: socketserver's default of 5 drops the SYNs of a burst of new
    #: connections, and each dropped one waits for the kernel's retransmission (1 s, 3 s, 7 s, ...)
    request_queue_size = socket.SOMAXCONN
    store: Store
    #: the accepted tokens; None: no token is needed and every request may write
    access: TokenTable | None = None
    user: str = "local"
    lfs: bool = False
    verbose: bool = False
    #: signs the LFS upload URLs
    secret: bytes = b""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_workers: int = 64):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_workers)
        self._root_lock: int | None = None

    def claim(self, store: Store) -> None:
        """Serve ``store``, as its only server: lock its root, then remove the temporary files a
        server killed mid-write left there (none of them can be in use).

        Raises:
            IOFailure: another server holds the root, or the lock cannot be taken.
        """
        path = store.root / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise IOFailure(f"{store.root}: cannot lock the store: {e.strerror or e}", path=str(path)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise IOFailure(f"{store.root}: another compeft hub server is serving this folder",
                            path=str(store.root)) from None
        self._root_lock, self.store = fd, store
        store.sweep()

    def server_close(self) -> None:
        super().server_close()
        if self._root_lock is not None:
            os.close(self._root_lock)
            self._root_lock = None

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                                b"X-Error-Message: the server is busy\r\nConnection: close\r\n\r\n")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed outside a handler's own error answers (the client went away
        mid-answer, a socket error): one line with ``verbose``, never a traceback."""
        if getattr(self, "verbose", False):
            e = sys.exc_info()[1]
            sys.stderr.write(f"{client_address[0]}: connection dropped: {type(e).__name__}: {e}\n")

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                user: str = "local", lfs: bool = False, verbose: bool = False, max_workers: int = 64,
                timeout: float = 30.0, *, tokens: TokenTable | None = None) -> HubServer:
    """A ready (not yet serving) server; ``port=0`` picks a free port (``server.server_address``).
    ``max_workers`` connections are served at once; a socket idle for ``timeout`` seconds is closed.

    ``tokens`` are the accepted tokens and their namespaces; ``token`` is one more that may write
    every namespace. With neither, anyone may write anywhere and private repositories are shown to
    no one. The root is locked for this server until ``server_close``, and temporary files left in
    it are removed.

    Raises:
        InvalidArgument: ``token`` is not 1 to 1024 visible ASCII characters.
        IOFailure: another server serves ``root``, or it cannot be written.
    """
    access = tokens
    if token:
        access = (tokens if tokens is not None else TokenTable()).with_token(token)
    handler = type("Handler", (HubHandler,), {"timeout": timeout})
    store = Store(Path(root))
    server = HubServer((host, port), handler, max_workers)
    try:
        server.claim(store)
    except BaseException:
        server.server_close()
        raise
    server.access, server.user, server.lfs, server.verbose = access, user, lfs, verbose
    server.secret = os.urandom(32)
    return server


__all__ = ["make_server", "HubServer", "Store", "HubHandler", "ApiError", "TokenTable", "Grant", "valid_repo_path"]
