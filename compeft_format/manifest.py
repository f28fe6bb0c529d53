"""The manifest: the JSON document in ``__metadata__["compeft.manifest"]`` (spec section 3).

Dataclasses mirror the JSON one to one. ``Manifest.from_dict`` is the only place that validates a
manifest's structure; unknown fields are ignored, as the spec requires for optional additions.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import constants as C
from .errors import LimitExceeded, ManifestError, UnknownEncoding


@dataclass
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


@dataclass
class TensorInfo:
    """One decoded tensor: where its data lives and how to rebuild it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    group: int
    nnz: int
    scale: float | None = None
    offset: float = 0.0
    sha256: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class AdapterInfo:
    kind: str = "other"
    representation: str = C.REPRESENTATION_WEIGHTS
    peft_config: dict[str, Any] | None = None


@dataclass
class BaseModelInfo:
    id: str | None = None
    revision: str | None = None
    fingerprint: dict[str, str] | None = None


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


@dataclass
class ProvenanceInfo:
    tool: str = ""
    created_at: str | None = None
    source: str | None = None


@dataclass
class Manifest:
    tensors: list[TensorInfo]
    groups: list[GroupInfo]
    adapter: AdapterInfo = field(default_factory=AdapterInfo)
    base_model: BaseModelInfo = field(default_factory=BaseModelInfo)
    compression: CompressionInfo = field(default_factory=CompressionInfo)
    provenance: ProvenanceInfo = field(default_factory=ProvenanceInfo)
    library_version: str = ""
    required_features: list[str] = field(default_factory=list)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for t in d["tensors"]:
            t["shape"] = list(t["shape"])
            if t["scale"] is None:
                del t["scale"]
            if t["sha256"] is None:
                del t["sha256"]
            if t["offset"] == 0.0:
                del t["offset"]
        for g in d["groups"]:
            if g["decoded_sha256"] is None:
                del g["decoded_sha256"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_dict(cls, obj: Any) -> Manifest:
        o = _obj(obj, "manifest")
        raw_tensors = _list(o.get("tensors"), "tensors")
        raw_groups = _list(o.get("groups"), "groups")
        if len(raw_tensors) > C.MAX_TENSORS:
            raise LimitExceeded(f"{len(raw_tensors)} tensors, limit {C.MAX_TENSORS}")
        groups = [_parse_group(g, i) for i, g in enumerate(raw_groups)]
        tensors = [_parse_tensor(t, i, groups) for i, t in enumerate(raw_tensors)]
        req = _list(o.get("required_features", []), "required_features")
        if not all(isinstance(x, str) for x in req):
            raise ManifestError("required_features must be a list of strings")
        m = cls(
            tensors=tensors,
            groups=groups,
            adapter=_parse_adapter(o.get("adapter", {})),
            base_model=_parse_base(o.get("base_model", {})),
            compression=_parse_compression(o.get("compression", {})),
            provenance=_parse_provenance(o.get("provenance", {})),
            library_version=_opt_str(o.get("library_version", ""), "library_version") or "",
            required_features=list(req),
        )
        m.check_consistency()
        return m

    # -- structure -------------------------------------------------------------------------
    def group_members(self) -> list[list[int]]:
        """Indices into ``tensors`` of each group's members, in manifest order."""
        members: list[list[int]] = [[] for _ in self.groups]
        for i, t in enumerate(self.tensors):
            members[t.group].append(i)
        return members

    def expected_raw_sizes(self, gi: int, member_index: list[list[int]] | None = None) -> dict[str, tuple[int, bool]]:
        """Decoded byte size of each stream of group ``gi`` implied by shapes and counts, as
        (size, exact); ``exact`` False means the size is an upper bound (spec 8.4).
        ``member_index`` is ``group_members()``, when the caller already has it."""
        from .codecs.positions import raw_sizes

        g = self.groups[gi]
        members = [self.tensors[i] for i in (member_index or self.group_members())[gi]]
        k = sum(t.nnz for t in members)
        out: dict[str, tuple[int, bool]] = {}
        if g.encoding in (C.ENC_TERNARY, C.ENC_SPARSE):
            out.update(raw_sizes(g.params["positions"], members))
        if g.encoding == C.ENC_TERNARY:
            out[C.ROLE_SIGNS] = ((k + 7) // 8, True)
        else:
            item = C.DTYPE_ITEMSIZE[g.params["value_dtype"]]
            count = k if g.encoding == C.ENC_SPARSE else sum(t.numel for t in members)
            out[C.ROLE_VALUES] = (count * item, True)
        return out

    def check_consistency(self) -> None:
        """Cross-field rules: unique names, every group used, group sizes within limits, raw
        sizes equal to what the shapes imply."""
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
            expected = self.expected_raw_sizes(gi, members)
            for role, info in self.groups[gi].streams.items():
                size, exact = expected[role]
                if info.raw_size > size or (exact and info.raw_size != size):
                    raise ManifestError(
                        f"group {gi} stream {role!r} declares raw_size {info.raw_size}, "
                        f"shapes imply {'' if exact else 'at most '}{size}"
                    )
                if info.compression == C.COMP_NONE and info.size != info.raw_size:
                    raise ManifestError(f"uncompressed stream {info.name!r} has size != raw_size")


# -- parsing helpers ---------------------------------------------------------------------------
def _obj(x: Any, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise ManifestError(f"{what} must be an object")
    return x


def _list(x: Any, what: str) -> list[Any]:
    if not isinstance(x, list):
        raise ManifestError(f"{what} must be an array")
    return x


def _int(x: Any, what: str, lo: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ManifestError(f"{what} must be an integer >= {lo}")
    return x


def _str(x: Any, what: str) -> str:
    if not isinstance(x, str):
        raise ManifestError(f"{what} must be a string")
    return x


def _opt_str(x: Any, what: str) -> str | None:
    return None if x is None else _str(x, what)


def _finite(x: Any, what: str) -> float:
    """A JSON number read as binary64; integers too large for binary64 are not finite."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ManifestError(f"{what} must be a number")
    try:
        v = float(x)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v):
        raise ManifestError(f"{what} must be a finite number")
    return v


def _f32(x: Any, what: str) -> float:
    """A finite JSON number that is exactly a binary32 value."""
    v = _finite(x, what)
    if float(np.float32(v)) != v:
        raise ManifestError(f"{what} must be a finite value exactly representable in binary32")
    return v


def _opt_num(x: Any, what: str) -> float | None:
    return None if x is None else _finite(x, what)


def _utf8_len(s: str, what: str) -> int:
    try:
        return len(s.encode("utf-8"))
    except UnicodeEncodeError:
        raise ManifestError(f"{what} is not valid Unicode text") from None


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _hex64(x: Any, what: str) -> str:
    s = _str(x, what)
    if _HEX64.fullmatch(s) is None:
        raise ManifestError(f"{what} must be 64 lowercase hex digits")
    return s


def _parse_group(g: Any, i: int) -> GroupInfo:
    g = _obj(g, f"groups[{i}]")
    enc = _str(g.get("encoding"), f"groups[{i}].encoding")
    if enc not in C.ENCODINGS:
        raise UnknownEncoding(f"groups[{i}] uses unknown encoding {enc!r}")
    params = _obj(g.get("params", {}), f"groups[{i}].params")
    if enc in (C.ENC_TERNARY, C.ENC_SPARSE):
        pos = params.get("positions")
        if pos not in C.POSITION_CODINGS:
            raise UnknownEncoding(f"groups[{i}] uses unknown position coding {pos!r}")
    if enc in (C.ENC_SPARSE, C.ENC_DENSE):
        vd = params.get("value_dtype")
        if vd not in C.FLOAT_DTYPES:
            raise UnknownEncoding(f"groups[{i}] uses unknown value dtype {vd!r}")
    raw_streams = _obj(g.get("streams"), f"groups[{i}].streams")
    roles = C.stream_roles(enc, params)
    if set(raw_streams) != set(roles):
        raise ManifestError(f"groups[{i}] ({enc}) must have exactly the streams {list(roles)}")
    streams = {}
    for role in roles:
        s = _obj(raw_streams[role], f"groups[{i}].streams.{role}")
        comp = _str(s.get("compression"), f"groups[{i}].streams.{role}.compression")
        if comp not in C.COMPRESSIONS:
            raise UnknownEncoding(f"groups[{i}] stream {role!r} uses unknown compression {comp!r}")
        streams[role] = StreamInfo(
            name=_str(s.get("name"), f"groups[{i}].streams.{role}.name"),
            compression=comp,
            size=_int(s.get("size"), f"groups[{i}].streams.{role}.size"),
            raw_size=_int(s.get("raw_size"), f"groups[{i}].streams.{role}.raw_size"),
            sha256=_hex64(s.get("sha256"), f"groups[{i}].streams.{role}.sha256"),
        )
    dsha = g.get("decoded_sha256")
    return GroupInfo(encoding=enc, params=dict(params), streams=streams,
                     decoded_sha256=None if dsha is None else _hex64(dsha, f"groups[{i}].decoded_sha256"))


def _parse_tensor(t: Any, i: int, groups: list[GroupInfo]) -> TensorInfo:
    t = _obj(t, f"tensors[{i}]")
    name = _str(t.get("name"), f"tensors[{i}].name")
    if _utf8_len(name, f"tensors[{i}].name") > C.MAX_NAME_BYTES:
        raise LimitExceeded(f"tensors[{i}] name is over {C.MAX_NAME_BYTES} bytes")
    shape = _list(t.get("shape"), f"tensors[{i}].shape")
    if len(shape) > C.MAX_RANK:
        raise LimitExceeded(f"tensor {name!r} has rank {len(shape)}, limit {C.MAX_RANK}")
    dims = tuple(_int(d, f"tensor {name!r} shape") for d in shape)
    numel = math.prod(dims)
    if numel > C.MAX_ELEMENTS_PER_TENSOR or any(d > C.MAX_ELEMENTS_PER_TENSOR for d in dims):
        raise LimitExceeded(f"tensor {name!r} has {numel} elements, limit {C.MAX_ELEMENTS_PER_TENSOR}")
    dtype = _str(t.get("dtype"), f"tensor {name!r} dtype")
    if dtype not in C.FLOAT_DTYPES:
        raise ManifestError(f"tensor {name!r} has unsupported dtype {dtype!r}")
    gi = _int(t.get("group"), f"tensor {name!r} group")
    if gi >= len(groups):
        raise ManifestError(f"tensor {name!r} names group {gi}, the file has {len(groups)}")
    enc = groups[gi].encoding
    nnz = _int(t.get("nnz"), f"tensor {name!r} nnz")
    if nnz > numel or (enc == C.ENC_DENSE and nnz != numel):
        raise ManifestError(f"tensor {name!r} declares nnz {nnz} for {numel} elements")
    scale = t.get("scale")
    if enc == C.ENC_TERNARY:
        scale = _f32(scale, f"tensor {name!r} scale")
    elif scale is not None:
        raise ManifestError(f"tensor {name!r} has a scale but its encoding is {enc}")
    offset = _f32(t.get("offset", 0.0), f"tensor {name!r} offset") + 0.0  # an offset of -0 reads as +0 (spec 3.2)
    if enc == C.ENC_DENSE and offset != 0.0:
        raise ManifestError(f"dense tensor {name!r} must have offset 0")
    sha = t.get("sha256")
    return TensorInfo(
        name=name,
        shape=dims,
        dtype=dtype,
        group=gi,
        nnz=nnz,
        scale=scale,
        offset=offset,
        sha256=None if sha is None else _hex64(sha, f"tensor {name!r} sha256"),
    )


def _parse_adapter(a: Any) -> AdapterInfo:
    a = _obj(a, "adapter")
    kind = a.get("kind", "other")
    if kind not in C.ADAPTER_KINDS:
        kind = "other"
    rep = a.get("representation", C.REPRESENTATION_WEIGHTS)
    if rep not in C.REPRESENTATIONS:
        raise ManifestError(f"adapter.representation must be one of {list(C.REPRESENTATIONS)}")
    cfg = a.get("peft_config")
    if cfg is not None:
        cfg = _obj(cfg, "adapter.peft_config")
    return AdapterInfo(kind=kind, representation=rep, peft_config=cfg)


def _parse_base(b: Any) -> BaseModelInfo:
    b = _obj(b, "base_model")
    fp = b.get("fingerprint")
    if fp is not None:
        fp = _obj(fp, "base_model.fingerprint")
        fp = {
            "algorithm": _str(fp.get("algorithm"), "base_model.fingerprint.algorithm"),
            "value": _str(fp.get("value"), "base_model.fingerprint.value"),
        }
    return BaseModelInfo(
        id=_opt_str(b.get("id"), "base_model.id"),
        revision=_opt_str(b.get("revision"), "base_model.revision"),
        fingerprint=fp,
    )


def _parse_compression(c: Any) -> CompressionInfo:
    c = _obj(c, "compression")
    return CompressionInfo(
        method=_str(c.get("method", C.METHOD_NONE), "compression.method"),
        density=_opt_num(c.get("density"), "compression.density"),
        alpha=_opt_num(c.get("alpha"), "compression.alpha"),
        scope=_opt_str(c.get("scope"), "compression.scope"),
        mode=_opt_str(c.get("mode"), "compression.mode"),
        reference=_opt_str(c.get("reference"), "compression.reference"),
        sigma=_opt_num(c.get("sigma"), "compression.sigma"),
        candidates=_int(c.get("candidates", 0), "compression.candidates"),
        kept=_int(c.get("kept", 0), "compression.kept"),
    )


def _parse_provenance(p: Any) -> ProvenanceInfo:
    p = _obj(p, "provenance")
    return ProvenanceInfo(
        tool=_str(p.get("tool", ""), "provenance.tool"),
        created_at=_opt_str(p.get("created_at"), "provenance.created_at"),
        source=_opt_str(p.get("source"), "provenance.source"),
    )
