"""Position codings (spec 4.7): where the kept entries of a group are. ``ternary`` and ``sparse``
groups name one in ``params.positions``; each is a class registered by name, as codecs are.

``bitmap``: one bit per element (4.1). ``golomb``: per member, the gaps between consecutive kept
positions (zeros before each kept element, restarting at the member's first element), Golomb-coded
with a parameter ``m`` derived from the member's ``numel`` and ``nnz``; the quotient in unary, the
remainder in truncated binary split into a fixed-width field and one extra bit where needed, so
that decoding is a handful of prefix sums and gathers (vectorised, on any device).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from .. import constants as C
from ..errors import InvalidArgument, StreamCorrupt, UnknownEncoding
from . import native
from .bits import check_bit_stream, pack_bits, popcount, unpack_bits, unpack_range
from .layout import element_offsets, positions_bitmap
from .types import Member

if TYPE_CHECKING:
    from ..manifest import TensorDescription

#: Above this fraction of kept elements in a tensor the writer's ``"auto"`` choice is a bitmap.
GOLOMB_MAX_DENSITY = 0.4
#: Entries decoded at a time by the torch Golomb decoder (bounds its temporaries).
DECODE_BLOCK = 1 << 16

#: position-coding name -> its coding (filled as coding classes are defined)
CODINGS: dict[str, PositionCoding] = {}

#: (member index, where its entries are, index of its first entry in the group's entry sequence)
Located = tuple[int, torch.Tensor, int]


class PositionCoding(ABC):
    """How a group stores the positions of its entries."""

    name: ClassVar[str]
    #: the coding's stream roles, in order (they come first among the group's roles)
    roles: ClassVar[tuple[str, ...]]
    #: the C extension decodes ternary groups of this coding straight into their outputs
    #: (``fill_ternary``); others decode them with ``locate``
    native_ternary: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            CODINGS[cls.name] = cls()

    @abstractmethod
    def raw_sizes(self, members: Sequence[TensorDescription]) -> dict[str, tuple[int, bool]]:
        """Per role: (size, exact); ``exact`` False means ``size`` is an upper bound (spec 8.4)."""

    @abstractmethod
    def encode(self, members: Sequence[Member]) -> dict[str, bytes]:
        """Streams of the group's positions; members carry ``numel`` and sorted ``indices``."""

    @abstractmethod
    def locate(self, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription], select: Sequence[int],
               memo: dict[str, Any] | None = None) -> Iterator[Located]:
        """(member index, where, first entry) for the selected members: ``where`` is a bool mask
        over the member's elements or its kept flat indices in increasing order; ``first`` is the
        index of its first entry in the group's entry sequence. ``memo``, when given, keeps
        group-wide decoding work between calls on the same streams."""

    def fill_ternary(self, lib: Any, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription],
                     signs: np.ndarray, outs: list[Any], levels: np.ndarray, element_size: int) -> None:
        """Decode a ternary group with the C extension straight into ``outs`` (one buffer per
        member, or None for members not wanted): each element becomes one of the member's three
        ``levels`` (background, +, -), as raw integers of ``element_size`` bytes. Codings with
        ``native_ternary`` implement it."""
        raise NotImplementedError(f"{self.name} has no native ternary decoder")


def get_position_coding(name: Any) -> PositionCoding:
    """The coding named ``name``; ``UnknownEncoding`` if there is none."""
    coding = CODINGS.get(name) if isinstance(name, str) else None
    if coding is None:
        raise UnknownEncoding(f"unknown position coding {name!r}")
    return coding


def choose(tensor: Member, requested: str) -> str:
    """The writer's choice for one tensor: ``requested``, or for ``"auto"`` Golomb codes unless
    the tensor keeps more than ``GOLOMB_MAX_DENSITY`` of its elements."""
    if requested != "auto":
        return get_position_coding(requested).name
    dense_enough = tensor.numel and tensor.nnz > GOLOMB_MAX_DENSITY * tensor.numel
    return C.POSITIONS_BITMAP if dense_enough else C.POSITIONS_GOLOMB


def kept_indices(where: torch.Tensor) -> np.ndarray:
    """A ``locate`` result as int64 flat indices on the CPU."""
    if where.dtype == torch.bool:
        where = torch.nonzero(where).reshape(-1)
    return where.to("cpu", torch.int64).numpy().copy()


# ---------------------------------------------------------------------------------------------
# bitmap (spec 4.7.1)
# ---------------------------------------------------------------------------------------------
class Bitmap(PositionCoding):
    """One bit per element of the group, set where an entry is kept."""

    name = C.POSITIONS_BITMAP
    roles = (C.ROLE_POSITIONS,)
    native_ternary = True

    def raw_sizes(self, members: Sequence[TensorDescription]) -> dict[str, tuple[int, bool]]:
        return {C.ROLE_POSITIONS: ((sum(m.numel for m in members) + 7) // 8, True)}

    def encode(self, members: Sequence[Member]) -> dict[str, bytes]:
        mask = positions_bitmap([m.numel for m in members], [_indices(m) for m in members])
        return {C.ROLE_POSITIONS: pack_bits(mask)}

    def locate(self, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription], select: Sequence[int],
               memo: dict[str, Any] | None = None) -> Iterator[Located]:
        plane = raw[C.ROLE_POSITIONS]
        offs = element_offsets([m.numel for m in members])
        declared = np.concatenate([[0], np.cumsum([m.nnz for m in members], dtype=np.int64)])
        if len(select) == len(members):  # whole group: one unpack, each member's own count
            bits = unpack_bits(plane, int(offs[-1]))
            for j in select:
                mask = bits[int(offs[j]):int(offs[j + 1])]
                if int(torch.count_nonzero(mask)) != members[j].nnz:
                    raise StreamCorrupt(f"tensor {members[j].name!r}: position bit-plane disagrees with nnz")
                yield j, mask, int(declared[j])
            return
        check_bit_stream(plane, int(offs[-1]))
        for j in select:  # one member: unpack its bytes only, count the bits before it by bytes
            a, b = int(offs[j]), int(offs[j + 1])
            mask = unpack_range(plane, a, b)
            before = popcount(plane[:a // 8]) + int(torch.count_nonzero(unpack_range(plane, 8 * (a // 8), a)))
            if before != int(declared[j]) or int(torch.count_nonzero(mask)) != members[j].nnz:
                raise StreamCorrupt(f"tensor {members[j].name!r}: position bit-plane disagrees with nnz")
            yield j, mask, before

    def fill_ternary(self, lib: Any, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription],
                     signs: np.ndarray, outs: list[Any], levels: np.ndarray, element_size: int) -> None:
        plane = raw[C.ROLE_POSITIONS]
        check_bit_stream(plane, sum(m.numel for m in members))
        numel, nnz = native.member_arrays(members)
        native.call(lib.bitmap_ternary, plane.numpy(), signs, numel, nnz, outs, levels, element_size)


# ---------------------------------------------------------------------------------------------
# golomb (spec 4.7.2)
# ---------------------------------------------------------------------------------------------
def golomb_m(numel: int, nnz: int) -> int:
    """Golomb parameter of a member: ``max(1, floor(((n-k)*45426 + k*32768) / (k*65536)))``, i.e.
    ln 2 * (n-k)/k rounded, in exact integer arithmetic (spec 4.7.2); 1 when ``nnz`` is 0."""
    if nnz <= 0:
        return 1
    return max(1, ((numel - nnz) * 45426 + nnz * 32768) // (nnz * 65536))


def golomb_widths(m: int) -> tuple[int, int]:
    """(field width w, cutoff u) of the truncated-binary remainder for parameter m."""
    if m == 1:
        return 0, 0
    b = (m - 1).bit_length()  # ceil(log2 m)
    return b - 1, (1 << b) - m


class Golomb(PositionCoding):
    """Golomb codes of the gaps between entries, in three streams: unary quotients, fixed-width
    remainder fields, and the extra bits of the remainders that need one."""

    name = C.POSITIONS_GOLOMB
    roles = (C.ROLE_UNARY, C.ROLE_REMAINDERS, C.ROLE_EXTRA)
    native_ternary = True

    def raw_sizes(self, members: Sequence[TensorDescription]) -> dict[str, tuple[int, bool]]:
        n = sum(m.numel for m in members)
        k = sum(m.nnz for m in members)
        fields = sum(m.nnz * golomb_widths(golomb_m(m.numel, m.nnz))[0] for m in members)
        return {
            C.ROLE_UNARY: ((n + k + 7) // 8, False),
            C.ROLE_REMAINDERS: ((fields + 7) // 8, True),
            C.ROLE_EXTRA: ((k + 7) // 8, False),
        }

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, members: Sequence[Member]) -> dict[str, bytes]:
        lib = native.module(torch.device("cpu"))
        if lib is not None:
            return self._encode_native(lib, members)
        unary, fields, extra = [], [], []
        for mem in members:
            idx = _indices(mem)
            if idx.size == 0:
                continue
            m = golomb_m(mem.numel, idx.size)
            w, u = golomb_widths(m)
            gaps = np.diff(idx, prepend=-1) - 1
            q, r = np.divmod(gaps, m)
            bits = np.zeros(int(q.sum()) + idx.size, dtype=bool)
            bits[np.cumsum(q + 1) - 1] = True
            unary.append(bits)
            if m > 1:
                big = r >= u
                x = np.where(big, (r + u) >> 1, r)
                fields.append(((x[:, None] >> np.arange(w)) & 1).astype(bool).reshape(-1))
                extra.append(((r[big] + u) & 1).astype(bool))
        return {C.ROLE_UNARY: pack_bits(_cat(unary)), C.ROLE_REMAINDERS: pack_bits(_cat(fields)),
                C.ROLE_EXTRA: pack_bits(_cat(extra))}

    def _encode_native(self, lib: Any, members: Sequence[Member]) -> dict[str, bytes]:
        kept = [_indices(m) for m in members]
        params = [golomb_m(m.numel, ix.size) for m, ix in zip(members, kept, strict=True)]
        numel, nnz, mm = native.member_arrays(members, params)
        n, k = int(numel.sum()), int(nnz.sum())
        fields = sum(int(c) * golomb_widths(p)[0] for c, p in zip(nnz, params, strict=True))
        unary = np.zeros((n + k + 7) // 8, dtype=np.uint8)
        rem = np.zeros((fields + 7) // 8 + 8, dtype=np.uint8)  # 8 spare bytes for word writes
        extra = np.zeros((k + 7) // 8, dtype=np.uint8)
        idx = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
        try:
            u_bits, x_bits = lib.golomb_encode(idx, numel, nnz, mm, unary, rem, extra)
        except ValueError as e:
            raise InvalidArgument(f"cannot encode positions: {e}") from None
        return {C.ROLE_UNARY: unary[:(u_bits + 7) // 8].tobytes(), C.ROLE_REMAINDERS: rem[:-8].tobytes(),
                C.ROLE_EXTRA: extra[:(x_bits + 7) // 8].tobytes()}

    # -- decoding ------------------------------------------------------------------------------
    def locate(self, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription], select: Sequence[int],
               memo: dict[str, Any] | None = None) -> Iterator[Located]:
        memo = {} if memo is None else memo
        first = np.concatenate([[0], np.cumsum([m.nnz for m in members], dtype=np.int64)])
        lib = native.module(raw[C.ROLE_UNARY].device)
        if lib is not None:
            if "golomb_local" not in memo:
                local = torch.empty(int(first[-1]), dtype=torch.int64)
                self.native(lib, raw, members, positions=local.numpy())
                memo["golomb_local"] = local
            for j in select:
                yield j, memo["golomb_local"][int(first[j]):int(first[j + 1])], int(first[j])
            return
        if "golomb" not in memo:
            memo["golomb"] = _golomb_running_sums(raw, members)
        csum = memo["golomb"]
        for j in select:
            a, b = int(first[j]), int(first[j + 1])
            if a == b:
                yield j, torch.zeros(0, dtype=torch.int64, device=csum.device), a
                continue
            # in range: _golomb_running_sums checked that each member's positions end before its numel
            yield j, csum[a:b] - (csum[a - 1] if a else 0) - 1, a

    def fill_ternary(self, lib: Any, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription],
                     signs: np.ndarray, outs: list[Any], levels: np.ndarray, element_size: int) -> None:
        self.native(lib, raw, members, fill=(signs, outs, levels, element_size))

    def native(self, lib: Any, raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription], *,
               positions: np.ndarray | None = None, fill: tuple[Any, ...] | None = None) -> None:
        """Decode a group's Golomb codes with the C extension: into ``positions`` (int64, each
        entry's position within its member), or with ``fill = (signs, outs, levels, element
        size)`` straight into ternary outputs. Checks the remainder and extra-bit streams' lengths
        and padding as the torch path does."""
        params = [golomb_m(m.numel, m.nnz) for m in members]
        nfield = sum(m.nnz * golomb_widths(p)[0] for m, p in zip(members, params, strict=True))
        check_bit_stream(raw[C.ROLE_REMAINDERS], nfield)
        numel, nnz, mm = native.member_arrays(members, params)
        streams = [np.concatenate([raw[C.ROLE_UNARY].numpy(), native.UNARY_PAD])]
        streams += [np.concatenate([raw[r].numpy(), native.PAD]) for r in (C.ROLE_REMAINDERS, C.ROLE_EXTRA)]
        if fill is None:
            used = native.call(lib.golomb_positions, *streams, numel, nnz, mm, positions)
        else:
            signs, outs, levels, es = fill
            used = native.call(lib.golomb_ternary, *streams[:3], signs, numel, nnz, mm, outs, levels, es)
        check_bit_stream(raw[C.ROLE_EXTRA], used)


def read_fields(padded: torch.Tensor, start: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Unsigned little-endian bit fields: field i is ``width[i]`` bits from bit ``start[i]``
    (widths up to 56) of a uint8 stream followed by at least 8 zero bytes, gathered through
    little-endian words at each field's first byte."""
    if start.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=padded.device)
    span = (7 + int(width.max()) + 7) // 8  # bytes a field can touch
    byte = start >> 3
    window = padded[byte].to(torch.int64)
    for i in range(1, span):
        window |= padded[byte + i].to(torch.int64) << (8 * i)
    return (window >> (start & 7)) & ((1 << width) - 1)


def _ones(buf: torch.Tensor, name: str) -> torch.Tensor:
    """Indices of the 1 bits of a bit stream whose last 1 bit ends the data (the rest is zero
    padding within the last byte)."""
    bits = unpack_range(buf, 0, 8 * buf.numel())
    ones = torch.nonzero(bits).reshape(-1)
    if buf.numel() and (ones.numel() == 0 or int(ones[-1]) < 8 * (buf.numel() - 1)):
        raise StreamCorrupt(f"{name} stream has trailing bytes")
    return ones


def _golomb_running_sums(raw: Mapping[str, torch.Tensor], members: Sequence[TensorDescription]) -> torch.Tensor:
    """Decode all of a group's Golomb codes; entry i of the result is (position + 1) summed from
    the group's first entry, so member j's positions are ``csum[i] - csum[first_j - 1] - 1``.

    Entries are decoded in blocks of ``DECODE_BLOCK`` so that only the result and one block's
    temporaries are alive at a time."""
    dev = raw[C.ROLE_UNARY].device
    nnz = [m.nnz for m in members]
    total = sum(nnz)
    params = [golomb_m(m.numel, m.nnz) for m in members]
    widths = [golomb_widths(m) for m in params]

    # the unary stream holds exactly `total` one bits, the last one in its last byte
    ends = _ones(raw[C.ROLE_UNARY], "unary")
    if ends.numel() != total:
        raise StreamCorrupt(f"unary stream holds {ends.numel()} codes, manifest declares {total}")

    fields = [k * w for k, (w, _) in zip(nnz, widths, strict=True)]
    nfield = sum(fields)
    rem = raw[C.ROLE_REMAINDERS]
    check_bit_stream(rem, nfield)
    padded = torch.cat([rem, rem.new_zeros(8)])
    ext = raw[C.ROLE_EXTRA]
    ext_bits = unpack_range(ext, 0, 8 * ext.numel()).to(torch.int64)

    first = torch.tensor(np.concatenate([[0], np.cumsum(nnz, dtype=np.int64)]), device=dev)
    m_t = torch.tensor(params, dtype=torch.int64, device=dev)
    w_t = torch.tensor([w for w, _ in widths], dtype=torch.int64, device=dev)
    u_t = torch.tensor([u for _, u in widths], dtype=torch.int64, device=dev)
    base_t = torch.tensor(np.concatenate([[0], np.cumsum(fields, dtype=np.int64)])[:-1], device=dev)
    gap_limit = C.MAX_ELEMENTS_PER_TENSOR // m_t  # a larger quotient is a gap no tensor can hold

    csum = torch.empty(total, dtype=torch.int64, device=dev)
    carry = 0  # running sum before the block
    used = 0  # extra bits consumed before the block
    elements = sum(m.numel for m in members)
    for a in range(0, total, DECODE_BLOCK):
        b = min(total, a + DECODE_BLOCK)
        entry = torch.arange(a, b, device=dev)
        mid = torch.searchsorted(first[1:], entry, right=True)
        prev = ends[a - 1] if a else ends.new_full((), -1)
        q = torch.diff(ends[a:b], prepend=prev.reshape(1)) - 1
        m_e = m_t[mid]
        if bool((q > gap_limit[mid]).any()):
            raise StreamCorrupt("a Golomb quotient describes a gap larger than any tensor")
        w_e, u_e = w_t[mid], u_t[mid]
        x = read_fields(padded, base_t[mid] + (entry - first[mid]) * w_e, w_e)
        need = (m_e > 1) & (x >= u_e)
        k_need = torch.cumsum(need, 0)
        n_need = int(k_need[-1])
        if used + n_need > ext_bits.numel():
            raise StreamCorrupt("extra-bit stream is shorter than the remainders require")
        if n_need:
            e_at = ext_bits[(used + k_need - 1).clamp_(min=0)]
            x = torch.where(need, 2 * x + e_at - u_e, x)
        used += n_need
        if bool(((m_e > 1) & (x >= m_e)).any()):
            raise StreamCorrupt("a Golomb remainder is out of range")
        block = torch.cumsum(q * m_e + x + 1, 0)
        block += carry
        csum[a:b] = block
        carry = int(block[-1])
        if carry > elements:  # valid sums never exceed the group's elements
            raise StreamCorrupt("decoded positions run past the end of the group's tensors")
    check_bit_stream(ext, used)

    # each member's gaps + 1 add up to at most its numel
    if total:
        ends_at = first[1:]
        has = ends_at > first[:-1]
        before = torch.where(first[:-1] > 0, csum[(first[:-1] - 1).clamp(min=0)], 0)
        spans = csum[(ends_at - 1).clamp(min=0)] - before
        limit = torch.tensor([m.numel for m in members], dtype=torch.int64, device=dev)
        bad = has & (spans > limit)
        if bool(bad.any()):
            j = int(torch.nonzero(bad)[0])
            raise StreamCorrupt(f"tensor {members[j].name!r}: a decoded position is beyond its {members[j].numel} elements")
    return csum


def _indices(m: Any) -> np.ndarray:
    return np.asarray(m.indices, dtype=np.int64).reshape(-1)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


__all__ = ["PositionCoding", "Bitmap", "Golomb", "CODINGS", "get_position_coding", "choose", "kept_indices",
           "golomb_m", "golomb_widths", "GOLOMB_MAX_DENSITY", "DECODE_BLOCK"]
