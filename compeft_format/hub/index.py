"""``compeft-index.json`` (spec section 12): the list of a repository's artifacts, each with its
sha256, size, what it is and the base model it is bound to.

An index comes from the network and is hostile until checked: ``Index.parse`` refuses anything
that is not exactly an index (``HubNoIndex``), including paths that could leave the folder a
download is written into.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .. import constants as C
from ..binding import BaseBinding
from ..errors import HubNoIndex, InvalidArgument, ManifestError, RequirementMissing
from ..jsonfields import HEX64
from ..manifest import Requirement
from ..reader import CompeftFile
from .paths import valid_repo_path

#: What an artifact can be, with the line a model card gives it. A new kind is one entry here; a
#: file whose ``adapter.kind`` is a kind of this table is an artifact of that kind, any other an
#: ``adapter`` (spec 12).
ARTIFACT_KINDS: dict[str, str] = {
    "adapter": "a compressed adapter (LoRA, (IA)3 or a full fine-tuning delta)",
    C.ADAPTER_KIND_RECOVERY: "recovery modules: non-linear low-rank bypasses beside the linear layers of a "
                             "compressed base model, trained to recover what compressing it lost (CA-LoRA); "
                             "applied before the adapters that require them, never merged",
}
DEFAULT_KIND = "adapter"


def artifact_kind(adapter_kind: str) -> str:
    """The artifact kind of a file whose manifest's ``adapter.kind`` is ``adapter_kind``."""
    return adapter_kind if adapter_kind in ARTIFACT_KINDS else DEFAULT_KIND
#: Most artifacts one index may list.
MAX_ARTIFACTS = 10_000

def safe_path(path: Any) -> bool:
    """A path ``paths.valid_repo_path`` accepts that also holds no colon (a drive on Windows) and
    is not the index itself: safe to write below an output folder."""
    return valid_repo_path(path) and ":" not in path and path != C.HUB_INDEX_FILE


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose member names are all different (two readers could otherwise take
    different values of one name)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate member name")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


@dataclass(frozen=True)
class IndexEntry:
    """One artifact of a repository."""

    path: str
    sha256: str
    size: int
    format_version: str | None = None
    manifest_sha256: str | None = None
    #: the manifest's ``adapter.kind`` (lora, ia3, full, recovery, other)
    adapter_kind: str | None = None
    peft_type: str | None = None
    representation: str | None = None
    base_model: BaseBinding = field(default_factory=BaseBinding)
    #: what the artifact is (``ARTIFACT_KINDS``)
    kind: str = DEFAULT_KIND
    #: paths of artifacts of the same index that must be applied before this one: those whose
    #: ``manifest_sha256`` the file's ``requires`` names, in its order
    requires: tuple[str, ...] = ()
    #: path of the artifact's detached signature (``<path>.sig``, ``signing``), when it has one
    signature: str | None = None
    #: members of the entry this version does not know, kept as they were
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, f: CompeftFile, path: str, *, sha256: str, kind: str | None = None,
           requires: tuple[str, ...] = (), signature: str | None = None) -> IndexEntry:
        """The entry of an open, verified compeft file stored at ``path`` in the repository; its
        ``kind`` by default from the manifest (``artifact_kind``). ``requires`` are index paths
        (``Index.link`` finds them from the file's own ``requires``)."""
        m = f.manifest
        kind = artifact_kind(m.adapter.kind) if kind is None else kind
        if kind not in ARTIFACT_KINDS:
            raise InvalidArgument(f"unknown artifact kind {kind!r}; the kinds are {sorted(ARTIFACT_KINDS)}")
        return cls(path=path, sha256=sha256, size=f.size, format_version=f.metadata[C.META_VERSION],
                   manifest_sha256=f.metadata[C.META_MANIFEST_SHA256], adapter_kind=m.adapter.kind,
                   peft_type=(m.adapter.peft_config or {}).get("peft_type"), representation=m.adapter.representation,
                   base_model=m.base_model, kind=kind, requires=tuple(requires), signature=signature)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {**self.extra, "path": self.path, "sha256": self.sha256, "size": self.size,
                             "format_version": self.format_version, "manifest_sha256": self.manifest_sha256,
                             "adapter_kind": self.adapter_kind, "peft_type": self.peft_type,
                             "representation": self.representation, "base_model": self.base_model.to_json(),
                             "kind": self.kind}
        if self.requires:
            d["requires"] = list(self.requires)
        if self.signature is not None:
            d["signature"] = self.signature
        return d

    @classmethod
    def from_json(cls, obj: Any, what: str) -> IndexEntry:
        if not isinstance(obj, dict):
            raise HubNoIndex(f"{what}: an index entry is not an object")
        path = obj.get("path")
        if not safe_path(path):
            raise HubNoIndex(f"{what}: index names an unsafe path {path!r}")
        assert isinstance(path, str)
        sha, size = obj.get("sha256"), obj.get("size")
        if not isinstance(sha, str) or HEX64.fullmatch(sha) is None:
            raise HubNoIndex(f"{what}: index entry {path!r} has no sha256 of 64 lowercase hex digits")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise HubNoIndex(f"{what}: index entry {path!r} has no size")
        text = {k: obj.get(k) for k in ("format_version", "manifest_sha256", "adapter_kind", "peft_type",
                                         "representation")}
        kind = obj.get("kind", DEFAULT_KIND)
        requires = obj.get("requires", [])
        if not all(v is None or isinstance(v, str) for v in text.values()) or not isinstance(kind, str):
            raise HubNoIndex(f"{what}: index entry {path!r} has fields of the wrong type")
        if not isinstance(requires, list) or not all(safe_path(r) for r in requires):
            raise HubNoIndex(f"{what}: index entry {path!r} requires unsafe or malformed paths")
        signature = obj.get("signature")
        if signature is not None and (signature != path + C.SIGNATURE_SUFFIX or not safe_path(signature)):
            raise HubNoIndex(f"{what}: index entry {path!r} names a signature other than {path + C.SIGNATURE_SUFFIX!r}")
        try:
            base = BaseBinding.from_json(obj.get("base_model") or {}, "base_model")
        except ManifestError as e:
            raise HubNoIndex(f"{what}: index entry {path!r}: {e}") from None
        extra = {k: v for k, v in obj.items() if k not in _KNOWN}
        return cls(path=path, sha256=sha, size=size, base_model=base, kind=kind, requires=tuple(requires),
                   signature=signature, extra=extra, **text)


_KNOWN = frozenset(f.name for f in fields(IndexEntry)) - {"extra"}


@dataclass
class Index:
    """A repository's ``compeft-index.json``."""

    artifacts: list[IndexEntry] = field(default_factory=list)

    def to_json(self) -> str:
        body = {"format": C.FORMAT_NAME, "index_version": C.HUB_INDEX_VERSION,
                "artifacts": [a.to_json() for a in sorted(self.artifacts, key=lambda a: a.path)]}
        return json.dumps(body, indent=2) + "\n"

    def merged(self, entries: list[IndexEntry]) -> Index:
        """This index with ``entries`` added, replacing any of the same paths."""
        by_path = {a.path: a for a in self.artifacts}
        by_path.update({e.path: e for e in entries})
        return Index(sorted(by_path.values(), key=lambda a: a.path))

    def link(self, new: Sequence[tuple[IndexEntry, Sequence[Requirement]]]) -> Index:
        """This index with the ``new`` entries added (``merged``), each entry's ``requires`` the
        paths of the artifacts whose manifest digests its file's requirements (``Requirement``)
        name: an entry of ``new`` first, else one of this index.

        Raises:
            RequirementMissing: a requirement neither among ``new`` nor in this index, or a new
                entry that replaces, with other content, an artifact another entry requires.
        """
        replaced = {e.path for e, _ in new}
        kept = [a for a in self.artifacts if a.path not in replaced]
        by_digest: dict[str, str] = {}
        for e in sorted((e for e, _ in new), key=lambda e: e.path) + sorted(kept, key=lambda a: a.path):
            if e.manifest_sha256 is not None:
                by_digest.setdefault(e.manifest_sha256, e.path)
        linked = []
        for e, reqs in new:
            paths = []
            for req in reqs:
                path = by_digest.get(req.manifest_sha256)
                if path is None:
                    raise RequirementMissing(f"{e.path} requires the {req.kind} artifact {req.name or ''} (manifest "
                                             f"sha256 {req.manifest_sha256}), which is neither in this push nor in the "
                                             "repository: push it too", manifest_sha256=req.manifest_sha256,
                                             kind=req.kind, name=req.name, path=e.path)
                paths.append(path)
            linked.append(replace(e, requires=tuple(paths)))
        old = {a.path: a for a in self.artifacts}
        now = {e.path: e for e in linked}
        for a in kept:
            for path in a.requires:
                if path in now and now[path].manifest_sha256 != getattr(old.get(path), "manifest_sha256", None):
                    raise RequirementMissing(f"pushing {path} would replace the artifact {a.path} requires with other "
                                             "content; push it under another name", path=path,
                                             manifest_sha256=getattr(old.get(path), "manifest_sha256", None))
        return self.merged(linked)

    @classmethod
    def parse(cls, data: bytes | str, what: str) -> Index:
        """Check and parse an index from the network (``HubNoIndex`` on anything else)."""
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else data
            obj = json.loads(text, object_pairs_hook=_unique_members, parse_constant=_no_constant)
            # a lone surrogate (an escape JSON allows) cannot be written back out as UTF-8
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except (UnicodeError, ValueError, RecursionError):
            raise HubNoIndex(f"{what}: {C.HUB_INDEX_FILE} is not strict UTF-8 JSON (duplicate members, "
                             "NaN or Infinity, and lone surrogates are refused)") from None
        arts = obj.get("artifacts") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or obj.get("format") != C.FORMAT_NAME or not isinstance(arts, list):
            raise HubNoIndex(f"{what}: {C.HUB_INDEX_FILE} is not a compeft index")
        if len(arts) > MAX_ARTIFACTS:
            raise HubNoIndex(f"{what}: the index lists {len(arts)} artifacts, more than {MAX_ARTIFACTS}")
        entries = [IndexEntry.from_json(a, what) for a in arts]
        paths = [e.path for e in entries]
        if len(set(paths)) != len(paths):
            raise HubNoIndex(f"{what}: the index lists a path twice")
        if set(paths) & {e.signature for e in entries}:
            raise HubNoIndex(f"{what}: the index names an artifact's signature as an artifact")
        unlisted = sorted({r for e in entries for r in e.requires} - set(paths))
        if unlisted:
            raise HubNoIndex(f"{what}: an index entry requires {unlisted[0]!r}, which the index does not list")
        return cls(entries)


__all__ = ["ARTIFACT_KINDS", "DEFAULT_KIND", "MAX_ARTIFACTS", "IndexEntry", "Index", "artifact_kind", "safe_path"]
