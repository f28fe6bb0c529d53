"""Hub repositories where a local path is expected: ``compress``, ``inspect``, ``validate`` and
``load_adapter`` take ``namespace/name[@revision]`` or ``hf://namespace/name[@revision][/path]``.

A path that exists on this machine is always local. A compeft repository (one with
``compeft-index.json``) is read with ``pull``: every artifact's sha256 and size checked against the
index and every file verified. Another repository is read as a PEFT adapter:
``adapter_config.json`` and ``adapter_model.safetensors`` (or, with a path, the folder or
``.safetensors`` file it names), each bounded in size, downloaded from the one commit the server
names, into the same cache as ``pull`` (``hub.download``, under ``$HF_HOME/compeft``). Nothing is
ever unpickled: a repository with only ``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import HubEntryNotFound, HubNoIndex, HubUnreachable, InvalidArgument
from . import download as dl

HF_SCHEME = "hf://"
#: ``namespace/name`` with an optional ``@revision``
REPO_SPEC = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")
#: the largest adapter file read from a repository without an index (no digest bounds it)
MAX_ADAPTER_BYTES = 32 << 30
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class HubRef:
    """A reference to a Hub repository, and to a file or folder of it."""

    repo_id: str
    revision: str
    path: str | None = None

    def __str__(self) -> str:
        return f"hf://{self.repo_id}@{self.revision}" + (f"/{self.path}" if self.path else "")


#: endings of local file names: ``dir/name.cpeft.safetensors`` that does not exist is a mistyped
#: path, not a repository (``hf://`` names a repository whatever its name)
LOCAL_SUFFIXES = (".safetensors", ".cpeft", ".json", ".bin", ".pt", ".pth", ".gguf", ".sig")


def _local_looking(text: str) -> bool:
    """A ``namespace/name`` that is meant as a local path: its name ends as a file's does, or its
    namespace is a folder here."""
    return text.partition("@")[0].lower().endswith(LOCAL_SUFFIXES) or os.path.isdir(text.split("/", 1)[0])


def parse(spec: str | os.PathLike[str]) -> HubRef | None:
    """The Hub reference ``spec`` names, or None when it is a local path (any path that exists
    here, a name that ends as a file's does or whose first part is a folder here, and anything
    that is not ``namespace/name[@rev]`` or an ``hf://`` path).

    Raises:
        InvalidArgument: an ``hf://`` path that does not name a model repository.
    """
    text = os.fspath(spec)
    if text.startswith(HF_SCHEME):
        parts = text[len(HF_SCHEME):].split("/")
        if parts[0] in ("datasets", "spaces") or len(parts) < 2 or not all(parts[:2]):
            raise InvalidArgument(f"{text}: an hf:// path names a model repository, hf://namespace/name[@rev][/path]")
        name, _, rev = parts[1].partition("@")
        path = "/".join(parts[2:]) or None
        if path is not None and any(p in ("", ".", "..") for p in path.split("/")):
            raise InvalidArgument(f"{text}: the path in the repository must be plain names")
        ref = HubRef(f"{parts[0]}/{name}", rev or "main", path)
    elif os.path.lexists(text) or not REPO_SPEC.fullmatch(text) or _local_looking(text):
        return None
    else:
        repo, _, rev = text.partition("@")
        ref = HubRef(repo, rev or "main")
    dl.check_repo_id(ref.repo_id)
    return ref


def artifacts(ref: HubRef, *, endpoint: str | None = None, token: str | None = None,
              cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The verified compeft files of a compeft repository (``pull``), in the cache: all of them,
    or the one ``ref.path`` names.

    Raises:
        HubNoIndex: the repository is not a compeft repository. HubEntryNotFound: no artifact at
        ``ref.path``. And the errors of ``pull``.
    """
    from .client import pull

    try:
        res = pull(f"{ref.repo_id}@{ref.revision}", endpoint=endpoint, token=token, cache_dir=cache_dir)
    except HubNoIndex as e:
        raise HubNoIndex(f"{e}. {ref.repo_id} is not a compeft repository: a PEFT adapter there loads with "
                         f"peft.PeftModel.from_pretrained, or compress it first (compeft compress {ref.repo_id} -o "
                         "NAME.cpeft.safetensors)", repo_id=e.repo_id, revision=e.revision, status=e.status) from None
    if ref.path is None:
        return list(res.paths)
    chosen = [p for p, a in zip(res.paths, res.index.artifacts, strict=True) if a.path == ref.path]
    if not chosen:
        raise HubEntryNotFound(f"{ref}: the repository's index lists no artifact {ref.path!r} (it lists "
                               f"{', '.join(a.path for a in res.index.artifacts)})", repo_id=ref.repo_id,
                               revision=ref.revision)
    return chosen


def local(spec: str | os.PathLike[str], *, endpoint: str | None = None, token: str | None = None,
          cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Local paths for ``spec``: itself when it is local; a compeft repository's verified
    artifacts; else a PEFT adapter (or ``.safetensors`` file) downloaded into the cache."""
    ref = parse(spec)
    if ref is None:
        return [Path(spec)]
    try:
        return artifacts(ref, endpoint=endpoint, token=token, cache_dir=cache_dir)
    except HubNoIndex:
        return [adapter(ref, endpoint=endpoint, token=token, cache_dir=cache_dir)]


def adapter(ref: HubRef, *, endpoint: str | None = None, token: str | None = None,
            cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A PEFT adapter of a repository without a compeft index, in the cache: the folder holding
    ``adapter_config.json`` and ``adapter_model.safetensors`` (at the top, or in the folder
    ``ref.path`` names), or the ``.safetensors`` file ``ref.path`` names. The first file fixes the
    commit the others are read from.

    Raises:
        HubEntryNotFound: the repository holds no such adapter (or only ``adapter_model.bin``,
        which would have to be unpickled). And the errors of ``hub.download``.
    """
    url = dl.endpoint_url(endpoint)
    cache = dl.HubCache(cache_dir, url)
    what = str(ref)
    single = ref.path is not None and ref.path.endswith(".safetensors")
    prefix = "" if ref.path is None or single else ref.path.rstrip("/") + "/"
    wanted = [(ref.path or "", MAX_ADAPTER_BYTES)] if single else [
        (prefix + "adapter_config.json", MAX_CONFIG_BYTES), (prefix + "adapter_model.safetensors", MAX_ADAPTER_BYTES)]
    commit = cache.cached_commit(ref.repo_id, ref.revision) if dl.offline() else None
    if dl.offline() and commit is None:
        raise HubUnreachable(f"{what}: not in the cache, and HF_HUB_OFFLINE is set", repo_id=ref.repo_id,
                             revision=ref.revision)
    for name, limit in wanted:
        at = ref.revision if commit is None else commit
        dest = (cache.snapshot(ref.repo_id, commit) / name) if commit is not None else None
        if dest is not None and dest.is_file():
            continue
        if dl.offline():
            raise HubUnreachable(f"{what}: {name} is not in the cache, and HF_HUB_OFFLINE is set",
                                 repo_id=ref.repo_id, revision=ref.revision)
        try:
            got = dl.fetch(dl.resolve_url(url, ref.repo_id, at, name), cache.repo(ref.repo_id) / "downloading",
                           max_bytes=limit, token=token, what=f"{what}: {name}", repo_id=ref.repo_id,
                           revision=ref.revision)
        except HubEntryNotFound:
            hint = (" (it may hold adapter_model.bin, which is a pickle and is not read)"
                    if name.endswith("adapter_model.safetensors") else "")
            raise HubEntryNotFound(f"{what}: no {name} in the repository{hint}", repo_id=ref.repo_id,
                                   revision=ref.revision) from None
        try:
            named = dl.checked_commit(got.commit, what, ref.repo_id, ref.revision)
            if commit is not None and named != commit:
                raise HubUnreachable(f"{what}: the repository moved to another commit while it was read; try again",
                                     repo_id=ref.repo_id, revision=ref.revision)
        except BaseException:
            dl.discard(got.path)
            raise
        commit = named
        dl.install(got, cache.snapshot(ref.repo_id, commit) / name)
    assert commit is not None
    cache.remember(ref.repo_id, ref.revision, commit)
    snap = cache.snapshot(ref.repo_id, commit)
    return snap / (ref.path or "") if single else snap / prefix if prefix else snap


__all__ = ["HubRef", "parse", "local", "artifacts", "adapter", "HF_SCHEME", "MAX_ADAPTER_BYTES"]
