"""Push compressed artifacts to a Hugging Face Hub repository and pull them back, checking every
byte on the way in.

A compeft repository holds the compressed files, their detached signatures (``<file>.sig``,
``signing``) when they have them, a model card (``README.md``) the Hub understands, the adapter's
``adapter_config.json`` when it has one, and ``compeft-index.json`` (``hub.index``). ``pull``
downloads through ``hub.download`` (its cache, revision pinning and offline mode), checks each file
against the index, and its signature when one is required, and verifies it fully before anything
is returned or written to the output folder.

The endpoint is ``endpoint=`` / ``--endpoint``, else ``HF_ENDPOINT``; the token ``token=``, else
``HF_TOKEN`` or the stored login.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .. import binding, signing
from .. import constants as C
from ..binding import BaseBinding, ModelRef
from ..errors import (
    ArtifactDigestMismatch,
    CompeftError,
    HubAuthError,
    HubEntryNotFound,
    HubError,
    HubNoIndex,
    HubRepoNotFound,
    HubRevisionNotFound,
    HubUnreachable,
    InputError,
    InvalidArgument,
    IOFailure,
    SignatureMalformed,
    SignatureMissing,
)
from ..fileio import atomic_write, atomic_write_bytes, file_sha256
from ..manifest import Requirement
from ..peft_io import write_peft_folder
from ..reader import CompeftFile
from ..report import report
from ..writer import foreign_name
from . import download as dl
from .card import front_matter, merge_card, section
from .index import Index, IndexEntry
from .paths import printable

PathLike = str | os.PathLike[str]

#: Commits a push tries when other pushes keep moving the branch head.
PUSH_ATTEMPTS = 5
#: the largest model card push reads to merge its section into
MAX_CARD_BYTES = 1 << 20
#: names a pushed file may not take: peft and transformers read them as their own
RESERVED_NAMES = C.FOREIGN_WEIGHT_NAMES | {"adapter_model.bin", "adapter_config.json", "pytorch_model.bin", "config.json",
                                          "README.md", C.HUB_INDEX_FILE}
SHARD_NAME = re.compile(C.FOREIGN_SHARD_PATTERN)
_R = TypeVar("_R")


@contextlib.contextmanager
def hub_errors(what: str, repo_id: str | None = None, revision: str | None = None, *,
               token_given: bool = True) -> Iterator[None]:
    """Translate huggingface_hub and transport failures into typed compeft errors;
    ``token_given`` says whether a token was sent (a refusal then names the missing token)."""
    from huggingface_hub import errors as hfe

    ctx: dict[str, Any] = {"repo_id": repo_id, "revision": revision}
    try:
        yield
    except CompeftError:
        raise
    except hfe.LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: test it first
        raise HubUnreachable(f"{what}: the Hub could not be reached and the file is not cached ({e})", **ctx) from None
    except hfe.RepositoryNotFoundError:
        raise HubRepoNotFound(f"{what}: repository not found (or not visible with this token)", **ctx) from None
    except hfe.RevisionNotFoundError:
        raise HubRevisionNotFound(f"{what}: revision not found", **ctx) from None
    except hfe.EntryNotFoundError:
        raise HubEntryNotFound(f"{what}: file not found", **ctx) from None
    except hfe.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403) and not token_given:
            raise HubAuthError(f"{what}: the Hub needs a token for this (HTTP {status}) and none was given: pass "
                               "--token (token=), set HF_TOKEN, or log in with hf auth login", status=status,
                               **ctx) from None
        if status in (401, 403):
            raise HubAuthError(f"{what}: the Hub refused the token (HTTP {status})", status=status, **ctx) from None
        first = (str(e).splitlines() or [""])[0]  # the server's words: one printable line, cut short
        raise HubError(f"{what}: HTTP {status}: {printable(first, dl.MAX_MESSAGE)}", status=status, **ctx) from None
    except OSError as e:  # connection refused, DNS, ...
        raise HubUnreachable(f"{what}: {e.strerror or e}", **ctx) from None
    except Exception as e:  # the transport library's own connection errors
        if "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
            raise HubUnreachable(f"{what}: {e}", **ctx) from None
        raise


# --- push -----------------------------------------------------------------------------------------
@dataclass
class PushResult:
    repo_id: str
    commit: str
    url: str
    files: list[str]


@dataclass
class _Artifact:
    """A file to push, read once: its index entry, size report and PEFT config."""

    path: Path
    entry: IndexEntry
    report: dict[str, Any]
    peft_config: dict[str, Any] | None
    #: the file's detached signature (``<file>.sig``), when it has one
    signature: signing.Signature | None
    #: the artifacts the file requires (spec 3.6), found by ``Index.link``
    requires: list[Requirement]


def _prepare(path: Path) -> _Artifact:
    with CompeftFile(path) as f:  # the one time this push opens the file
        f.verify()
        sha = f.sha256()
        sig_path = signing.signature_path(path)
        sig = None
        if os.path.lexists(sig_path):  # a signature of other bytes (a stale one) is refused, not pushed
            sig = signing.read_signature(sig_path)
            sig.check_subject(sha256=sha, size=f.size, manifest_sha256=f.metadata[C.META_MANIFEST_SHA256],
                              what=str(sig_path))
        entry = IndexEntry.of(f, path.name, sha256=sha, signature=None if sig is None else path.name + C.SIGNATURE_SUFFIX)
        return _Artifact(path, entry, report(f), f.manifest.adapter.peft_config, sig, list(f.manifest.requires))


def _head_file(endpoint: str | None, repo_id: str, head: str, name: str, max_bytes: int, token: str | None,
               what: str, revision: str | None) -> bytes | None:
    """The bytes of ``name`` at commit ``head``, at most ``max_bytes`` of them; None when the
    commit has no such file."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            got = dl.fetch(dl.resolve_url(dl.endpoint_url(endpoint), repo_id, head, name), Path(tmp) / "file",
                           max_bytes=max_bytes, token=token, what=f"{what}: {name}", repo_id=repo_id,
                           revision=revision)
        except HubEntryNotFound:
            return None
        return got.path.read_bytes()


def _head_index(api: Any, endpoint: str | None, repo_id: str, revision: str | None, token: str | None,
                what: str) -> tuple[str, Index]:
    """The head commit of ``revision`` (default ``main``) and the index it holds (an empty one
    when it holds none). An index that is not valid is refused, not replaced: it lists artifacts
    of others."""
    head = dl.checked_commit(api.model_info(repo_id, revision=revision or "main").sha, what, repo_id, revision)
    data = _head_file(endpoint, repo_id, head, C.HUB_INDEX_FILE, dl.MAX_INDEX_BYTES, token, what, revision)
    if data is None:  # no index yet: the usual case for a new repository
        return head, Index()
    return head, Index.parse(data, f"{what}: the repository's index")


def _card(endpoint: str | None, repo_id: str, head: str, index: Index, arts: list[_Artifact], token: str | None,
          what: str, revision: str | None) -> bytes | None:
    """The model card after this push (``card.merge_card``): the owner's text and front matter
    kept, the compeft section listing every artifact of ``index``. None to leave the card as it
    is (its front matter cannot be read, or it is not UTF-8 text)."""
    existing = _head_file(endpoint, repo_id, head, "README.md", MAX_CARD_BYTES, token, what, revision)
    try:
        text = None if existing is None else existing.decode("utf-8")
    except UnicodeDecodeError:
        return None
    pushed = {a.entry.path: a.report for a in arts}
    data = front_matter(index.artifacts, [a.report for a in arts])
    card = merge_card(text, repo_id, data, section(repo_id, index.artifacts, pushed))
    return None if card is None else card.encode("utf-8")


def _check_requirements(arts: list[_Artifact], api: Any, endpoint: str | None, repo_id: str, revision: str | None,
                        token: str | None, what: str) -> None:
    """Refuse, before the repository is created or anything is sent, a push of an artifact whose
    requirements are neither in the push nor in the repository (a new branch starts from main)."""
    pushed = {a.entry.manifest_sha256 for a in arts}
    if all(r.manifest_sha256 in pushed for a in arts for r in a.requires):
        Index().link([(a.entry, a.requires) for a in arts])
        return
    old = Index()
    for rev in dict.fromkeys([revision or "main", "main"]):
        try:
            with hub_errors(what, repo_id, rev):
                old = _head_index(api, endpoint, repo_id, rev, token, what)[1]
            break
        except HubRevisionNotFound:
            continue
        except HubRepoNotFound:
            break
    old.link([(a.entry, a.requires) for a in arts])


def push(paths: PathLike | Sequence[PathLike], repo_id: str, *, revision: str | None = None,
         private: bool = False, message: str | None = None, endpoint: str | None = None,
         token: str | None = None) -> PushResult:
    """Upload compressed file(s) to ``repo_id`` in one commit, with an updated
    ``compeft-index.json`` and model card. The card's compeft section lists every artifact of the
    index; the rest of an existing card (its text, licence, evaluation results) is kept, and a card
    whose front matter cannot be read is left as it is. Nothing else of the repository is written:
    a PEFT adapter's ``adapter_config.json`` and weights stay as they are, and no file may take a
    name peft or transformers reads (``RESERVED_NAMES``).

    Files are verified before anything is sent; the repository (and the branch ``revision``) is
    created when missing. A file's detached signature (``<file>.sig``, ``signing``) is uploaded
    beside it and named in the index; one that is for other bytes is refused (``SignatureInvalid``).
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfUriError

    if split_repo(repo_id)[1] is not None:  # namespace/name: for a bare name the Hub picks the namespace
        raise InvalidArgument(f"repository must be namespace/name (the branch is revision=), got {repo_id!r}")
    files = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not files:
        raise InvalidArgument("nothing to push")
    for p in files:
        if p.name in RESERVED_NAMES or SHARD_NAME.fullmatch(p.name):
            raise InvalidArgument(f"{p.name} is a name peft or transformers reads as their own weights or files; "
                                  "rename it (e.g. to NAME.cpeft.safetensors) before pushing it", path=str(p))
    arts = [_prepare(p) for p in files]
    api = HfApi(endpoint=dl.endpoint_url(endpoint), token=token)
    what = f"push to {repo_id}"
    from huggingface_hub import get_token

    streamed = False  # artifacts handed over as open files: huggingface_hub then uploads them without Xet
    with hub_errors(what, repo_id, revision, token_given=bool(token or get_token())), \
            contextlib.ExitStack() as opened:
        if any(a.requires for a in arts):
            _check_requirements(arts, api, endpoint, repo_id, revision, token, what)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
        except HfUriError:
            # The Hub refused to create the repository and huggingface_hub found it already there,
            # then failed to build its URL for an endpoint other than huggingface.co; the commit
            # below is refused the same way when the token may not write it.
            pass
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        for attempt in range(PUSH_ATTEMPTS):
            # The index is merged with the one at the branch head, and the commit names that head
            # as its parent: a push that lands in between makes the server refuse this commit
            # (412), and the merge is done again on the new head.
            head, old = _head_index(api, endpoint, repo_id, revision, token, what)
            index = old.link([(a.entry, a.requires) for a in arts])
            ops = [CommitOperationAdd(path_in_repo=a.path.name,
                                      path_or_fileobj=opened.enter_context(open(a.path, "rb")) if streamed
                                      else str(a.path)) for a in arts]
            ops += [CommitOperationAdd(path_in_repo=a.entry.signature, path_or_fileobj=a.signature.to_bytes())
                    for a in arts if a.signature is not None and a.entry.signature is not None]
            ops.append(CommitOperationAdd(C.HUB_INDEX_FILE, index.to_json().encode()))
            card = _card(endpoint, repo_id, head, index, arts, token, what, revision)
            if card is not None:
                ops.append(CommitOperationAdd("README.md", card))
            try:
                info = api.create_commit(repo_id, operations=ops, revision=revision, parent_commit=head,
                                         commit_message=message or f"Upload {', '.join(p.name for p in files)} with compeft")
                break
            except Exception as e:
                status = getattr(getattr(e, "response", None), "status_code", None)
                if "xet-write-token" in str(e) and not streamed:
                    # a Hub-compatible server without Xet storage (compeft hub serve --lfs): the
                    # same commit again, with the files uploaded through the LFS batch API
                    streamed = True
                    continue
                if status not in (409, 412) or attempt == PUSH_ATTEMPTS - 1:
                    raise
    return PushResult(repo_id=repo_id, commit=info.oid, url=info.commit_url, files=[p.name for p in files])


# --- pull -----------------------------------------------------------------------------------------
@dataclass
class PullResult:
    repo_id: str
    commit: str
    paths: list[Path]
    index: Index = field(default_factory=Index)
    #: artifact path -> fingerprint of the trusted key that signed it (with ``require_signature``)
    signers: dict[str, str] = field(default_factory=dict)


def split_repo(spec: str) -> tuple[str, str | None]:
    """``user/repo@revision`` -> (``user/repo``, ``revision``)."""
    repo, _, rev = spec.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise InvalidArgument(f"repository must be namespace/name[@revision], got {spec!r}")
    return repo, (rev or None)


def peft_folder(path: str) -> str:
    """Folder for an artifact written as a PEFT adapter: its path without the file suffix."""
    for suffix in (".cpeft.safetensors", ".safetensors"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path + ".peft"


def _local_errors(fn: Callable[..., _R]) -> Callable[..., _R]:
    """Errors of this machine's file system (the cache, the output folder) as ``IOFailure``, for
    those no step of ``fn`` names already."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> _R:
        try:
            return fn(*args, **kwargs)
        except CompeftError:
            raise
        except OSError as e:
            raise IOFailure(f"{e.filename or 'the cache'}: {e.strerror or e}",
                            path=None if e.filename is None else str(e.filename)) from None
    return wrapper


@_local_errors
def pull(repo: str, *, revision: str | None = None, local_dir: PathLike | None = None, to_peft: bool = False,
         base: ModelRef | binding.BaseWeights | binding.Weights | None = None, base_model: str | None = None,
         require_signature: signing.PublicKeys | None = None, endpoint: str | None = None, token: str | None = None,
         cache_dir: PathLike | None = None, overwrite: bool = False) -> PullResult:
    """Download a compeft repository's artifacts and verify every byte before returning them.

    The index is read first and every artifact is downloaded from the same commit; each file's
    sha256 and size must equal the index's, and each must pass full verification. With ``base``
    (a ``BaseBinding``, or the base weights themselves: a model, a state dict or a checkpoint
    path) or ``base_model`` (an id), every artifact must be bound to that base (``binding.check``
    with ``require``). With ``require_signature`` (trusted public keys: key objects or PEM files,
    ``signing.trusted_keys``) every artifact must carry a detached signature by one of them, which
    is checked before the file is decoded. With ``local_dir`` the verified files (or, with
    ``to_peft``, PEFT folders) are written there, each atomically, with their checked signatures
    beside them; nothing is written when a check fails. A file there is replaced only when it is
    one an earlier pull wrote (its local index lists it), a PEFT folder only when empty, unless
    ``overwrite``.

    Whatever the endpoint answers, nothing is created, changed or removed outside the cache
    (``cache_dir``, layout in ``hub.download``) and ``local_dir`` (``hub.download``).

    Raises:
        HubRepoNotFound, HubRevisionNotFound, HubNoIndex, HubAuthError, HubUnreachable,
        ArtifactDigestMismatch, BaseMismatch, IOFailure (the cache or ``local_dir`` cannot be
        written), InvalidArgument (``local_dir`` holds other files of the same names), SignatureMissing, SignatureMalformed, SignatureInvalid, KeyInvalid, and the file
        errors of ``verify``.
    """
    repo_id, rev = split_repo(repo)
    rev = revision or rev or "main"
    what = f"{repo_id}@{rev}"
    claims: list[ModelRef | binding.BaseWeights] = []
    if base_model is not None:
        claims.append(BaseBinding(id=base_model))
    if base is not None:  # weights are looked at now, and fingerprinted once for every artifact
        claims.append(base if isinstance(base, (ModelRef, binding.BaseWeights)) else binding.BaseWeights(base))
    trusted = None if require_signature is None else signing.trusted_keys(require_signature)
    url = dl.endpoint_url(endpoint)
    cache = dl.HubCache(cache_dir, url)
    commit, index = (_cached_index if dl.offline() else _fetch_index)(cache, url, repo_id, rev, token, what)
    snap = cache.snapshot(repo_id, commit)
    local: list[Path] = []
    adapters: list[tuple[dict[str, Any], dict[str, Any] | None]] = []  # decoded, for to_peft
    signatures: dict[str, signing.Signature] = {}
    for art in index.artifacts:
        p = snap / art.path
        if not dl.cached_file(p, art.sha256, art.size):
            if dl.offline():
                raise HubUnreachable(f"{what}: {art.path} is not in the cache (HF_HUB_OFFLINE is set)",
                                     repo_id=repo_id, revision=rev)
            got = dl.fetch(dl.resolve_url(url, repo_id, commit, art.path), p, max_bytes=art.size, token=token,
                           what=f"{what}: {art.path}", repo_id=repo_id, revision=rev)
            if got.sha256 != art.sha256 or got.size != art.size:
                dl.discard(got.path)
                raise ArtifactDigestMismatch(f"{art.path}: sha256 is {got.sha256}, the index declares "
                                             f"{art.sha256} ({got.size} bytes, index {art.size})", subject=art.path,
                                             expected=art.sha256, actual=got.sha256, size=got.size,
                                             expected_size=art.size)
            dl.install(got, p)
        with CompeftFile(p) as f:
            if trusted is not None:  # the bytes are authenticated before any stream is decoded
                signatures[art.path] = _signature(art, f, trusted, snap, url, repo_id, commit, rev, token, what)
            if to_peft and local_dir is not None:  # verified while decoded, decoded once
                adapters.append((f.state_dict(verify=True), f.manifest.adapter.peft_config))
            else:
                f.verify()
            m = f.manifest
        for claim in claims:
            binding.check(m.base_model, claim, require=True, subject=art.path)
        local.append(p)
    if local_dir is not None:
        local = _write_out(Path(local_dir), index, local, adapters if to_peft else None, signatures, what, overwrite)
    return PullResult(repo_id=repo_id, commit=commit, paths=local, index=index,
                      signers={path: sig.key_fingerprint for path, sig in signatures.items()})


def _signature(art: IndexEntry, f: CompeftFile, trusted: signing.TrustedKeys, snap: Path, url: str,
               repo_id: str, commit: str, rev: str, token: str | None, what: str) -> signing.Signature:
    """The signature of ``art`` (open as ``f``) by a trusted key: from the cache, else downloaded
    and stored in the cache once it is checked."""
    name = f"{what}: {art.path}"
    if art.signature is None:
        raise SignatureMissing(f"{name}: not signed (the index names no signature)", path=art.path)
    p = snap / art.signature
    got = None
    if p.is_file() and not p.is_symlink():
        sig = signing.read_signature(p, what=f"{what}: {art.signature}")
    elif dl.offline():
        raise HubUnreachable(f"{what}: {art.signature} is not in the cache (HF_HUB_OFFLINE is set)",
                             repo_id=repo_id, revision=rev)
    else:
        try:
            got = dl.fetch(dl.resolve_url(url, repo_id, commit, art.signature), p, max_bytes=C.MAX_SIGNATURE_BYTES,
                           token=token, what=f"{what}: {art.signature}", repo_id=repo_id, revision=rev)
        except HubEntryNotFound:
            raise SignatureMissing(f"{name}: the index names the signature {art.signature}, which the repository "
                                   "does not hold", path=art.signature) from None
        except ArtifactDigestMismatch:
            raise SignatureMalformed(f"{what}: {art.signature}: over {C.MAX_SIGNATURE_BYTES:,} bytes: not a "
                                     "signature file", path=art.signature) from None
    try:
        if got is not None:
            sig = signing.read_signature(got.path, what=f"{what}: {art.signature}")
        signing.authenticate(sig, trusted, sha256=f.sha256(), size=f.size,
                             manifest_sha256=f.metadata[C.META_MANIFEST_SHA256], what=name)
    except BaseException:
        if got is not None:
            dl.discard(got.path)
        raise
    if got is not None:
        dl.install(got, p)
    return sig


def _fetch_index(cache: dl.HubCache, url: str, repo_id: str, rev: str, token: str | None,
                 what: str) -> tuple[str, Index]:
    """Download the index at ``rev``: the commit the server names for it, and the checked index
    (stored in the cache under that commit)."""
    try:
        got = dl.fetch(dl.resolve_url(url, repo_id, rev, C.HUB_INDEX_FILE), cache.repo(repo_id) / C.HUB_INDEX_FILE,
                       max_bytes=dl.MAX_INDEX_BYTES, token=token, what=f"{what}: {C.HUB_INDEX_FILE}",
                       repo_id=repo_id, revision=rev)
    except HubEntryNotFound:
        raise HubNoIndex(f"{what}: the repository holds no {C.HUB_INDEX_FILE}", repo_id=repo_id, revision=rev) from None
    except ArtifactDigestMismatch:
        raise HubNoIndex(f"{what}: {C.HUB_INDEX_FILE} is over {dl.MAX_INDEX_BYTES:,} bytes", repo_id=repo_id,
                         revision=rev) from None
    try:
        commit = dl.checked_commit(got.commit, what, repo_id, rev)
        index = Index.parse(got.path.read_bytes(), what)
    except BaseException:
        dl.discard(got.path)
        raise
    dl.install(got, cache.snapshot(repo_id, commit) / C.HUB_INDEX_FILE)
    cache.remember(repo_id, rev, commit)
    return commit, index


def _cached_index(cache: dl.HubCache, url: str, repo_id: str, rev: str, token: str | None,
                  what: str) -> tuple[str, Index]:
    """The index ``rev`` resolved to when last online (``HF_HUB_OFFLINE``)."""
    commit = cache.cached_commit(repo_id, rev)
    path = None if commit is None else cache.snapshot(repo_id, commit) / C.HUB_INDEX_FILE
    try:
        if path is None or path.stat().st_size > dl.MAX_INDEX_BYTES:
            raise FileNotFoundError
        data = path.read_bytes()
    except OSError:
        raise HubUnreachable(f"{what}: not in the cache, and HF_HUB_OFFLINE is set", repo_id=repo_id,
                             revision=rev) from None
    assert commit is not None
    return commit, Index.parse(data, what)


def _check_replaceable(out: Path, arts: list[IndexEntry], dests: list[Path], folders: bool,
                       signatures: dict[str, signing.Signature]) -> None:
    """Refuse to replace what an earlier pull into ``out`` did not write: a file of another content
    than the artifact, unless the local index of that pull lists it (an update); a signature file
    that index does not list; an index file that is not one; a PEFT folder that is not empty."""
    index_file = out / C.HUB_INDEX_FILE
    earlier: list[IndexEntry] = []
    if index_file.exists() or index_file.is_symlink():
        try:
            if index_file.is_symlink():
                raise InputError(f"{index_file} is a symbolic link")
            earlier = Index.parse(index_file.read_bytes(), "local index").artifacts
        except (OSError, CompeftError):
            _refuse(index_file)
    sha = {a.path: a.sha256 for a in earlier}
    earlier_sigs = {a.signature for a in earlier if a.signature}
    for art, dest in zip(arts, dests, strict=True):
        if dest.exists() or dest.is_symlink():
            if folders:
                if not (dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir())):
                    _refuse(dest)
            elif not (dest.is_file() and not dest.is_symlink()
                      and file_sha256(dest) in (art.sha256, sha.get(art.path))):
                _refuse(dest)
        if art.signature is not None and art.path in signatures:
            sig = out / art.signature
            if (sig.exists() or sig.is_symlink()) and not (
                    not sig.is_symlink() and sig.is_file()
                    and (art.signature in earlier_sigs or sig.read_bytes() == signatures[art.path].to_bytes())):
                _refuse(sig)


def _refuse(dest: Path) -> None:
    raise InvalidArgument(f"{dest} exists and is not what an earlier pull wrote there; pass --force "
                          "(overwrite=True) to replace it", path=str(dest))


def _write_out(out: Path, index: Index, files: list[Path], adapters: list[tuple[dict[str, Any], Any]] | None,
               signatures: dict[str, signing.Signature], what: str, overwrite: bool = False) -> list[Path]:
    """Write verified files and their checked ``signatures`` (or, given ``adapters``, PEFT
    folders) into ``out``; what exists there is replaced only when an earlier pull wrote it, or
    with ``overwrite``."""
    arts = index.artifacts
    if adapters is not None:  # one adapter: the folder itself; several: a folder per file
        dests = [out] if len(arts) == 1 else [out / peft_folder(a.path) for a in arts]
    else:
        dests = [out / a.path for a in arts]
    if len(set(dests)) != len(dests):
        raise HubNoIndex(f"{what}: two artifacts would be written to the same place in {out}")
    if adapters is None:  # files under names peft loads by themselves would load as the base model
        for dest in dests:
            if foreign_name(dest):
                raise HubNoIndex(f"{what}: the index names an artifact {dest.name}, a name peft or transformers "
                                 "loads by itself (compeft push refuses it); it is not written")
    if not overwrite:
        _check_replaceable(out, arts, dests, adapters is not None, signatures)
    out.mkdir(parents=True, exist_ok=True)
    for k, (src, dest) in enumerate(zip(files, dests, strict=True)):
        if adapters is not None:
            write_peft_folder(dest, *adapters[k])
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dest, functools.partial(shutil.copyfile, src))
    if adapters is None:
        for a in arts:
            if a.signature is not None and a.path in signatures:
                atomic_write_bytes(out / a.signature, signatures[a.path].to_bytes())
        atomic_write_bytes(out / C.HUB_INDEX_FILE, index.to_json().encode())
    return dests


__all__ = ["push", "pull", "PushResult", "PullResult", "split_repo", "hub_errors", "peft_folder"]
