"""Decoding groups on the GPU with the Triton kernels of ``codecs.kernels``.

Groups from one file or many (``load_many``) are sorted into batches that share an encoding, a
position coding, a value dtype and a target dtype; each batch's streams and member table travel to
the device in one copy and decode in a fixed handful of launches (bit-plane: two kernels and a
prefix sum; Golomb: six and three), however many groups and files it holds. The digests of the
stored streams are checked on the host before anything is copied, and the lengths and padding of
the streams whose sizes the manifest fixes; everything else is checked by the kernels, which set a
flag instead of stopping. The host reads the flag once, after every batch: when it is set the
groups are decoded again on the CPU, in order, so that the error raised is the CPU decoders' own
for the first group that does not decode.

Which path decodes is chosen per device by ``COMPEFT_KERNELS``: ``auto`` (the default) uses the
kernels on CUDA devices (compute capability 8.0 and up, or ROCm) when ``triton`` is installed and
torch operations otherwise; ``torch``
never uses them; ``triton`` always does, and on the CPU only in Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests run them without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import constants as C
from .codecs import get_codec
from .codecs.bits import check_bit_stream
from .codecs.native import INT_OF_SIZE
from .codecs.positions import golomb_m, golomb_widths
from .codecs.ternary import member_levels
from .device import as_tensor, to_device
from .dtypes import rounded_scalar, to_torch
from .errors import InvalidArgument, LimitExceeded, StreamCorrupt

if TYPE_CHECKING:
    from .manifest import TensorDescription

#: the environment variable that chooses the decoding path
ENV_KERNELS = "COMPEFT_KERNELS"
KERNEL_MODES = ("auto", "triton", "torch")
_KERNEL_ENCODINGS = (C.ENC_TERNARY, C.ENC_SPARSE)
_KERNEL_CODINGS = (C.POSITIONS_BITMAP, C.POSITIONS_GOLOMB)
#: kernel dtype codes (``codecs.kernels.F32`` ...)
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def kernels(device: str | torch.device) -> ModuleType | None:
    """The kernel module when groups decoded on ``device`` go through the Triton kernels, None
    when they go through torch operations (see the module's description)."""
    mode = os.environ.get(ENV_KERNELS, "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise InvalidArgument(f"{ENV_KERNELS} is {mode!r}; use one of {', '.join(KERNEL_MODES)}")
    dev = torch.device(device)
    if mode == "torch" or dev.type not in ("cuda", "cpu") or (dev.type == "cpu" and mode == "auto"):
        return None
    try:
        from .codecs import kernels as k
    except ImportError:
        if mode == "triton":
            raise InvalidArgument(f"{ENV_KERNELS}=triton needs the triton package (pip install 'compeft[gpu]')") from None
        return None
    if dev.type == "cuda" and mode == "auto" and torch.version.hip is None and \
            torch.cuda.get_device_capability(dev) < (8, 0):  # Triton's NVIDIA backend starts at Ampere
        return None
    if k.INTERPRETED != (dev.type == "cpu"):  # the interpreter runs on CPU tensors only
        if mode == "triton":
            raise InvalidArgument(f"{ENV_KERNELS}=triton decodes on the CPU only in Triton's interpreter and on "
                                  f"CUDA devices only without it (TRITON_INTERPRET is "
                                  f"{'set' if k.INTERPRETED else 'not set'}; device {dev})")
        return None
    return k


def target_dtype(encoding: str, params: Mapping[str, Any], members: Sequence[TensorDescription],
                 dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The one target dtype of a group the kernels decode, or None when torch operations decode
    it (another encoding, or members of several target dtypes)."""
    if encoding not in _KERNEL_ENCODINGS or params.get(C.PARAM_POSITIONS) not in _KERNEL_CODINGS:
        return None
    dtypes = {to_torch(dtype or m.dtype) for m in members}
    return dtypes.pop() if len(dtypes) == 1 else None


@dataclass
class GroupJob:
    """One group to decode: its encoding and parameters, its members, its raw (unframed) streams
    on the host, the target dtype of every member, and each member's output, a flat tensor on the
    device with ``numel`` elements of that dtype."""

    encoding: str
    params: Mapping[str, Any]
    members: Sequence[TensorDescription]
    raw: Mapping[str, np.ndarray]
    dtype: torch.dtype
    outs: Sequence[torch.Tensor]

    @property
    def coding(self) -> str:
        return str(self.params[C.PARAM_POSITIONS])

    @property
    def nnz(self) -> int:
        return sum(m.nnz for m in self.members)


def empty(numel: int, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """An output buffer; ``LimitExceeded`` when the device cannot hold it."""
    try:
        return torch.empty(numel, dtype=dtype, device=device)
    except (MemoryError, torch.OutOfMemoryError) as e:
        raise LimitExceeded(f"{numel:,} elements of {dtype} do not fit on {device}") from e


class Plan:
    """Jobs ready to decode: checked on the host, sorted into batches, each batch's streams and
    member table on the device. ``run`` decodes them (again and again, for timing, or for a server
    that keeps packed adapters resident on the device and decodes them when asked)."""

    def __init__(self, jobs: Sequence[GroupJob], device: str | torch.device) -> None:
        k = kernels(device)
        if k is None:
            raise InvalidArgument(f"no Triton kernels decode on {device}")
        self.jobs = list(jobs)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        for i, job in enumerate(self.jobs):
            _check_outputs(job, self.device)
            try:
                _check_host(job)
            except StreamCorrupt:
                self._first_error(self.jobs[:i])  # an earlier group's error comes first
                raise
        batches: dict[tuple[Any, ...], list[GroupJob]] = {}
        for job in self.jobs:
            key = (job.encoding, job.coding, job.params.get(C.PARAM_VALUE_DTYPE), job.dtype)
            batches.setdefault(key, []).append(job)
        self.kernels = k
        with self._on_device():
            self.batches = [b for b in (_Batch(k, batch, self.device) for batch in batches.values()) if b.rows]

    def _on_device(self) -> Any:
        """The device as the current CUDA device: Triton launches on the current device's stream."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @staticmethod
    def _first_error(jobs: Sequence[GroupJob]) -> None:
        for job in jobs:
            _cpu_decode(job)

    def run(self) -> None:
        """Decode every job into its outputs; one wait for the device, at the end. Raises
        ``StreamCorrupt`` (the CPU decoders' error for the first group, in order, that does not
        decode), the outputs then undefined."""
        with self._on_device():
            err = torch.zeros(1, dtype=torch.int32, device=self.device)
            for b in self.batches:
                b.launch(self.kernels, err)
            failed = bool(err.item())
        if failed:
            self._first_error(self.jobs)
            raise StreamCorrupt("the device decoder refused a group that the CPU decoder accepts")


def decode(jobs: Sequence[GroupJob], device: str | torch.device) -> None:
    """Decode every job into its outputs with the Triton kernels (``Plan(jobs, device).run()``)."""
    Plan(jobs, device).run()


def _cpu_decode(job: GroupJob) -> dict[int, torch.Tensor]:
    raw = {r: as_tensor(a) for r, a in job.raw.items()}
    return get_codec(job.encoding).decode(raw, job.members, job.params, list(range(len(job.members))), job.dtype)


def _check_outputs(job: GroupJob, device: torch.device) -> None:
    """The kernels write each member's ``numel`` elements at its output's address: the outputs
    must be exactly that (contiguous, of the job's dtype, on the device)."""
    if len(job.outs) != len(job.members):
        raise InvalidArgument(f"a group of {len(job.members)} members was given {len(job.outs)} outputs")
    for m, o in zip(job.members, job.outs, strict=True):
        if not (o.is_contiguous() and o.numel() == m.numel and o.dtype == job.dtype and o.device == device):
            raise InvalidArgument(f"the output of {m.name!r} must be a contiguous tensor of {m.numel} {job.dtype} "
                                  f"elements on {device}, not {tuple(o.shape)} {o.dtype} on {o.device}")


def _check_host(job: GroupJob) -> None:
    """The checks of stream lengths and padding that need no decoding (spec 4.1, 8.4)."""
    k = job.nnz
    if job.encoding == C.ENC_TERNARY:
        check_bit_stream(as_tensor(job.raw[C.ROLE_SIGNS]), k)
    else:
        size = k * C.DTYPE_ITEMSIZE[job.params[C.PARAM_VALUE_DTYPE]]
        if job.raw[C.ROLE_VALUES].size != size:
            raise StreamCorrupt(f"values stream has {job.raw[C.ROLE_VALUES].size} bytes, {k} entries need {size}")
    if job.coding == C.POSITIONS_BITMAP:
        check_bit_stream(as_tensor(job.raw[C.ROLE_POSITIONS]), sum(m.numel for m in job.members))
        return
    fields = sum(m.nnz * golomb_widths(golomb_m(m.numel, m.nnz))[0] for m in job.members)
    check_bit_stream(as_tensor(job.raw[C.ROLE_REMAINDERS]), fields)
    if k == 0:
        if job.raw[C.ROLE_UNARY].size:
            raise StreamCorrupt("unary stream has trailing bytes")
        check_bit_stream(as_tensor(job.raw[C.ROLE_EXTRA]), 0)


class _Pack:
    """Host arrays laid end to end (each at a multiple of 16 bytes) for one copy to the device."""

    def __init__(self) -> None:
        self.parts: list[tuple[int, np.ndarray]] = []
        self.size = 0

    def add(self, arrays: Sequence[np.ndarray]) -> tuple[int, int]:
        """Append arrays back to back; (offset, bytes) of the run."""
        self.size = -(-self.size // 16) * 16
        start = self.size
        for a in arrays:
            flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            self.parts.append((self.size, flat))
            self.size += flat.size
        return start, self.size - start

    def to(self, device: str | torch.device) -> torch.Tensor:
        dev = torch.device(device)
        host = torch.empty(max(self.size, 16), dtype=torch.uint8, pin_memory=dev.type == "cuda")
        buf = host.numpy()
        for off, flat in self.parts:
            buf[off:off + flat.size] = flat
        return to_device(host, dev) if dev.type == "cuda" else host


def _view(buf: torch.Tensor, run: tuple[int, int], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    off, n = run
    item = dtype.itemsize
    return buf[off:off + max(n, item)].view(dtype)


def _levels(job: GroupJob) -> np.ndarray:
    """(members, 3) int64 level columns of the member table (module ``codecs.kernels``)."""
    tint = INT_OF_SIZE[job.dtype.itemsize]
    if job.encoding == C.ENC_TERNARY:
        return member_levels(job.members, job.dtype).view(tint).to(torch.int64).numpy()
    out = np.zeros((len(job.members), 3), dtype=np.int64)
    for j, m in enumerate(job.members):
        out[j, 0] = int(rounded_scalar(m.offset, job.dtype).view(tint))
        out[j, 1] = int(np.float32(m.offset).view(np.int32))
        out[j, 2] = int(m.offset != 0.0)
    return out


def _entries_stream(job: GroupJob) -> tuple[str, np.ndarray]:
    role = C.ROLE_SIGNS if job.encoding == C.ENC_TERNARY else C.ROLE_VALUES
    return role, job.raw[role]


class _Batch:
    """Groups that share an encoding, a position coding, a value dtype and a target dtype: their
    streams end to end and their member table in one buffer on the device."""

    def __init__(self, k: ModuleType, batch: Sequence[GroupJob], device: str | torch.device) -> None:
        self.device = device
        self.ternary = batch[0].encoding == C.ENC_TERNARY
        self.bitmap = batch[0].coding == C.POSITIONS_BITMAP
        self.rows: list[np.ndarray] = []
        self.entries = self.elements = 0
        pack = _Pack()
        roles = (C.ROLE_POSITIONS,) if self.bitmap else (C.ROLE_UNARY, C.ROLE_REMAINDERS, C.ROLE_EXTRA)
        bytes_before = dict.fromkeys(roles + ("entries",), 0)
        for job in batch:
            self._add_rows(k, job, bytes_before)
            for r in roles:
                bytes_before[r] += job.raw[r].size
            bytes_before["entries"] += _entries_stream(job)[1].size
            self.entries += job.nnz
        if not self.rows:
            return
        runs = [pack.add([j.raw[r] for j in batch]) for r in roles]
        entries = pack.add([_entries_stream(j)[1] for j in batch])
        tab_run = pack.add([np.stack(self.rows)])
        self.buffer = buf = pack.to(device)  # every view below points into it
        self.streams = [(_view(buf, r), r[1]) for r in runs]
        self.tab = _view(buf, tab_run, torch.int64)
        if self.ternary:
            self.signs, self.values, self.nsigns = _view(buf, entries), _view(buf, entries), entries[1]
            val = 0
        else:
            vdt = to_torch(batch[0].params[C.PARAM_VALUE_DTYPE])
            self.signs, self.nsigns = _view(buf, entries), 0
            self.values = _view(buf, entries, INT_OF_SIZE[vdt.itemsize])
            val = _DTYPE_CODE[vdt]
        self.block = 8192 if k.INTERPRETED else 1024
        self.const = {"ITERS": max(1, (len(self.rows) - 1).bit_length()) + 1, "BLOCK": self.block,
                      "TERNARY": self.ternary, "VAL": val, "OUT": _DTYPE_CODE[batch[0].dtype]}

    def _add_rows(self, k: ModuleType, job: GroupJob, before: dict[str, int]) -> None:
        """The member table's rows of one group (members without elements have none)."""
        levels = _levels(job)
        first, group_rows = self.entries, []
        bit = 8 * before.get(C.ROLE_POSITIONS, 0)
        field = 8 * before.get(C.ROLE_REMAINDERS, 0)
        for j, m in enumerate(job.members):
            mm = golomb_m(m.numel, m.nnz)
            w, u = golomb_widths(mm)
            if m.numel:
                row = np.zeros(k.NF.value, dtype=np.int64)
                values = {k.C_BIT: bit, k.C_NUMEL: m.numel, k.C_FIRST: first, k.C_NNZ: m.nnz,
                          k.C_DST: job.outs[j].data_ptr(), k.C_SBASE: 8 * before["entries"] - self.entries,
                          k.C_EOFF: self.elements}
                if not self.bitmap:
                    unary = before[C.ROLE_UNARY]
                    values.update({
                        k.C_M: mm, k.C_W: w, k.C_U: u, k.C_FB: field, k.C_LIMIT: C.MAX_ELEMENTS_PER_TENSOR // mm,
                        k.C_UB: 8 * unary, k.C_UE: 8 * (unary + job.raw[C.ROLE_UNARY].size),
                        k.C_GFIRST: self.entries, k.C_GLAST: self.entries + job.nnz,
                        k.C_XB: 8 * before[C.ROLE_EXTRA], k.C_XN: job.raw[C.ROLE_EXTRA].size})
                row[[c.value for c in values]] = list(values.values())
                row[k.C_L0.value:k.C_L0.value + 3] = levels[j]
                group_rows.append(len(self.rows))
                self.rows.append(row)
                self.elements += m.numel
            bit += m.numel
            first += m.nnz
            field += m.nnz * w
        with_entries = [r for r in group_rows if self.rows[r][k.C_NNZ.value] > 0]
        for r in group_rows:
            self.rows[r][k.C_GM.value] = with_entries[0] if with_entries else r

    def launch(self, k: ModuleType, err: torch.Tensor) -> None:
        """Queue the batch's kernels; a failed check sets ``err``."""
        if self.bitmap:
            self._bitmap(k, err)
        else:
            self._golomb(k, err)

    def _bitmap(self, k: ModuleType, err: torch.Tensor) -> None:
        (plane, nbytes), = self.streams
        grid = (-(-8 * nbytes // self.block),)
        counts = torch.empty(grid[0], dtype=torch.int64, device=self.device)
        k.count_ones[grid](plane, nbytes, counts, BLOCK=self.block)
        base = _exclusive(counts, self.entries, err)
        k.bitmap_decode[grid](plane, nbytes, base, self.entries, self.tab, len(self.rows), self.signs, self.nsigns,
                              self.values, err, **self.const)

    def _golomb(self, k: ModuleType, err: torch.Tensor) -> None:
        (unary, nunary), (rem, nrem), (extra, nextra) = self.streams
        tab, nrows, block, total, dev = self.tab, len(self.rows), self.block, self.entries, self.device
        common = {"ITERS": self.const["ITERS"], "BLOCK": block}
        k.fill_background[(-(-self.elements // block),)](tab, nrows, self.elements, OUT=self.const["OUT"], **common)
        if total == 0:
            return
        grid = (max(1, -(-8 * nunary // block)),)
        counts = torch.zeros(grid[0], dtype=torch.int64, device=dev)
        if nunary:
            k.count_ones[grid](unary, nunary, counts, BLOCK=block)
        base = _exclusive(counts, total, err)
        ends = torch.empty(total, dtype=torch.int64, device=dev)
        if nunary:
            k.compact_ones[grid](unary, nunary, base, ends, total, BLOCK=block)
        grid = (-(-total // block),)
        counts = torch.empty(grid[0], dtype=torch.int64, device=dev)
        mloc = torch.zeros(2 * nrows, dtype=torch.int64, device=dev)
        k.golomb_need[grid](tab, nrows, ends, total, rem, nrem, counts, mloc, err, **common)
        nbase = _exclusive(counts, None, err)
        counts = torch.empty(grid[0], dtype=torch.int64, device=dev)
        k.golomb_sums[grid](tab, nrows, ends, total, rem, nrem, extra, nextra, nbase, counts, mloc, err, **common)
        gbase = _exclusive(counts, None, err)
        k.golomb_scatter[grid](tab, nrows, ends, total, rem, nrem, extra, nextra, nbase, gbase, mloc, self.signs,
                               self.nsigns, self.values, err, **self.const)


def _exclusive(counts: torch.Tensor, total: int | None, err: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums; with ``total``, sets ``err`` when the counts do not add up to it (on
    the device, without waiting for it)."""
    incl = torch.cumsum(counts, 0)
    if total is not None:
        err.bitwise_or_((incl[-1:] != total).to(torch.int32))
    return incl - counts


__all__ = ["ENV_KERNELS", "GroupJob", "Plan", "decode", "empty", "kernels", "target_dtype"]
