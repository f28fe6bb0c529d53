"""Push compressed adapters to a Hugging Face Hub repository and pull them back, checking every
byte on the way in.

A compeft repository holds the compressed files, a model card (``README.md``) the Hub understands,
the adapter's ``adapter_config.json`` when it has one, and ``compeft-index.json``: for every
artifact its sha256, size, kind and base-model binding. ``pull`` downloads through
``hf_hub_download`` (its cache, revision pinning and offline mode), checks each file against the
index and verifies it fully before anything is returned or written to the output folder.

The endpoint is ``endpoint=`` / ``--endpoint``, else ``HF_ENDPOINT``; the token ``token=``, else
``HF_TOKEN`` or the stored login.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import constants as C
from ._version import __version__
from .container import CompeftFile, atomic_write
from .errors import (
    ArtifactDigestMismatch,
    BaseMismatch,
    CompeftError,
    HubAuthError,
    HubEntryNotFound,
    HubError,
    HubNoIndex,
    HubRepoNotFound,
    HubRevisionNotFound,
    HubUnreachable,
    InvalidArgument,
)
from .peft_io import ADAPTER_CONFIG, write_peft_folder
from .report import inspect

#: Commits a push tries when other pushes keep moving the branch head.
PUSH_ATTEMPTS = 5


def _endpoint(endpoint: str | None) -> str | None:
    return endpoint or os.environ.get("HF_ENDPOINT") or None


@contextlib.contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Translate huggingface_hub and transport failures into typed compeft errors."""
    from huggingface_hub import errors as hfe

    try:
        yield
    except CompeftError:
        raise
    except hfe.LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: test it first
        raise HubUnreachable(f"{what}: the Hub could not be reached and the file is not cached ({e})") from None
    except hfe.RepositoryNotFoundError:
        raise HubRepoNotFound(f"{what}: repository not found (or not visible with this token)") from None
    except hfe.RevisionNotFoundError:
        raise HubRevisionNotFound(f"{what}: revision not found") from None
    except hfe.EntryNotFoundError:
        raise HubEntryNotFound(f"{what}: file not found") from None
    except hfe.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubAuthError(f"{what}: the Hub refused the token (HTTP {status})") from None
        raise HubError(f"{what}: HTTP {status}: {str(e).splitlines()[0]}") from None
    except OSError as e:  # connection refused, DNS, ...
        raise HubUnreachable(f"{what}: {e.strerror or e}") from None
    except Exception as e:  # the transport library's own connection errors
        if "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
            raise HubUnreachable(f"{what}: {e}") from None
        raise


def remote_file_missing(e: BaseException) -> bool:
    """The Hub answered that a file does not exist (not: the Hub could not be reached)."""
    from huggingface_hub import errors as hfe

    return isinstance(e, hfe.EntryNotFoundError) and not isinstance(e, hfe.LocalEntryNotFoundError)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- index and card -------------------------------------------------------------------------------
def index_entry(path: Path, name: str) -> dict[str, Any]:
    """The index record of a verified compeft file."""
    with CompeftFile(path) as f:
        m = f.verify()
        meta = f.metadata
    return {
        "path": name,
        "sha256": file_sha256(path),
        "size": path.stat().st_size,
        "format_version": meta[C.META_VERSION],
        "manifest_sha256": meta[C.META_MANIFEST_SHA256],
        "adapter_kind": m.adapter.kind,
        "peft_type": (m.adapter.peft_config or {}).get("peft_type"),
        "representation": m.adapter.representation,
        "base_model": {"id": m.base_model.id, "revision": m.base_model.revision,
                       "fingerprint": m.base_model.fingerprint},
    }


def parse_index(text: str, what: str) -> dict[str, Any]:
    try:
        index = json.loads(text)
    except ValueError:
        raise HubNoIndex(f"{what}: {C.HUB_INDEX_FILE} is not JSON") from None
    arts = index.get("artifacts") if isinstance(index, dict) else None
    if not isinstance(index, dict) or index.get("format") != C.FORMAT_NAME or not isinstance(arts, list) or not all(
            isinstance(a, dict) and isinstance(a.get("path"), str) and isinstance(a.get("sha256"), str)
            and isinstance(a.get("size"), int) for a in arts):
        raise HubNoIndex(f"{what}: {C.HUB_INDEX_FILE} is not a compeft index")
    for a in arts:
        p = a["path"]
        if not p or p.startswith("/") or ".." in p.split("/") or p == C.HUB_INDEX_FILE:
            raise HubNoIndex(f"{what}: index names an unsafe path {p!r}")
    return index


def model_card(repo_id: str, entries: Sequence[dict[str, Any]], reports: Sequence[dict[str, Any]]) -> str:
    """README.md with YAML front matter (library_name, base_model, tags) and the sizes."""
    kinds = sorted({e["adapter_kind"] for e in entries if e["adapter_kind"] != "other"})
    bases = sorted({e["base_model"]["id"] for e in entries if e["base_model"]["id"]})
    tags = ["compeft", *kinds]
    if any(r["compression"].get("mode") == C.MODE_TERNARY for r in reports):
        tags.append("ternary")
    lines = ["---", "library_name: compeft"]
    if len(bases) == 1:
        lines.append(f"base_model: {bases[0]}")
    elif bases:
        lines += ["base_model:"] + [f"- {b}" for b in bases]
    lines += ["tags:"] + [f"- {t}" for t in tags] + ["---", "", f"# {repo_id.split('/')[-1]}", "",
              f"Compressed fine-tuning adapter(s) in the compeft format {C.FORMAT_VERSION} "
              "(ComPEFT: sparse ternary task vectors). Every file is a safetensors file with sha256 digests of all "
              f"its streams; `{C.HUB_INDEX_FILE}` lists each file's sha256 and the base model it belongs to.", "",
              "| file | params | bytes | bits/param | smaller than fp16 | density | alpha | base model |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for e, r in zip(entries, reports, strict=True):
        c = r["compression"]
        lines.append(f"| {e['path']} | {r['params']:,} | {r['file_bytes']:,} | {r['bits_per_param']:.3f} "
                     f"| {r['ratio_vs_fp16']:.1f}x | {c.get('density')} | {c.get('alpha')} "
                     f"| {e['base_model']['id'] or '-'} |")
    lines += ["", "```python", "import compeft_format as cf", "",
              f'files = cf.pull("{repo_id}")           # downloads, checks every byte',
              "model = cf.load_adapter(base_model, files.paths[0])", "```", "",
              f"Written by compeft {__version__}.", ""]
    return "\n".join(lines)


# --- push -----------------------------------------------------------------------------------------
@dataclass
class PushResult:
    repo_id: str
    commit: str
    url: str
    files: list[str]


def push(paths: str | os.PathLike | Sequence[str | os.PathLike], repo_id: str, *, revision: str | None = None,
         private: bool = False, message: str | None = None, endpoint: str | None = None,
         token: str | None = None) -> PushResult:
    """Upload compressed file(s) to ``repo_id`` in one commit, with a model card, the adapter's
    ``adapter_config.json`` (when the file carries one) and an updated ``compeft-index.json``.

    Files are verified before anything is sent; the repository (and the branch ``revision``) is
    created when missing.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

    files = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not files:
        raise InvalidArgument("nothing to push")
    entries = [index_entry(p, p.name) for p in files]
    reports = [inspect(p) for p in files]
    api = HfApi(endpoint=_endpoint(endpoint), token=token)
    what = f"push to {repo_id}"
    with hub_errors(what):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        configs = []
        for p in files:
            with CompeftFile(p) as f:
                configs.append(f.manifest.adapter.peft_config)
        for attempt in range(PUSH_ATTEMPTS):
            # The index is merged with the one at the branch head, and the commit names that head
            # as its parent: a push that lands in between makes the server refuse this commit
            # (412), and the merge is done again on the new head.
            head = api.model_info(repo_id, revision=revision or "main").sha
            merged: dict[str, dict[str, Any]] = {}
            try:
                old = hf_hub_download(repo_id, C.HUB_INDEX_FILE, revision=head, endpoint=_endpoint(endpoint),
                                      token=token)
                merged = {a["path"]: a for a in parse_index(Path(old).read_text(), what)["artifacts"]}
            except HubNoIndex:
                merged = {}
            except Exception as e:  # no index yet: the usual case for a new repository
                if not remote_file_missing(e):
                    raise
            merged.update({e["path"]: e for e in entries})
            index = {"format": C.FORMAT_NAME, "index_version": C.HUB_INDEX_VERSION,
                     "artifacts": sorted(merged.values(), key=lambda a: a["path"])}
            ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
            ops.append(CommitOperationAdd(C.HUB_INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode()))
            ops.append(CommitOperationAdd("README.md", model_card(repo_id, entries, reports).encode()))
            if len(files) == 1 and configs[0] is not None:
                ops.append(CommitOperationAdd(ADAPTER_CONFIG,
                                              json.dumps(configs[0], indent=2, sort_keys=True).encode()))
            try:
                info = api.create_commit(repo_id, operations=ops, revision=revision, parent_commit=head,
                                         commit_message=message or f"Upload {', '.join(p.name for p in files)} with compeft")
                break
            except Exception as e:
                status = getattr(getattr(e, "response", None), "status_code", None)
                if status not in (409, 412) or attempt == PUSH_ATTEMPTS - 1:
                    raise
    return PushResult(repo_id=repo_id, commit=info.oid, url=info.commit_url, files=[p.name for p in files])


# --- pull -----------------------------------------------------------------------------------------
@dataclass
class PullResult:
    repo_id: str
    commit: str
    paths: list[Path]
    index: dict[str, Any] = field(default_factory=dict)


def split_repo(spec: str) -> tuple[str, str | None]:
    """``user/repo@revision`` -> (``user/repo``, ``revision``)."""
    repo, _, rev = spec.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise InvalidArgument(f"repository must be namespace/name[@revision], got {spec!r}")
    return repo, (rev or None)


def pull(repo: str, *, revision: str | None = None, local_dir: str | os.PathLike | None = None,
         to_peft: bool = False, base_fingerprint: dict[str, str] | None = None, base_model: str | None = None,
         endpoint: str | None = None, token: str | None = None,
         cache_dir: str | os.PathLike | None = None) -> PullResult:
    """Download a compeft repository's artifacts and verify every byte before returning them.

    The index is read first and every artifact is downloaded from the same commit; each file's
    sha256 and size must equal the index's, and each must pass full verification. With
    ``base_fingerprint`` / ``base_model`` the artifacts must be bound to that base. With
    ``local_dir`` the verified files (or, with ``to_peft``, PEFT folders) are written there, each
    atomically; nothing is written when a check fails.

    Raises:
        HubRepoNotFound, HubRevisionNotFound, HubNoIndex, HubAuthError, HubUnreachable,
        ArtifactDigestMismatch, BaseMismatch, and the file errors of ``verify``.
    """
    from huggingface_hub import hf_hub_download

    repo_id, rev = split_repo(repo)
    rev = revision or rev
    what = f"{repo_id}@{rev or 'main'}"
    kw = {"endpoint": _endpoint(endpoint), "token": token, "cache_dir": cache_dir}
    with hub_errors(what):
        try:
            index_path = hf_hub_download(repo_id, C.HUB_INDEX_FILE, revision=rev, **kw)
        except Exception as e:
            if remote_file_missing(e):
                raise HubNoIndex(f"{what}: the repository holds no {C.HUB_INDEX_FILE}") from None
            raise
        commit = Path(index_path).parent.name
        index = parse_index(Path(index_path).read_text(), what)
        local: list[Path] = []
        adapters: list[tuple[dict[str, Any], dict[str, Any] | None]] = []  # decoded, for to_peft
        for art in index["artifacts"]:
            p = Path(hf_hub_download(repo_id, art["path"], revision=commit, **kw))
            actual, size = file_sha256(p), p.stat().st_size
            if actual != art["sha256"] or size != art["size"]:
                with contextlib.suppress(OSError):
                    p.resolve().unlink()  # let a later pull download it again
                raise ArtifactDigestMismatch(f"{art['path']}: sha256 is {actual}, the index declares "
                                             f"{art['sha256']} ({size} bytes, index {art['size']})")
            with CompeftFile(p) as f:
                if to_peft and local_dir is not None:  # verified while decoded, decoded once
                    adapters.append((f.state_dict(verify=True), f.manifest.adapter.peft_config))
                else:
                    f.verify()
                m = f.manifest
            _check_binding(art["path"], m, base_fingerprint, base_model)
            local.append(p)
    if local_dir is not None:
        out = Path(local_dir)
        out.mkdir(parents=True, exist_ok=True)
        dests = [out if to_peft and len(local) == 1 else out / (peft_folder(a["path"]) if to_peft else a["path"])
                 for a in index["artifacts"]]
        if len(set(dests)) != len(dests):
            raise HubNoIndex(f"{what}: two artifacts would be written to the same place in {out}")
        written = []
        for k, (p, dest) in enumerate(zip(local, dests, strict=True)):
            if to_peft:  # one adapter: the folder itself; several: a folder per file
                write_peft_folder(dest, *adapters[k])
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(dest, lambda tmp, src=p: shutil.copyfile(src, tmp))
            written.append(dest)
        if not to_peft:
            atomic_write(out / C.HUB_INDEX_FILE, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))
        local = written
    return PullResult(repo_id=repo_id, commit=commit, paths=local, index=index)


def peft_folder(path: str) -> str:
    """Folder for an artifact written as a PEFT adapter: its path without the file suffix."""
    for suffix in (".cpeft.safetensors", ".safetensors"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path + ".peft"


def _check_binding(name: str, manifest, base_fingerprint: dict[str, str] | None, base_model: str | None) -> None:
    if base_model is not None and manifest.base_model.id != base_model:
        raise BaseMismatch(f"{name} was made for {manifest.base_model.id or 'an unnamed base model'}, "
                           f"not {base_model}")
    if base_fingerprint is not None:
        fp = manifest.base_model.fingerprint
        if not fp or fp.get("value") != base_fingerprint.get("value"):
            raise BaseMismatch(f"{name} is not bound to the given base model "
                               f"(file: {(fp or {}).get('value', 'no fingerprint')[:16]}...)")


__all__ = ["push", "pull", "PushResult", "PullResult", "split_repo", "hub_errors", "model_card"]
