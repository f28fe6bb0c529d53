"""Reading and writing compeft files (spec sections 2, 7, 8): a safetensors file whose tensors are
U8 streams and whose ``__metadata__`` carries the manifest.

``save`` writes atomically. ``CompeftFile`` (``open``) parses and checks the header and manifest
up front, then reads streams lazily through safetensors' memory map, one group at a time.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from . import constants as C
from ._version import __version__
from .codecs import get_codec
from .codecs.streams import frame, smallest_frame, unframe
from .compressed import CompressedAdapter, CompressedTensor
from .dtypes import to_torch
from .errors import (
    CompeftError,
    FileNotFound,
    InputError,
    InvalidArgument,
    IOFailure,
    LimitExceeded,
    ManifestDigestMismatch,
    ManifestError,
    ManifestMismatch,
    NotCompeft,
    NotSafetensors,
    StreamCorrupt,
    StreamDigestMismatch,
    TensorDigestMismatch,
    TruncatedFile,
    UnknownEncoding,
    UnsupportedFeature,
    VersionError,
)
from .integrity import group_sha256, sha256_hex, tensor_sha256
from .manifest import GroupInfo, Manifest, StreamInfo, TensorInfo

PathLike = str | os.PathLike

_ST_ITEMSIZE = {"U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2,
                "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})$")


# ---------------------------------------------------------------------------------------------
# safetensors header
# ---------------------------------------------------------------------------------------------
def read_safetensors_header(path: PathLike) -> tuple[dict[str, Any], dict[str, str], int]:
    """Parse and check a safetensors header without reading tensor data.

    Returns (tensor entries, ``__metadata__``, byte offset of the data section).

    Raises:
        FileNotFound, TruncatedFile, NotSafetensors.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if p.is_dir():
            raise InputError(f"{p} is a directory, not a file")
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TruncatedFile(f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > C.MAX_HEADER_BYTES:
                raise NotSafetensors(f"header length {n} is over the {C.MAX_HEADER_BYTES}-byte limit")
            if n > size - 8:
                raise TruncatedFile(f"header of {n} bytes does not fit in a {size}-byte file")
            raw = f.read(n)
    except FileNotFoundError:
        raise FileNotFound(f"no such file: {p}") from None
    except IsADirectoryError:
        raise InputError(f"{p} is a directory, not a file") from None
    except OSError as e:
        raise IOFailure(f"cannot read {p}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise NotSafetensors("header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise NotSafetensors("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise NotSafetensors("__metadata__ must map strings to strings")
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not isinstance(e.get("dtype"), str):
            raise NotSafetensors(f"tensor {name!r} has no dtype")
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise NotSafetensors(f"tensor {name!r} has a bad shape")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise NotSafetensors(f"tensor {name!r} has bad data_offsets")
        item = _ST_ITEMSIZE.get(e["dtype"])
        if item is None:
            raise NotSafetensors(f"tensor {name!r} has unknown dtype {e['dtype']!r}")
        if offs[1] - offs[0] != math.prod(shape) * item:
            raise NotSafetensors(f"tensor {name!r}: data_offsets disagree with shape and dtype")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    end = 0
    for a, b, name in spans:
        if a != end:
            raise NotSafetensors(f"tensor {name!r} data is not contiguous with the previous tensor")
        end = b
    data_start = 8 + n
    available = size - data_start
    if end > available:
        raise TruncatedFile(f"tensors need {end} data bytes, the file has {available}")
    if end < available:
        raise NotSafetensors(f"{available - end} bytes follow the last tensor")
    return header, meta, data_start


# ---------------------------------------------------------------------------------------------
# manifest from metadata
# ---------------------------------------------------------------------------------------------
def parse_metadata(meta: dict[str, str]) -> Manifest:
    """Check the compeft metadata keys, version, manifest digest and required features."""
    if meta.get(C.META_FORMAT) != C.FORMAT_NAME:
        raise NotCompeft("safetensors file without compeft metadata")
    version = meta.get(C.META_VERSION)
    m = _VERSION_RE.fullmatch(version or "")
    if not m:
        raise ManifestError(f"format version {version!r} is not MAJOR.MINOR")
    if int(m.group(1)) != C.FORMAT_VERSION_MAJOR:
        raise VersionError(f"format version {version} is not supported (this reader reads {C.FORMAT_VERSION_MAJOR}.x)")
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
        raise ManifestDigestMismatch(f"manifest sha256 is {actual}, metadata declares {digest}")
    try:
        obj = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"manifest is not valid JSON: {e}") from None
    if isinstance(obj, dict):
        req = obj.get("required_features", [])
        if isinstance(req, list):
            unknown = [f for f in req if not isinstance(f, str) or f not in C.SUPPORTED_FEATURES]
            if unknown:
                raise UnsupportedFeature(f"file requires features this reader lacks: {unknown}")
    return Manifest.from_dict(obj)


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
    if encoding == C.MANIFEST_JSON:
        return text
    dictionary = manifest_dictionary() if encoding == C.MANIFEST_ZSTD_DICT1_BASE64 else None
    packed = frame(text.encode("utf-8"), C.COMP_ZSTD, C.DEFAULT_ZSTD_LEVEL, dictionary=dictionary)
    return base64.b64encode(packed).decode("ascii")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def check_streams_match(manifest: Manifest, header: dict[str, Any]) -> None:
    """Every safetensors tensor is a U8 vector named by exactly one manifest stream, and sizes agree."""
    declared: dict[str, StreamInfo] = {}
    for g in manifest.groups:
        for s in g.streams.values():
            declared[s.name] = s
    extra = sorted(set(header) - set(declared))
    missing = sorted(set(declared) - set(header))
    if extra:
        raise ManifestMismatch(f"file holds tensors the manifest does not name: {extra[:5]}")
    if missing:
        raise ManifestMismatch(f"manifest names streams the file lacks: {missing[:5]}")
    for name, s in declared.items():
        e = header[name]
        if e["dtype"] != "U8" or len(e["shape"]) != 1:
            raise ManifestMismatch(f"stream {name!r} must be a 1-D U8 tensor")
        if e["shape"][0] != s.size:
            raise ManifestMismatch(f"stream {name!r} holds {e['shape'][0]} bytes, manifest declares {s.size}")


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _group_params(t: CompressedTensor, positions: str) -> dict[str, Any]:
    """Parameters of the group a tensor joins. ``positions="auto"`` codes positions with Golomb
    codes unless the tensor keeps more than ``GOLOMB_MAX_DENSITY`` of its elements."""
    params: dict[str, Any] = {}
    if t.encoding in (C.ENC_TERNARY, C.ENC_SPARSE):
        if positions == "auto":
            dense_enough = t.numel and t.nnz > C.GOLOMB_MAX_DENSITY * t.numel
            positions = C.POSITIONS_BITMAP if dense_enough else C.POSITIONS_GOLOMB
        params["positions"] = positions
    if t.encoding in (C.ENC_SPARSE, C.ENC_DENSE):
        params["value_dtype"] = t.value_dtype
    return params


def plan_groups(tensors: list[CompressedTensor], max_group_elements: int,
                positions: str = "auto") -> list[tuple[dict[str, Any], str, list[int]]]:
    """Assign tensors to groups: same encoding and parameters, at most ``max_group_elements``
    elements each (a larger tensor gets a group of its own)."""
    groups: list[tuple[dict[str, Any], str, list[int]]] = []
    open_group: dict[str, int] = {}
    sizes: list[int] = []
    for i, t in enumerate(tensors):
        params = _group_params(t, positions)
        key = json.dumps([t.encoding, params], sort_keys=True)
        gi = open_group.get(key)
        if gi is None or (sizes[gi] + t.numel > max_group_elements and sizes[gi] > 0):
            gi = len(groups)
            groups.append((params, t.encoding, []))
            sizes.append(0)
            open_group[key] = gi
        groups[gi][2].append(i)
        sizes[gi] += t.numel
    return groups


def build(adapter: CompressedAdapter, *, zstd_level: int | None = C.DEFAULT_ZSTD_LEVEL,
          max_group_elements: int = C.DEFAULT_MAX_GROUP_ELEMENTS,
          tensor_digests: bool = False, group_digests: bool = True, manifest_encoding: str = "auto",
          positions: str = "auto") -> tuple[Manifest, dict[str, np.ndarray], dict[str, str]]:
    """Encode an adapter into (manifest, streams, safetensors metadata) without touching disk."""
    tensors = list(adapter.tensors.values())
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
    group_of = [0] * len(tensors)
    tensor_digest: list[str | None] = [None] * len(tensors)
    groups: list[GroupInfo] = []
    streams: dict[str, np.ndarray] = {}
    if positions not in ("auto",) + C.POSITION_CODINGS:
        raise InvalidArgument(f"positions must be 'auto' or one of {list(C.POSITION_CODINGS)}")
    for gi, (params, encoding, idx) in enumerate(plan_groups(tensors, max_group_elements, positions)):
        raw = get_codec(encoding).encode([tensors[i] for i in idx], params)
        infos = {}
        for role in C.stream_roles(encoding, params):
            comp, stored = smallest_frame(raw[role], zstd_level)
            name = f"g{gi}.{role}"
            streams[name] = np.frombuffer(stored, dtype=np.uint8)
            infos[role] = StreamInfo(name=name, compression=comp, size=len(stored),
                                     raw_size=len(raw[role]), sha256=sha256_hex(stored))
        # one member densified at a time unless per-tensor digests need them all
        dense = [tensors[i].to_dense() for i in idx] if tensor_digests else []
        digest = None
        if group_digests:
            digest = group_sha256(dense if tensor_digests else (tensors[i].to_dense() for i in idx))
        groups.append(GroupInfo(encoding=encoding, params=params, streams=infos, decoded_sha256=digest))
        for j, i in enumerate(idx):
            group_of[i] = gi
            if tensor_digests:
                tensor_digest[i] = tensor_sha256(dense[j])
    infos_t = [
        TensorInfo(name=t.name, shape=tuple(t.shape), dtype=t.dtype, group=group_of[i], nnz=t.nnz,
                   scale=t.scale if t.encoding == C.ENC_TERNARY else None, offset=float(t.offset),
                   sha256=tensor_digest[i])
        for i, t in enumerate(tensors)
    ]
    manifest = Manifest(tensors=infos_t, groups=groups, adapter=adapter.adapter,
                        base_model=adapter.base_model, compression=adapter.compression,
                        provenance=adapter.provenance, library_version=__version__,
                        required_features=[])
    manifest.check_consistency()
    text = manifest.to_json()
    if manifest_encoding == "auto":  # the shortest; on a tie the simpler
        manifest_encoding, stored = min(((e, encode_manifest_text(text, e)) for e in C.MANIFEST_ENCODINGS),
                                        key=lambda c: len(c[1].encode("utf-8")))
    elif manifest_encoding in C.MANIFEST_ENCODINGS:
        stored = encode_manifest_text(text, manifest_encoding)
    else:
        raise InvalidArgument(f"manifest_encoding must be 'auto' or one of {list(C.MANIFEST_ENCODINGS)}")
    meta = {
        C.META_FORMAT: C.FORMAT_NAME,
        C.META_VERSION: C.FORMAT_VERSION,
        C.META_MANIFEST_ENCODING: manifest_encoding,
        C.META_MANIFEST: stored,
        C.META_MANIFEST_SHA256: sha256_hex(text.encode("utf-8")),
    }
    return manifest, streams, meta


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write) -> None:
    """Call ``write(tmp_path)`` then move the finished file into place; never leave a partial file."""
    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFound(f"output folder does not exist: {parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # temp files are created 0600; finished files follow the umask
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save(adapter: CompressedAdapter, path: PathLike, *, zstd_level: int | None = C.DEFAULT_ZSTD_LEVEL,
         max_group_elements: int = C.DEFAULT_MAX_GROUP_ELEMENTS, tensor_digests: bool = False,
         group_digests: bool = True, manifest_encoding: str = "auto", positions: str = "auto") -> Manifest:
    """Write a compressed adapter to ``path`` atomically (temp file, fsync, rename).

    Args:
        adapter: what ``compress`` returned.
        path: destination; its folder must exist.
        zstd_level: zstd level for streams (a stream is stored raw when zstd does not shrink it);
            None stores every stream raw.
        max_group_elements: largest number of elements coded together in one group.
        tensor_digests: record the sha256 of each decoded tensor (32 bytes per tensor).
        group_digests: record one sha256 of each group's decoded tensors (32 bytes per group).
        manifest_encoding: ``"json"``, ``"zstd+base64"`` or ``"auto"`` (the shorter).
        positions: position coding of ternary and sparse groups: ``"golomb"`` (near the
            information bound), ``"bitmap"`` (one bit per element) or ``"auto"`` (Golomb unless a
            tensor keeps more than 40% of its elements).

    Returns:
        The manifest written.
    """
    manifest, streams, meta = build(adapter, zstd_level=zstd_level, max_group_elements=max_group_elements,
                                    tensor_digests=tensor_digests, group_digests=group_digests,
                                    manifest_encoding=manifest_encoding, positions=positions)
    try:
        atomic_write(path, lambda tmp: save_file(streams, tmp, metadata=meta))
    except (OSError, SafetensorError) as e:
        raise IOFailure(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from None
    return manifest


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _as_tensor(buf) -> torch.Tensor:
    if len(buf) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffers are never written to
        return torch.frombuffer(buf, dtype=torch.uint8)


def to_device(packed: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Move packed stream bytes to the device that decodes them: through pinned host memory with
    a non-blocking copy for CUDA, as they are for the CPU. Only packed bytes cross; the dense
    tensors are built on the device."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return packed
    if dev.type == "cuda":
        return packed.pin_memory().to(dev, non_blocking=True)
    return packed.to(dev)


class CompeftFile:
    """An open compeft file. Header, metadata and manifest are checked on open; tensor data is
    read lazily, one group at a time, through safetensors' memory map.

    Example:
        >>> with open_file("adapter.cpeft.safetensors") as f:
        ...     w = f.get_tensor(f.keys()[0], dtype="float32")
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        header, meta, _ = read_safetensors_header(self.path)
        self.manifest = parse_metadata(meta)
        check_streams_match(self.manifest, header)
        self.metadata = meta
        self._index = {t.name: i for i, t in enumerate(self.manifest.tensors)}
        self._members = self.manifest.group_members()
        self._handle = None
        # the last group read: (index, device, raw streams, decoding memo)
        self._cache: tuple[int, str, dict[str, torch.Tensor], dict] | None = None

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> CompeftFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handle = None
        self._cache = None

    # -- listing ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return [t.name for t in self.manifest.tensors]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self.manifest.tensors[self._index[name]]
        except KeyError:
            raise InputError(f"{self.path} has no tensor {name!r}") from None

    # -- streams ---------------------------------------------------------------------------
    def _st(self):
        if self._handle is None:
            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except Exception as e:  # safetensors raises its own untyped errors
                raise NotSafetensors(f"safetensors refused the file: {e}") from None
        return self._handle

    def stored_stream(self, info: StreamInfo) -> np.ndarray:
        """The stream's bytes as stored in the file (before unframing)."""
        if info.size == 0:
            return np.zeros(0, dtype=np.uint8)
        return self._st().get_tensor(info.name).numpy()

    def _group_raw(self, gi: int, device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict]:
        key = str(device)
        if self._cache is not None and self._cache[0] == gi and self._cache[1] == key:
            return self._cache[2], self._cache[3]
        raw = {}
        for role, info in self.manifest.groups[gi].streams.items():
            stored = self.stored_stream(info)
            actual = sha256_hex(stored)
            if actual != info.sha256:
                raise StreamDigestMismatch(
                    f"stream {info.name!r}: sha256 is {actual}, manifest declares {info.sha256}")
            raw[role] = to_device(_as_tensor(unframe(stored, info.compression, info.raw_size)), device)
        self._cache = (gi, key, raw, {})
        return raw, self._cache[3]

    def _decode(self, gi: int, select: list[int], dtype, device) -> dict[int, torch.Tensor]:
        g = self.manifest.groups[gi]
        members = [self.manifest.tensors[i] for i in self._members[gi]]
        raw, memo = self._group_raw(gi, device)
        return get_codec(g.encoding).decode(raw, members, g.params, select, dtype, memo)

    # -- tensors ---------------------------------------------------------------------------
    def get_tensor(self, name: str, *, dtype: str | torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> torch.Tensor:
        """Decode one tensor (in its target dtype unless ``dtype`` is given)."""
        info = self.tensor_info(name)
        j = self._members[info.group].index(self._index[name])
        return self._decode(info.group, [j], dtype, device)[j]

    def _decoded_groups(self, dtype, device, check: bool):
        """Yield (member indices, decoded tensors) for every group. With ``check`` the decoded
        digests are compared first, on tensors in their target dtypes; a group is decoded a
        second time only when the caller asked for another dtype (spec 5.5 rounds once)."""
        for gi, idx in enumerate(self._members):
            select = list(range(len(idx)))
            dec = self._decode(gi, select, None if check else dtype, device)
            if check:
                self._check_decoded(gi, idx, dec)
                if dtype is not None and any(to_torch(dtype) != to_torch(self.manifest.tensors[i].dtype) for i in idx):
                    dec = self._decode(gi, select, dtype, device)
            yield idx, dec
        self._cache = None

    def _check_decoded(self, gi: int, idx: list[int], dec: dict[int, torch.Tensor]) -> None:
        expected = self.manifest.groups[gi].decoded_sha256
        if expected is not None:
            actual = group_sha256([dec[j] for j in range(len(idx))])
            if actual != expected:
                raise TensorDigestMismatch(f"group {gi}: decoded sha256 is {actual}, manifest declares {expected}")
        for j, i in enumerate(idx):
            t = self.manifest.tensors[i]
            if t.sha256 is not None:
                actual = tensor_sha256(dec[j])
                if actual != t.sha256:
                    raise TensorDigestMismatch(
                        f"tensor {t.name!r}: decoded sha256 is {actual}, manifest declares {t.sha256}")

    def state_dict(self, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                   verify: bool = False) -> dict[str, torch.Tensor]:
        """Decode every tensor, each group's streams read once. With ``verify`` the decoded
        digests recorded for groups and tensors are checked as well (``verify()`` without a second
        decode)."""
        out: dict[int, torch.Tensor] = {}
        for idx, dec in self._decoded_groups(dtype, device, verify):
            for j, i in enumerate(idx):
                out[i] = dec[j]
        return {self.manifest.tensors[i].name: out[i] for i in range(len(self.manifest.tensors))}

    def verify(self) -> Manifest:
        """Check every stream digest, decode every tensor and check the decoded digests recorded
        for groups and tensors."""
        for _ in self._decoded_groups(None, "cpu", check=True):
            pass
        return self.manifest


def open_file(path: PathLike) -> CompeftFile:
    """Open a compeft file for lazy reading. Raises a ``CompeftError`` subclass when the header,
    metadata or manifest is not valid."""
    return CompeftFile(path)


def load(path: PathLike, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Decode every tensor of a compeft file. Stream digests are checked before decoding."""
    with CompeftFile(path) as f:
        return f.state_dict(dtype=dtype, device=device)


def verify(path: PathLike) -> Manifest:
    """Fully check a file: header, manifest, every stream digest, every decoded tensor digest.

    Raises the first problem found as a ``CompeftError`` subclass; returns the manifest otherwise.
    """
    with CompeftFile(path) as f:
        return f.verify()


__all__ = ["CompeftFile", "open_file", "load", "save", "verify", "build", "read_safetensors_header",
           "CompeftError"]
