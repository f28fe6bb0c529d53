"""Reading compeft files (spec sections 2, 7.4, 8): ``open_file`` checks the container, the
metadata and the manifest up front, then reads and decodes streams lazily, one group at a time;
``load`` decodes every tensor, ``verify`` checks every digest, ``read`` returns the file's
compressed form (the inverse of ``save``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import constants as C
from . import device_decode
from .budget import Budget, resolve
from .codecs import REGISTRY, get_codec
from .compressed import CompressedAdapter, CompressedTensor
from .container import ContainerFile
from .device import as_tensor, to_device
from .dtypes import to_torch
from .errors import InputError, LimitExceeded, ManifestMismatch, StreamDigestMismatch, TensorDigestMismatch
from .framing import unframe
from .integrity import group_sha256, sha256_hex, tensor_sha256
from .manifest import Manifest, StreamInfo, TensorInfo, parse_metadata

PathLike = str | os.PathLike[str]


def check_streams_match(manifest: Manifest, header: dict[str, Any]) -> None:
    """Every safetensors tensor is a U8 vector named by exactly one manifest stream, and sizes
    agree (spec 2.3)."""
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


def decode_need(members: list[TensorInfo], select: list[int], streams: list[StreamInfo],
                itemsizes: list[int] | None) -> int:
    """Bytes one group decode holds at once (spec 8.5): the streams as stored and unframed, the
    positions decoding works through (8 bytes and a sign per kept entry of the group, one mask as
    long as its largest member) and, when ``itemsizes`` are given, the selected members' outputs."""
    need = sum(s.size + s.raw_size for s in streams)
    need += 9 * sum(m.nnz for m in members) + max((m.numel for m in members), default=0)
    if itemsizes is not None:
        need += sum(members[j].numel * itemsizes[k] for k, j in enumerate(select))
    return need


class CompeftFile:
    """An open compeft file. Header, metadata and manifest are checked on open; tensor data is
    read lazily, one group at a time, through the one open file handle. Every decode is checked
    against ``budget`` (spec 8.5) before its streams are read.

    Example:
        >>> with open_file("adapter.cpeft.safetensors") as f:
        ...     w = f.get_tensor(f.keys()[0], dtype="float32")
    """

    def __init__(self, path: PathLike, *, budget: Budget | None = None) -> None:
        self.path = Path(path)
        self.budget = resolve(budget)
        self._file = ContainerFile(path, max_objects=self.budget.json_objects)
        try:
            self.manifest = parse_metadata(self._file.metadata, REGISTRY, self.budget)
            check_streams_match(self.manifest, self._file.header)
        except BaseException:
            self._file.close()
            raise
        self.metadata = self._file.metadata
        self._index = {t.name: i for i, t in enumerate(self.manifest.tensors)}
        self._members = self.manifest.group_members()
        # the last group read: (index, device, raw streams, decoding memo)
        self._cache: tuple[int, str, dict[str, torch.Tensor], dict[str, Any]] | None = None

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> CompeftFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
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
            raise InputError(f"{self.path} has no tensor {name!r}", path=str(self.path)) from None

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return self._file.size

    def sha256(self) -> str:
        """sha256 of the whole file, read through the open handle."""
        return self._file.sha256()

    # -- streams ---------------------------------------------------------------------------
    def stored_stream(self, info: StreamInfo) -> np.ndarray:
        """The stream's bytes as stored in the file (before unframing)."""
        return self._file.read_tensor_bytes(info.name)

    def _host_streams(self, gi: int) -> dict[str, np.ndarray]:
        """The group's raw (unframed) streams on the host, each stream digest checked before
        unframing."""
        streams = self.manifest.groups[gi].streams
        self.budget.check_bytes(decode_need(self._members_of(gi), [], list(streams.values()), None),
                                f"{self.path}: reading group {gi}")
        raw = {}
        for role, info in streams.items():
            stored = self.stored_stream(info)
            actual = sha256_hex(stored)
            if actual != info.sha256:
                raise StreamDigestMismatch(f"stream {info.name!r}: sha256 is {actual}, manifest declares {info.sha256}",
                                           subject=info.name, expected=info.sha256, actual=actual)
            try:
                unframed = unframe(stored, info.compression, info.raw_size)
            except MemoryError:
                raise LimitExceeded(f"stream {info.name!r} unframes to {info.raw_size:,} bytes, more than this "
                                    f"machine can allocate") from None
            raw[role] = unframed if isinstance(unframed, np.ndarray) else np.frombuffer(unframed, dtype=np.uint8)
        return raw

    def _group_raw(self, gi: int, device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The group's raw streams on ``device``, each stream digest checked before unframing."""
        key = str(device)
        if self._cache is not None and self._cache[0] == gi and self._cache[1] == key:
            return self._cache[2], self._cache[3]
        raw = {role: to_device(as_tensor(a), device) for role, a in self._host_streams(gi).items()}
        memo: dict[str, Any] = {}
        self._cache = (gi, key, raw, memo)
        return raw, memo

    def _members_of(self, gi: int) -> list[TensorInfo]:
        return [self.manifest.tensors[i] for i in self._members[gi]]

    def _decode(self, gi: int, select: list[int], dtype: str | torch.dtype | None,
                device: str | torch.device) -> dict[int, torch.Tensor]:
        g = self.manifest.groups[gi]
        members = self._members_of(gi)
        need = decode_need(members, select, list(g.streams.values()),
                           [to_torch(dtype or members[j].dtype).itemsize for j in select])
        self.budget.check_bytes(need, f"{self.path}: decoding group {gi}")
        raw, memo = self._group_raw(gi, device)
        try:
            return get_codec(g.encoding).decode(raw, members, g.params, select, dtype, memo)
        except (MemoryError, torch.OutOfMemoryError) as e:
            raise LimitExceeded(f"group {gi} decodes to {need:,} bytes, more than {device} can allocate") from e
        except RuntimeError as e:  # torch's CPU allocator reports failure as a RuntimeError
            if "allocate" not in str(e):
                raise
            raise LimitExceeded(f"group {gi} decodes to {need:,} bytes, more than {device} can allocate") from e

    # -- tensors ---------------------------------------------------------------------------
    def get_tensor(self, name: str, *, dtype: str | torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> torch.Tensor:
        """Decode one tensor (in its target dtype unless ``dtype`` is given)."""
        info = self.tensor_info(name)
        j = self._members[info.group].index(self._index[name])
        return self._decode(info.group, [j], dtype, device)[j]

    def _decoded_groups(self, dtype: str | torch.dtype | None, device: str | torch.device,
                        check: bool) -> Iterator[tuple[list[int], dict[int, torch.Tensor]]]:
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
                raise TensorDigestMismatch(f"group {gi}: decoded sha256 is {actual}, manifest declares {expected}",
                                           subject=f"group {gi}", expected=expected, actual=actual)
        for j, i in enumerate(idx):
            t = self.manifest.tensors[i]
            if t.sha256 is not None:
                actual = tensor_sha256(dec[j])
                if actual != t.sha256:
                    raise TensorDigestMismatch(
                        f"tensor {t.name!r}: decoded sha256 is {actual}, manifest declares {t.sha256}",
                        subject=t.name, expected=t.sha256, actual=actual)

    def state_dict(self, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                   verify: bool = False) -> dict[str, torch.Tensor]:
        """Decode every tensor, each group's streams read once. With ``verify`` the decoded
        digests recorded for groups and tensors are checked as well (``verify()`` without a second
        decode). On a CUDA device the groups that the Triton kernels decode are views of one
        allocation per target dtype (``load_many``)."""
        if not verify and device_decode.kernels(device) is not None:
            return _decode_files([self], dtype, device)[0]
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

    def compressed(self, *, verify: bool = False) -> CompressedAdapter:
        """The file's compressed form: every member's payload unpacked by its codec, with the
        checks decoding makes (and with ``verify`` the decoded digests too)."""
        m = self.manifest
        tensors: dict[int, CompressedTensor] = {}
        # the global sigma is every scale's unit only when the scales are alpha * sigma (the paper's
        # method, which records no options)
        opts = m.compression.options or {}
        paper_scales = opts.get("scale", C.SCALE_SIGMA) == C.SCALE_SIGMA
        sigma = m.compression.sigma if m.compression.scope == C.SCOPE_GLOBAL and paper_scales else None
        for gi, idx in enumerate(self._members):
            g = m.groups[gi]
            if verify:
                members = self._members_of(gi)
                select = list(range(len(members)))
                self.budget.check_bytes(decode_need(members, select, list(g.streams.values()),
                                                    [to_torch(t.dtype).itemsize for t in members]),
                                        f"{self.path}: decoding group {gi}")
            raw, _ = self._group_raw(gi, "cpu")
            codec = get_codec(g.encoding)
            payloads = codec.unpack(raw, self._members_of(gi), g.params)
            for i, payload in zip(idx, payloads, strict=True):
                tensors[i] = CompressedTensor.from_payload(m.tensors[i], g.encoding, payload,
                                                           sigma if codec.member_scale else None)
            if verify:
                self._check_decoded(gi, idx, {j: tensors[i].to_dense() for j, i in enumerate(idx)})
        self._cache = None
        return CompressedAdapter(tensors={m.tensors[i].name: tensors[i] for i in range(len(m.tensors))},
                                 adapter=m.adapter, base_model=m.base_model, compression=m.compression,
                                 provenance=m.provenance, requires=list(m.requires))


def _decode_files(files: list[CompeftFile], dtype: str | torch.dtype | None,
                  device: str | torch.device) -> list[dict[str, torch.Tensor]]:
    """Every tensor of every file, the groups the kernels decode gathered into one call of
    ``device_decode.decode``; each file's kernel outputs are views of one buffer per dtype. Every
    file's stream digests and budget are checked before any group is decoded."""
    jobs: list[device_decode.GroupJob] = []
    decoded: list[dict[int, torch.Tensor]] = []
    # groups torch operations decode: (file, group, the file's outputs, its streams once checked)
    other: list[tuple[CompeftFile, int, dict[int, torch.Tensor], dict[str, np.ndarray]]] = []
    for f in files:
        out: dict[int, torch.Tensor] = {}
        planned: list[tuple[int, torch.dtype]] = []
        sizes: dict[torch.dtype, int] = {}
        for gi in range(len(f._members)):
            g, members = f.manifest.groups[gi], f._members_of(gi)
            tdt = device_decode.target_dtype(g.encoding, g.params, members, dtype)
            itemsizes = [to_torch(dtype or m.dtype).itemsize for m in members]
            f.budget.check_bytes(decode_need(members, list(range(len(members))), list(g.streams.values()), itemsizes),
                                 f"{f.path}: decoding group {gi}")
            if tdt is None:  # its streams read (and their digests checked) now, decoded after every file's
                other.append((f, gi, out, f._host_streams(gi)))
                continue
            planned.append((gi, tdt))
            sizes[tdt] = sizes.get(tdt, 0) + sum(m.numel for m in members)
        buffers = {tdt: device_decode.empty(n, tdt, device) for tdt, n in sizes.items()}
        used = dict.fromkeys(sizes, 0)
        for gi, tdt in planned:
            g, members, idx = f.manifest.groups[gi], f._members_of(gi), f._members[gi]
            flat = []
            for j, m in enumerate(members):
                t = buffers[tdt][used[tdt]:used[tdt] + m.numel]
                used[tdt] += m.numel
                flat.append(t)
                out[idx[j]] = t.view(m.shape)
            jobs.append(device_decode.GroupJob(g.encoding, g.params, members, f._host_streams(gi), tdt, flat))
        decoded.append(out)
    for f, gi, out, streams in other:
        idx = f._members[gi]
        f._cache = (gi, str(device), {r: to_device(as_tensor(a), device) for r, a in streams.items()}, {})
        for j, t in f._decode(gi, list(range(len(idx))), dtype, device).items():
            out[idx[j]] = t
        f._cache = None
    if jobs:
        device_decode.decode(jobs, device)
    return [{f.manifest.tensors[i].name: out[i] for i in range(len(f.manifest.tensors))}
            for f, out in zip(files, decoded, strict=True)]


def load_many(paths: Iterable[PathLike], *, dtype: str | torch.dtype | None = None,
              device: str | torch.device = "cpu", budget: Budget | None = None) -> list[dict[str, torch.Tensor]]:
    """Decode every tensor of several compeft files, one state dict per file in order: what
    ``load`` gives for each, made for a server that swaps adapters. On a CUDA device with
    ``triton`` installed the groups of all files are decoded together, one launch per kernel for
    every group of an encoding, with one wait at the end; a file's tensors are then views of one
    allocation per dtype, freed when the last of them is. Every file is opened and its stream
    digests checked before anything is decoded."""
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(CompeftFile(p, budget=budget)) for p in paths]
        if device_decode.kernels(device) is not None:
            return _decode_files(files, dtype, device)
        return [f.state_dict(dtype=dtype, device=device) for f in files]


def open_file(path: PathLike, *, budget: Budget | None = None) -> CompeftFile:
    """Open a compeft file for lazy reading. Raises a ``CompeftError`` subclass when the header,
    metadata or manifest is not valid, ``LimitExceeded`` when it is over ``budget`` (spec 8.5;
    ``Budget.default()`` when None)."""
    return CompeftFile(path, budget=budget)


def load(path: PathLike, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", budget: Budget | None = None) -> dict[str, torch.Tensor]:
    """Decode every tensor of a compeft file. Stream digests are checked before decoding."""
    with CompeftFile(path, budget=budget) as f:
        return f.state_dict(dtype=dtype, device=device)


def verify(path: PathLike, *, budget: Budget | None = None) -> Manifest:
    """Fully check a file: header, manifest, every stream digest, every decoded tensor digest.

    Raises the first problem found as a ``CompeftError`` subclass; returns the manifest otherwise.
    """
    with CompeftFile(path, budget=budget) as f:
        return f.verify()


def read(path: PathLike, *, verify: bool = False, budget: Budget | None = None) -> CompressedAdapter:
    """A compeft file as the ``CompressedAdapter`` that ``save`` wrote: ``save(read(p), q)`` with
    the writer options that made ``p`` writes the same streams and manifest."""
    with CompeftFile(path, budget=budget) as f:
        return f.compressed(verify=verify)


__all__ = ["CompeftFile", "open_file", "load", "load_many", "verify", "read", "check_streams_match"]
