"""The manifest (spec sections 2.2, 2.4, 3): the JSON document in ``__metadata__["compeft.manifest"]``,
how the metadata stores it, and the rules that make it valid.

Dataclasses mirror the JSON one to one. ``Manifest.from_dict`` is the only place that validates a
manifest's structure; unknown fields are ignored, as the spec requires for optional additions.
What an encoding's parameters, streams and sizes must be is asked of that encoding's rules
(``EncodingRules``, implemented by the codecs), which the caller passes in: the manifest knows
the JSON, the codecs know the encodings.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import zstandard

from . import constants as C
from .binding import BaseBinding
from .budget import Budget, resolve
from .errors import (
    InvalidArgument,
    LimitExceeded,
    ManifestDigestMismatch,
    ManifestError,
    NotCompeft,
    StreamCorrupt,
    UnknownEncoding,
    UnsupportedFeature,
    VersionError,
)
from .framing import frame, unframe
from .integrity import sha256_hex
from .jsonfields import (
    HEX64,
    as_f32,
    as_finite,
    as_hex64,
    as_int,
    as_list,
    as_object,
    as_opt_number,
    as_opt_str,
    as_str,
    loads,
    utf8_len,
)
from .recovery import RecoveryConfig
from .recovery import layout as recovery_layout


# ---------------------------------------------------------------------------------------------
# tensors, groups, streams
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorDescription:
    """What one decoded tensor is (spec 3.2): its name, shape and target dtype, how many entries
    it keeps, and the scale and offset of its values. The manifest's ``TensorInfo`` adds where it
    is stored; ``compressed.CompressedTensor`` adds its payload."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nnz: int
    scale: float | None = None
    offset: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, kw_only=True)
class TensorInfo(TensorDescription):
    """A tensor object of the manifest: the description, its group and optionally its digest."""

    group: int
    #: sha256 of the decoded tensor (spec 7.3)
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "group": self.group,
                             "nnz": self.nnz}
        if self.scale is not None:
            d["scale"] = self.scale
        if self.offset != 0.0:
            d["offset"] = self.offset
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        return d


@dataclass(frozen=True)
class StreamInfo:
    """One payload stream: a U8 tensor of the safetensors file."""

    name: str
    compression: str
    size: int
    raw_size: int
    sha256: str


@dataclass
class GroupInfo:
    """A run of tensors coded together: their elements, concatenated in manifest order, form one
    sequence that the group's encoding stores in its streams."""

    encoding: str
    params: dict[str, Any]
    streams: dict[str, StreamInfo]
    #: sha256 of the members' decoded tensors, concatenated in member order (spec 7.3)
    decoded_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"encoding": self.encoding, "params": dict(self.params),
                             "streams": {r: vars(s).copy() for r, s in self.streams.items()}}
        if self.decoded_sha256 is not None:
            d["decoded_sha256"] = self.decoded_sha256
        return d


class EncodingRules(Protocol):
    """What the manifest needs to know about an encoding (spec 3.2, 3.3, 8.4); each codec
    provides it."""

    @property
    def member_scale(self) -> bool:
        """Members carry a ``scale`` (required); members of other encodings must not."""
        ...

    @property
    def member_offset(self) -> bool:
        """Members may carry a non-zero ``offset``."""
        ...

    @property
    def every_element(self) -> bool:
        """Every element is an entry: ``nnz == numel``."""
        ...

    def parse_params(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        """The group's ``params``, checked; a missing or unknown required parameter raises
        ``UnknownEncoding``."""
        ...

    def roles(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The group's stream roles, in order."""
        ...

    def raw_sizes(self, params: Mapping[str, Any], members: Sequence[TensorDescription]) -> dict[str, tuple[int, bool]]:
        """Per role: (raw size implied by the shapes and counts, exact); ``exact`` False means
        the size is an upper bound."""
        ...


Encodings = Mapping[str, EncodingRules]


# ---------------------------------------------------------------------------------------------
# descriptive objects (spec 3.5)
# ---------------------------------------------------------------------------------------------
@dataclass
class AdapterInfo:
    kind: str = C.ADAPTER_KIND_OTHER
    representation: str = C.REPRESENTATION_WEIGHTS
    peft_config: dict[str, Any] | None = None
    #: (1.4) the configuration of a recovery artifact's modules (spec 3.6), written when not None;
    #: read from a file, its ``target_modules`` are the modules the tensors name
    recovery: RecoveryConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "representation": self.representation,
                             "peft_config": self.peft_config}
        if self.recovery is not None:
            d["recovery"] = self.recovery.to_json()
        return d


@dataclass
class CompressionInfo:
    method: str = C.METHOD_NONE
    density: float | None = None
    alpha: float | None = None
    scope: str | None = None
    mode: str | None = None
    reference: str | None = None
    sigma: float | None = None
    candidates: int = 0
    kept: int = 0
    #: how the writer refined the method (informative, written when not None): ``balance``,
    #: ``scale``, ``refit`` (spec 6.6)
    options: dict[str, Any] | None = None
    #: what the writer measured of the result (informative): ``relative_error`` of the adapter's
    #: weight update, ``modules`` and ``emptied`` (spec 6.6)
    fidelity: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = vars(self).copy()
        for optional in ("options", "fidelity"):
            if d[optional] is None:
                del d[optional]
        return d


@dataclass
class ProvenanceInfo:
    tool: str = ""
    created_at: str | None = None
    source: str | None = None
    #: (1.4) how the artifact was trained (informative, any members; written when not None)
    training: dict[str, Any] | None = None
    #: (1.5) the safetensors ``__metadata__`` of a single-file source, string to string
    #: (informative; written when not None)
    source_metadata: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tool": self.tool, "created_at": self.created_at, "source": self.source}
        if self.training is not None:
            d["training"] = self.training
        if self.source_metadata is not None:
            d["source_metadata"] = self.source_metadata
        return d


@dataclass(frozen=True)
class Requirement:
    """(1.4) An artifact that must be applied before the one that lists it (``requires``, spec
    3.6), named by its ``compeft.manifest_sha256``. ``kind`` is its ``adapter.kind``; ``name``
    (its file name, as a rule) helps find it and is not trusted: the digest decides.

    Raises:
        InvalidArgument: ``kind`` not a string, ``manifest_sha256`` not 64 lowercase hex digits,
            ``name`` neither a string nor None.
    """

    kind: str
    manifest_sha256: str
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str):
            raise InvalidArgument(f"a requirement's kind must be a string, got {self.kind!r}")
        if not isinstance(self.manifest_sha256, str) or HEX64.fullmatch(self.manifest_sha256) is None:
            raise InvalidArgument(f"a requirement's manifest_sha256 must be 64 lowercase hex digits, got "
                                  f"{self.manifest_sha256!r}")
        if self.name is not None and not isinstance(self.name, str):
            raise InvalidArgument(f"a requirement's name must be a string or None, got {self.name!r}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "manifest_sha256": self.manifest_sha256, "name": self.name}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Requirement:
        o = as_object(obj, where)
        return cls(kind=as_str(o.get("kind"), f"{where}.kind"),
                   manifest_sha256=as_hex64(o.get("manifest_sha256"), f"{where}.manifest_sha256"),
                   name=as_opt_str(o.get("name"), f"{where}.name"))


# ---------------------------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------------------------
@dataclass
class Manifest:
    tensors: list[TensorInfo]
    groups: list[GroupInfo]
    adapter: AdapterInfo = field(default_factory=AdapterInfo)
    base_model: BaseBinding = field(default_factory=BaseBinding)
    compression: CompressionInfo = field(default_factory=CompressionInfo)
    provenance: ProvenanceInfo = field(default_factory=ProvenanceInfo)
    library_version: str = ""
    required_features: list[str] = field(default_factory=list)
    #: (1.4) artifacts to apply before this one (spec 3.6), written when not empty
    requires: list[Requirement] = field(default_factory=list)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {
            "tensors": [t.to_dict() for t in self.tensors],
            "groups": [g.to_dict() for g in self.groups],
            "adapter": self.adapter.to_dict(),
            "base_model": self.base_model.to_json(),
            "compression": self.compression.to_dict(),
            "provenance": self.provenance.to_dict(),
            "library_version": self.library_version,
            "required_features": list(self.required_features),
        }
        if self.requires:
            d["requires"] = [r.to_json() for r in self.requires]
        return d

    @property
    def format_version(self) -> str:
        """The version a writer gives a file of this manifest (spec 8.1): 1.5 when it uses the
        member 1.5 added (``provenance.source_metadata``), else 1.4 when it uses one 1.4 added (a
        recovery artifact, ``requires``, ``provenance.training``), else 1.3."""
        if self.provenance.source_metadata is not None:
            return C.FORMAT_VERSION
        uses = (self.adapter.kind == C.ADAPTER_KIND_RECOVERY or self.adapter.recovery is not None
                or bool(self.requires) or self.provenance.training is not None)
        return C.FORMAT_VERSION_RECOVERY if uses else C.FORMAT_VERSION_WITHOUT_RECOVERY

    def to_json(self) -> str:
        """The manifest text (spec 6.5: compact, UTF-8, no NaN)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_dict(cls, obj: Any, encodings: Encodings, budget: Budget | None = None,
                  minor: int = C.FORMAT_VERSION_MINOR) -> Manifest:
        """Validate a parsed manifest (spec 3, in the order of 9.1 step 6); with ``budget``, its
        entry count is checked first (spec 8.5). ``minor`` is the file's minor version: below
        ``MINOR_RECOVERY`` the members 1.4 added are unknown members, ignored (spec 8.1)."""
        cpet = minor >= C.MINOR_RECOVERY
        o = as_object(obj, "manifest")
        raw_tensors = as_list(o.get("tensors"), "tensors")
        raw_groups = as_list(o.get("groups"), "groups")
        if len(raw_tensors) > C.MAX_TENSORS:
            raise LimitExceeded(f"{len(raw_tensors)} tensors, limit {C.MAX_TENSORS}")
        if budget is not None:
            budget.check_entries(len(raw_tensors) + len(raw_groups), "manifest")
        groups = [_parse_group(g, i, encodings) for i, g in enumerate(raw_groups)]
        tensors = [_parse_tensor(t, i, groups, encodings) for i, t in enumerate(raw_tensors)]
        req = as_list(o.get("required_features", []), "required_features")
        if not all(isinstance(x, str) for x in req):
            raise ManifestError("required_features must be a list of strings")
        m = cls(
            tensors=tensors,
            groups=groups,
            adapter=_parse_adapter(o.get("adapter", {}), cpet),
            base_model=BaseBinding.from_json(o.get("base_model", {})),
            compression=_parse_compression(o.get("compression", {})),
            provenance=_parse_provenance(o.get("provenance", {}), cpet, minor >= C.MINOR_SOURCE_METADATA),
            library_version=as_opt_str(o.get("library_version", ""), "library_version") or "",
            required_features=list(req),
            requires=_parse_requires(o.get("requires", []), cpet),
        )
        modules = m.check_consistency(encodings)
        if m.adapter.recovery is not None and modules is not None:
            m.adapter.recovery = replace(m.adapter.recovery, target_modules=tuple(modules))
        return m

    # -- structure -------------------------------------------------------------------------
    def group_members(self) -> list[list[int]]:
        """Indices into ``tensors`` of each group's members, in manifest order."""
        members: list[list[int]] = [[] for _ in self.groups]
        for i, t in enumerate(self.tensors):
            members[t.group].append(i)
        return members

    def expected_raw_sizes(self, gi: int, encodings: Encodings,
                           member_index: list[list[int]] | None = None) -> dict[str, tuple[int, bool]]:
        """Raw byte size of each stream of group ``gi`` implied by shapes and counts, as
        (size, exact); ``exact`` False means the size is an upper bound (spec 8.4).
        ``member_index`` is ``group_members()``, when the caller already has it."""
        g = self.groups[gi]
        members = [self.tensors[i] for i in (member_index or self.group_members())[gi]]
        return encodings[g.encoding].raw_sizes(g.params, members)

    def check_consistency(self, encodings: Encodings) -> list[str] | None:
        """Cross-field rules: unique names, every group used, group sizes within limits, raw
        sizes equal to what the shapes imply; for a recovery artifact, the tensors of 3.6.

        Returns:
            The modules of a recovery artifact, in name order; None for other artifacts.
        """
        names = set()
        for t in self.tensors:
            if t.name in names:
                raise ManifestError(f"tensor name {t.name!r} appears twice")
            names.add(t.name)
        stream_names = set()
        for g in self.groups:
            for s in g.streams.values():
                if s.name in stream_names:
                    raise ManifestError(f"stream name {s.name!r} appears twice")
                stream_names.add(s.name)
        members = self.group_members()
        for gi, idx in enumerate(members):
            if not idx:
                raise ManifestError(f"group {gi} has no tensors")
            total = sum(self.tensors[i].numel for i in idx)
            if total > C.MAX_GROUP_ELEMENTS:
                raise LimitExceeded(f"group {gi} holds {total} elements, limit {C.MAX_GROUP_ELEMENTS}")
            expected = self.expected_raw_sizes(gi, encodings, members)
            for role, info in self.groups[gi].streams.items():
                size, exact = expected[role]
                if info.raw_size > size or (exact and info.raw_size != size):
                    raise ManifestError(
                        f"group {gi} stream {role!r} declares raw_size {info.raw_size}, "
                        f"shapes imply {'' if exact else 'at most '}{size}"
                    )
                if info.compression == C.COMP_NONE and info.size != info.raw_size:
                    raise ManifestError(f"uncompressed stream {info.name!r} has size != raw_size")
        if self.adapter.kind != C.ADAPTER_KIND_RECOVERY:
            return None
        if self.adapter.recovery is None:
            raise ManifestError("adapter.recovery is required for an adapter of kind recovery")
        return list(recovery_layout(((t.name, t.shape) for t in self.tensors), self.adapter.recovery.r))


# ---------------------------------------------------------------------------------------------
# the metadata keys and the manifest's stored form (spec 2.2, 2.4, 7.2, 8.1, 8.2)
# ---------------------------------------------------------------------------------------------
_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})$")


def parse_metadata(meta: Mapping[str, str], encodings: Encodings, budget: Budget | None = None) -> Manifest:
    """The manifest of a file's ``__metadata__``: format key, version, manifest encoding and
    digest, required features, then the manifest itself, checked in that order, within ``budget``
    (spec 8.5; the default budget when None)."""
    budget = resolve(budget)
    if meta.get(C.META_FORMAT) != C.FORMAT_NAME:
        raise NotCompeft("safetensors file without compeft metadata")
    version = meta.get(C.META_VERSION)
    m = _VERSION_RE.fullmatch(version or "")
    if not m:
        raise ManifestError(f"format version {version!r} is not MAJOR.MINOR")
    if int(m.group(1)) != C.FORMAT_VERSION_MAJOR:
        raise VersionError(f"format version {version} is not supported (this reader reads {C.FORMAT_VERSION_MAJOR}.x)",
                           version=version)
    stored = meta.get(C.META_MANIFEST)
    digest = meta.get(C.META_MANIFEST_SHA256)
    if stored is None or digest is None:
        raise ManifestError("metadata lacks the manifest or its digest")
    text = decode_manifest_text(stored, meta.get(C.META_MANIFEST_ENCODING, C.MANIFEST_JSON))
    try:
        actual = sha256_hex(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ManifestError("manifest is not valid Unicode text") from None
    if actual != digest:
        raise ManifestDigestMismatch(f"manifest sha256 is {actual}, metadata declares {digest}", subject="manifest",
                                     expected=digest, actual=actual)
    try:
        obj = loads(text, max_objects=budget.json_objects, what="manifest", parse_constant=_no_constants)
    except LimitExceeded:
        raise
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"manifest is not valid JSON: {e}") from None
    if isinstance(obj, dict):
        req = obj.get("required_features", [])
        if isinstance(req, list):
            unknown = [f for f in req if not isinstance(f, str) or f not in C.SUPPORTED_FEATURES]
            if unknown:
                raise UnsupportedFeature(f"file requires features this reader lacks: {unknown}", features=unknown)
    return Manifest.from_dict(obj, encodings, budget, minor=int(m.group(2)))


def metadata(manifest: Manifest, encoding: str = "auto") -> dict[str, str]:
    """The ``__metadata__`` of a file holding ``manifest``, its text stored with ``encoding``
    (``"auto"``: the shortest; on a tie the simpler)."""
    text = manifest.to_json()
    if encoding == "auto":
        encoding, stored = min(((e, encode_manifest_text(text, e)) for e in C.MANIFEST_ENCODINGS),
                               key=lambda c: len(c[1].encode("utf-8")))
    elif encoding in C.MANIFEST_ENCODINGS:
        stored = encode_manifest_text(text, encoding)
    else:
        raise InvalidArgument(f"manifest_encoding must be 'auto' or one of {list(C.MANIFEST_ENCODINGS)}")
    return {
        C.META_FORMAT: C.FORMAT_NAME,
        C.META_VERSION: manifest.format_version,
        C.META_MANIFEST_ENCODING: encoding,
        C.META_MANIFEST: stored,
        C.META_MANIFEST_SHA256: sha256_hex(text.encode("utf-8")),
    }


@functools.cache
def manifest_dictionary() -> zstandard.ZstdCompressionDict:
    """The raw-content zstd dictionary of the ``zstd+dict1+base64`` manifest encoding (spec 2.4)."""
    data = (Path(__file__).parent / "data" / C.MANIFEST_DICT1_FILE).read_bytes()
    if sha256_hex(data) != C.MANIFEST_DICT1_SHA256:
        raise RuntimeError(f"the installed {C.MANIFEST_DICT1_FILE} is not the format's dictionary")
    return zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def decode_manifest_text(stored: str, encoding: str) -> str:
    """The manifest's JSON text from the ``compeft.manifest`` value (spec 2.2, 2.4)."""
    if encoding == C.MANIFEST_JSON:
        return stored
    if encoding not in (C.MANIFEST_ZSTD_BASE64, C.MANIFEST_ZSTD_DICT1_BASE64):
        raise UnknownEncoding(f"unknown manifest encoding {encoding!r}")
    try:
        packed = base64.b64decode(stored.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ManifestError("compressed manifest is not valid base64") from None
    try:
        size = zstandard.get_frame_parameters(packed).content_size
    except zstandard.ZstdError:
        raise ManifestError("compressed manifest is not a zstd frame") from None
    if size == zstandard.CONTENTSIZE_UNKNOWN:
        raise ManifestError("compressed manifest frame does not declare its size")
    if size > C.MAX_MANIFEST_BYTES:
        raise LimitExceeded(f"manifest declares {size} bytes, limit {C.MAX_MANIFEST_BYTES}")
    dictionary = manifest_dictionary() if encoding == C.MANIFEST_ZSTD_DICT1_BASE64 else None
    try:
        raw = unframe(packed, C.COMP_ZSTD, size, dictionary=dictionary)
        return bytes(raw).decode("utf-8")
    except (StreamCorrupt, UnicodeDecodeError):
        raise ManifestError("compressed manifest does not decode to UTF-8 text") from None


def encode_manifest_text(text: str, encoding: str) -> str:
    """The ``compeft.manifest`` value holding ``text`` with ``encoding``."""
    if encoding == C.MANIFEST_JSON:
        return text
    dictionary = manifest_dictionary() if encoding == C.MANIFEST_ZSTD_DICT1_BASE64 else None
    packed = frame(text.encode("utf-8"), C.COMP_ZSTD, C.DEFAULT_ZSTD_LEVEL, dictionary=dictionary)
    return base64.b64encode(packed).decode("ascii")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _parse_group(g: Any, i: int, encodings: Encodings) -> GroupInfo:
    g = as_object(g, f"groups[{i}]")
    enc = as_str(g.get("encoding"), f"groups[{i}].encoding")
    rules = encodings.get(enc)
    if rules is None:
        raise UnknownEncoding(f"groups[{i}] uses unknown encoding {enc!r}")
    params = rules.parse_params(as_object(g.get("params", {}), f"groups[{i}].params"), f"groups[{i}]")
    raw_streams = as_object(g.get("streams"), f"groups[{i}].streams")
    roles = rules.roles(params)
    if set(raw_streams) != set(roles):
        raise ManifestError(f"groups[{i}] ({enc}) must have exactly the streams {list(roles)}")
    streams = {}
    for role in roles:
        s = as_object(raw_streams[role], f"groups[{i}].streams.{role}")
        comp = as_str(s.get("compression"), f"groups[{i}].streams.{role}.compression")
        if comp not in C.COMPRESSIONS:
            raise UnknownEncoding(f"groups[{i}] stream {role!r} uses unknown compression {comp!r}")
        sname = as_str(s.get("name"), f"groups[{i}].streams.{role}.name")
        utf8_len(sname, f"groups[{i}].streams.{role}.name")
        if sname == C.SAFETENSORS_METADATA:
            raise ManifestError(f"groups[{i}] stream {role!r} is named {C.SAFETENSORS_METADATA!r}, which no tensor can be")
        streams[role] = StreamInfo(
            name=sname,
            compression=comp,
            size=as_int(s.get("size"), f"groups[{i}].streams.{role}.size"),
            raw_size=as_int(s.get("raw_size"), f"groups[{i}].streams.{role}.raw_size"),
            sha256=as_hex64(s.get("sha256"), f"groups[{i}].streams.{role}.sha256"),
        )
    dsha = g.get("decoded_sha256")
    return GroupInfo(encoding=enc, params=params, streams=streams,
                     decoded_sha256=None if dsha is None else as_hex64(dsha, f"groups[{i}].decoded_sha256"))


def _parse_tensor(t: Any, i: int, groups: list[GroupInfo], encodings: Encodings) -> TensorInfo:
    t = as_object(t, f"tensors[{i}]")
    name = as_str(t.get("name"), f"tensors[{i}].name")
    if utf8_len(name, f"tensors[{i}].name") > C.MAX_NAME_BYTES:
        raise LimitExceeded(f"tensors[{i}] name is over {C.MAX_NAME_BYTES} bytes")
    shape = as_list(t.get("shape"), f"tensors[{i}].shape")
    if len(shape) > C.MAX_RANK:
        raise LimitExceeded(f"tensor {name!r} has rank {len(shape)}, limit {C.MAX_RANK}")
    dims = tuple(as_int(d, f"tensor {name!r} shape") for d in shape)
    if any(d > C.MAX_ELEMENTS_PER_TENSOR for d in dims):  # each dimension before the product
        raise LimitExceeded(f"tensor {name!r} has a dimension over {C.MAX_ELEMENTS_PER_TENSOR}")
    numel = math.prod(dims)
    if numel > C.MAX_ELEMENTS_PER_TENSOR:
        raise LimitExceeded(f"tensor {name!r} has {numel} elements, limit {C.MAX_ELEMENTS_PER_TENSOR}")
    dtype = as_str(t.get("dtype"), f"tensor {name!r} dtype")
    if dtype not in C.FLOAT_DTYPES:
        raise ManifestError(f"tensor {name!r} has unsupported dtype {dtype!r}")
    gi = as_int(t.get("group"), f"tensor {name!r} group")
    if gi >= len(groups):
        raise ManifestError(f"tensor {name!r} names group {gi}, the file has {len(groups)}")
    enc = groups[gi].encoding
    rules = encodings[enc]
    nnz = as_int(t.get("nnz"), f"tensor {name!r} nnz")
    if nnz > numel or (rules.every_element and nnz != numel):
        raise ManifestError(f"tensor {name!r} declares nnz {nnz} for {numel} elements")
    scale = t.get("scale")
    if rules.member_scale:
        scale = as_f32(scale, f"tensor {name!r} scale")
    elif scale is not None:
        raise ManifestError(f"tensor {name!r} has a scale but its encoding is {enc}")
    offset = as_f32(t.get("offset", 0.0), f"tensor {name!r} offset") + 0.0  # an offset of -0 reads as +0 (spec 3.2)
    if not rules.member_offset and offset != 0.0:
        raise ManifestError(f"{enc} tensor {name!r} must have offset 0")
    sha = t.get("sha256")
    return TensorInfo(name=name, shape=dims, dtype=dtype, nnz=nnz, scale=scale, offset=offset, group=gi,
                      sha256=None if sha is None else as_hex64(sha, f"tensor {name!r} sha256"))


def _parse_adapter(a: Any, cpet: bool) -> AdapterInfo:
    a = as_object(a, "adapter")
    kind = a.get("kind", C.ADAPTER_KIND_OTHER)
    if kind not in C.ADAPTER_KINDS or (kind == C.ADAPTER_KIND_RECOVERY and not cpet):
        kind = C.ADAPTER_KIND_OTHER
    rep = a.get("representation", C.REPRESENTATION_WEIGHTS)
    if rep not in C.REPRESENTATIONS:
        raise ManifestError(f"adapter.representation must be one of {list(C.REPRESENTATIONS)}")
    cfg = a.get("peft_config")
    if cfg is not None:
        cfg = as_object(cfg, "adapter.peft_config")
    recovery = None
    if cpet and a.get("recovery") is not None:
        recovery = _parse_recovery(a["recovery"])
    if kind == C.ADAPTER_KIND_RECOVERY and rep != C.REPRESENTATION_WEIGHTS:
        raise ManifestError("an adapter of kind recovery must have representation weights")
    return AdapterInfo(kind=kind, representation=rep, peft_config=cfg, recovery=recovery)


def _parse_recovery(x: Any) -> RecoveryConfig:
    o = as_object(x, "adapter.recovery")
    r = as_int(o.get("r"), "adapter.recovery.r", lo=1)
    alpha = as_finite(o.get("alpha"), "adapter.recovery.alpha")
    activation = as_str(o.get("activation"), "adapter.recovery.activation")
    return RecoveryConfig(r=r, alpha=alpha, activation=activation)


def _parse_requires(x: Any, cpet: bool) -> list[Requirement]:
    if not cpet:
        return []
    return [Requirement.from_json(e, f"requires[{i}]") for i, e in enumerate(as_list(x, "requires"))]


def _parse_compression(c: Any) -> CompressionInfo:
    c = as_object(c, "compression")
    return CompressionInfo(
        method=as_str(c.get("method", C.METHOD_NONE), "compression.method"),
        density=as_opt_number(c.get("density"), "compression.density"),
        alpha=as_opt_number(c.get("alpha"), "compression.alpha"),
        scope=as_opt_str(c.get("scope"), "compression.scope"),
        mode=as_opt_str(c.get("mode"), "compression.mode"),
        reference=as_opt_str(c.get("reference"), "compression.reference"),
        sigma=as_opt_number(c.get("sigma"), "compression.sigma"),
        candidates=as_int(c.get("candidates", 0), "compression.candidates"),
        kept=as_int(c.get("kept", 0), "compression.kept"),
        options=_informative(c.get("options")),
        fidelity=_informative(c.get("fidelity")),
    )


def _informative(x: Any) -> dict[str, Any] | None:
    """An informative member: kept when it is an object, ignored otherwise (readers accept any)."""
    return x if isinstance(x, dict) else None


def _parse_provenance(p: Any, cpet: bool, source_metadata: bool) -> ProvenanceInfo:
    p = as_object(p, "provenance")
    meta = _informative(p.get("source_metadata")) if source_metadata else None
    return ProvenanceInfo(
        tool=as_str(p.get("tool", ""), "provenance.tool"),
        created_at=as_opt_str(p.get("created_at"), "provenance.created_at"),
        source=as_opt_str(p.get("source"), "provenance.source"),
        training=_informative(p.get("training")) if cpet else None,
        # informative: its string members are kept, anything else is ignored
        source_metadata=None if meta is None else {k: v for k, v in meta.items() if isinstance(v, str)},
    )


__all__ = ["TensorDescription", "TensorInfo", "StreamInfo", "GroupInfo", "AdapterInfo", "CompressionInfo",
           "ProvenanceInfo", "Requirement", "Manifest", "EncodingRules", "Encodings", "parse_metadata", "metadata",
           "decode_manifest_text", "encode_manifest_text", "manifest_dictionary"]
