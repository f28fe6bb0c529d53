"""Writing compeft files (spec sections 2, 4, 6.5, 7): tensors are planned into groups, each group
encoded by its codec, each stream framed and hashed, and the file written atomically.

``WriterOptions`` holds every choice the writer makes; ``save(adapter, path, positions="bitmap")``
is a shortcut for ``save(adapter, path, WriterOptions(positions="bitmap"))``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from . import constants as C
from ._version import __version__
from .codecs import CODINGS, REGISTRY, get_codec
from .compressed import CompressedAdapter, CompressedTensor
from .errors import InvalidArgument, IOFailure, LimitExceeded, ManifestError
from .fileio import atomic_write
from .framing import smallest_frame
from .integrity import group_sha256, sha256_hex, tensor_sha256
from .manifest import GroupInfo, Manifest, StreamInfo, TensorInfo, metadata

PathLike = str | os.PathLike[str]

#: zstd's fastest (most negative) level
ZSTD_FASTEST = -(1 << 17)


@dataclass(frozen=True)
class WriterOptions:
    """How a compressed adapter is written; none of these change the decoded tensors."""

    #: zstd level for streams (a stream is stored raw when zstd does not shrink it; negative levels
    #: are zstd's fast ones, 0 its default); None stores every stream raw
    zstd_level: int | None = C.DEFAULT_ZSTD_LEVEL
    #: largest number of elements coded together in one group (a larger tensor gets its own; 0:
    #: every tensor its own)
    max_group_elements: int = C.DEFAULT_MAX_GROUP_ELEMENTS
    #: record the sha256 of each decoded tensor (32 bytes per tensor)
    tensor_digests: bool = False
    #: record one sha256 of each group's decoded tensors (32 bytes per group)
    group_digests: bool = True
    #: ``"json"``, ``"zstd+base64"``, ``"zstd+dict1+base64"`` or ``"auto"`` (the shortest)
    manifest_encoding: str = "auto"
    #: position coding of ternary and sparse groups: ``"golomb"`` (near the information bound),
    #: ``"bitmap"`` (one bit per element) or ``"auto"``: for groups of up to
    #: ``AUTO_TRIAL_ELEMENTS`` elements whichever makes the file smaller, for larger ones Golomb
    #: unless a tensor keeps more than 40% of its elements
    positions: str = "auto"

    def __post_init__(self) -> None:
        level = self.zstd_level
        if level is not None and not (isinstance(level, int) and not isinstance(level, bool)
                                      and ZSTD_FASTEST <= level <= zstandard.MAX_COMPRESSION_LEVEL):
            raise InvalidArgument(f"zstd_level must be None or an integer from {ZSTD_FASTEST} to "
                                  f"{zstandard.MAX_COMPRESSION_LEVEL} (0: zstd's default), got {level!r}")
        if not (isinstance(self.max_group_elements, int) and self.max_group_elements >= 0):
            raise InvalidArgument(f"max_group_elements must be an integer >= 0, got {self.max_group_elements!r}")
        if self.manifest_encoding not in ("auto",) + C.MANIFEST_ENCODINGS:
            raise InvalidArgument(f"manifest_encoding must be 'auto' or one of {list(C.MANIFEST_ENCODINGS)}")
        if self.positions != "auto" and self.positions not in CODINGS:
            raise InvalidArgument(f"positions must be 'auto' or one of {sorted(CODINGS)}")

    def replace(self, **changes: Any) -> WriterOptions:
        """These options with some changed; an unknown name is an ``InvalidArgument``."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise InvalidArgument(f"unknown writer option(s) {unknown}; the options are {sorted(names)}")
        return dataclasses.replace(self, **changes)


def _options(options: WriterOptions | None, changes: dict[str, Any]) -> WriterOptions:
    return (options or WriterOptions()).replace(**changes)


def plan_groups(tensors: list[CompressedTensor],
                options: WriterOptions) -> list[tuple[dict[str, Any], str, list[int]]]:
    """Assign tensors to groups: same encoding and parameters, at most ``max_group_elements``
    elements each (a larger tensor gets a group of its own)."""
    groups: list[tuple[dict[str, Any], str, list[int]]] = []
    open_group: dict[str, int] = {}
    sizes: list[int] = []
    for i, t in enumerate(tensors):
        params = get_codec(t.encoding).choose_params(t, positions=options.positions)
        key = json.dumps([t.encoding, params], sort_keys=True)
        gi = open_group.get(key)
        if gi is None or (sizes[gi] + t.numel > options.max_group_elements and sizes[gi] > 0):
            gi = len(groups)
            groups.append((params, t.encoding, []))
            sizes.append(0)
            open_group[key] = gi
        groups[gi][2].append(i)
        sizes[gi] += t.numel
    return groups


#: with ``positions="auto"``, a group of at most this many elements is written with whichever
#: position coding makes it smaller; a larger one keeps the density rule of ``codecs.positions``
#: (trying both costs a second zstd pass over its streams)
AUTO_TRIAL_ELEMENTS = 1 << 20
#: what each stream adds to the manifest beside its bytes (name, sizes, compression, sha256 in hex)
STREAM_ENTRY_BYTES = 120

Framed = dict[str, tuple[str, bytes, int]]


def _encode_group(codec: Any, members: list[CompressedTensor], params: dict[str, Any],
                  opts: WriterOptions) -> tuple[dict[str, Any], Framed]:
    """The group's streams, framed: role -> (compression, stored bytes, raw size). With
    ``positions="auto"`` a small group is encoded with both position codings and the smaller kept
    (the decoded tensors are the same either way)."""
    def encode(p: dict[str, Any]) -> Framed:
        raw = codec.encode(members, p)
        out: Framed = {}
        for role in codec.roles(p):
            comp, stored = smallest_frame(raw[role], opts.zstd_level)
            out[role] = (comp, bytes(stored), len(raw[role]))
        return out

    def cost(f: Framed) -> int:
        return sum(len(stored) + STREAM_ENTRY_BYTES for _, stored, _ in f.values())

    framed = encode(params)
    coding = params.get(C.PARAM_POSITIONS)
    if opts.positions == "auto" and coding in CODINGS and sum(m.numel for m in members) <= AUTO_TRIAL_ELEMENTS:
        other = {**params, C.PARAM_POSITIONS: C.POSITIONS_BITMAP if coding == C.POSITIONS_GOLOMB
                 else C.POSITIONS_GOLOMB}
        alternative = encode(other)
        if cost(alternative) < cost(framed):
            return other, alternative
    return params, framed


def _check_limits(tensors: list[CompressedTensor]) -> None:
    if len(tensors) > C.MAX_TENSORS:
        raise LimitExceeded(f"{len(tensors)} tensors, the format allows {C.MAX_TENSORS}")
    for t in tensors:
        if t.numel > C.MAX_ELEMENTS_PER_TENSOR or len(t.shape) > C.MAX_RANK:
            raise LimitExceeded(f"tensor {t.name!r} is over the format's size limits")
        try:
            if len(t.name.encode("utf-8")) > C.MAX_NAME_BYTES:
                raise LimitExceeded(f"tensor name {t.name[:40]!r}... is over {C.MAX_NAME_BYTES} bytes")
        except UnicodeEncodeError:
            raise InvalidArgument(f"tensor name {t.name!r} is not valid Unicode text") from None


def build(adapter: CompressedAdapter, options: WriterOptions | None = None,
          **changes: Any) -> tuple[Manifest, dict[str, np.ndarray], dict[str, str]]:
    """Encode an adapter into (manifest, streams, safetensors metadata) without touching disk.
    Keyword arguments change single ``WriterOptions``."""
    opts = _options(options, changes)
    tensors = list(adapter.tensors.values())
    _check_limits(tensors)
    group_of = [0] * len(tensors)
    tensor_digest: list[str | None] = [None] * len(tensors)
    groups: list[GroupInfo] = []
    streams: dict[str, np.ndarray] = {}
    for gi, (params, encoding, idx) in enumerate(plan_groups(tensors, opts)):
        codec = get_codec(encoding)
        params, framed = _encode_group(codec, [tensors[i] for i in idx], params, opts)
        infos = {}
        for role, (comp, stored, raw_size) in framed.items():
            name = f"g{gi}.{role}"
            streams[name] = np.frombuffer(stored, dtype=np.uint8)
            infos[role] = StreamInfo(name=name, compression=comp, size=len(stored),
                                     raw_size=raw_size, sha256=sha256_hex(stored))
        # one member densified at a time unless per-tensor digests need them all
        dense = [tensors[i].to_dense() for i in idx] if opts.tensor_digests else []
        digest = None
        if opts.group_digests:
            digest = group_sha256(dense if opts.tensor_digests else (tensors[i].to_dense() for i in idx))
        groups.append(GroupInfo(encoding=encoding, params=params, streams=infos, decoded_sha256=digest))
        for j, i in enumerate(idx):
            group_of[i] = gi
            if opts.tensor_digests:
                tensor_digest[i] = tensor_sha256(dense[j])
    infos_t = [
        TensorInfo(name=t.name, shape=tuple(t.shape), dtype=t.dtype, nnz=t.nnz,
                   scale=t.scale if get_codec(t.encoding).member_scale else None, offset=float(t.offset) + 0.0,
                   group=group_of[i], sha256=tensor_digest[i])
        for i, t in enumerate(tensors)
    ]
    manifest = Manifest(tensors=infos_t, groups=groups, adapter=adapter.adapter, base_model=adapter.base_model,
                        compression=adapter.compression, provenance=adapter.provenance, library_version=__version__,
                        required_features=[], requires=list(adapter.requires))
    try:
        manifest.check_consistency(REGISTRY)
    except ManifestError as e:  # a recovery artifact whose tensors break spec 3.6
        raise InvalidArgument(f"the adapter cannot be written: {e}") from None
    return manifest, streams, metadata(manifest, opts.manifest_encoding)


def foreign_name(path: PathLike) -> bool:
    """Whether ``path`` is named as a weight file peft, transformers or diffusers load from a
    folder by themselves (``C.FOREIGN_WEIGHT_NAMES``, their shards), in any case (one name on
    case-insensitive file systems)."""
    folded = os.path.basename(os.fspath(path)).lower()
    return folded in C.FOREIGN_WEIGHT_NAMES or re.fullmatch(C.FOREIGN_SHARD_PATTERN, folded) is not None


def check_name(path: PathLike) -> None:
    """Refuse a name peft, transformers or diffusers load from a folder as their own weights: they
    would read a compeft file as unknown tensors (peft only warns of missing keys) and the model
    would behave as its base model."""
    name = os.path.basename(os.fspath(path))
    if foreign_name(name):
        raise InvalidArgument(f"{name} is the name of a weight file peft or transformers loads by itself, and they "
                              "cannot read a compeft file: name it NAME.cpeft.safetensors (`compeft decompress` "
                              "writes the PEFT folder)", path=os.fspath(path))


def save(adapter: CompressedAdapter, path: PathLike, options: WriterOptions | None = None,
         **changes: Any) -> Manifest:
    """Write a compressed adapter to ``path`` atomically (temporary file, fsync, rename).

    Args:
        adapter: what ``compress`` or ``read`` returned.
        path: destination; its folder must exist.
        options: ``WriterOptions``; keyword arguments change single options
            (``save(ca, path, positions="bitmap", tensor_digests=True)``).

    Returns:
        The manifest written.

    Raises:
        InvalidArgument, LimitExceeded: before anything is written (also when ``path`` is named
        as a weight file peft, transformers or diffusers would load by themselves,
        ``adapter_model.safetensors`` and the like). FileNotFound: the folder does not exist.
        IOFailure: the write failed; no partial file is left.
    """
    check_name(path)
    manifest, streams, meta = build(adapter, _options(options, changes))

    def write(tmp: str) -> None:
        try:
            write_safetensors(tmp, streams, meta)
        except OSError as e:
            raise IOFailure(f"cannot write {path}: {e.strerror or e}", path=str(path)) from None

    atomic_write(path, write)
    return manifest


def write_safetensors(path: str, streams: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    """A safetensors file of 1-D ``U8`` tensors, laid out as the safetensors library lays them out
    (tensors in name order, the header padded with spaces to a multiple of 8 bytes), with the
    ``__metadata__`` keys in sorted order: the library writes them in a random order per call
    (safetensors issue 584), and a file must be the same byte for byte whenever its contents are."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    offset = 0
    names = sorted(streams)
    for name in names:
        size = int(streams[name].size)
        header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in names:
            f.write(np.ascontiguousarray(streams[name], dtype=np.uint8).tobytes())


__all__ = ["WriterOptions", "plan_groups", "build", "save", "write_safetensors"]
