"""Triton kernels that decode ternary and sparse groups (spec 4.2, 4.3) with bit-plane or Golomb
positions (4.7) on the device, straight into each member's output tensor.

The kernels work on a *batch*: the groups of one or many files that share an encoding, a position
coding, a value dtype and a target dtype, their streams laid end to end in one device buffer. One
row per member of a table (int64, ``NF`` columns, below) says where the member's bits, entries and
output are. Every output element is written exactly once, so outputs need no initialisation.

Nothing here trusts the streams: every check the CPU decoders make is made on the device, and a
failed check sets an error flag (``err``) instead of stopping, with every store masked to its
member's output. The caller reads the flag once after all launches and, when it is set, decodes
the groups again on the CPU to raise the CPU decoders' error.

Kernels are compiled by Triton for the GPU; with ``TRITON_INTERPRET=1`` in the environment when
this module is imported they run on the CPU in Triton's interpreter, which is how the tests
check them against the CPU decoders on machines without a GPU.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

#: True when the kernels run in Triton's interpreter (on CPU tensors); Triton reads the variable
#: when a kernel is defined
try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # Triton before 3.4 has no knobs
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# -- the member table's columns ---------------------------------------------------------------
NF: tl.constexpr = tl.constexpr(22)
C_BIT: tl.constexpr = tl.constexpr(0)  # bit-plane: the member's first bit in the batch's plane
C_NUMEL: tl.constexpr = tl.constexpr(1)
C_FIRST: tl.constexpr = tl.constexpr(2)  # the member's first entry in the batch's entry sequence
C_NNZ: tl.constexpr = tl.constexpr(3)
C_DST: tl.constexpr = tl.constexpr(4)  # address of the member's output
C_SBASE: tl.constexpr = tl.constexpr(5)  # ternary: sign bit of entry i is bit SBASE + i
C_L0: tl.constexpr = tl.constexpr(6)  # ternary: background, +, - as bit patterns of the target
C_L1: tl.constexpr = tl.constexpr(7)  # sparse: L0 background bits, L1 binary32 offset bits,
C_L2: tl.constexpr = tl.constexpr(8)  # L2 1 when the offset is added
C_M: tl.constexpr = tl.constexpr(9)  # Golomb: parameter m, field width w, cutoff u,
C_W: tl.constexpr = tl.constexpr(10)
C_U: tl.constexpr = tl.constexpr(11)
C_FB: tl.constexpr = tl.constexpr(12)  # the member's first remainder field (bit in the batch)
C_LIMIT: tl.constexpr = tl.constexpr(13)  # the largest quotient a tensor can hold
C_UB: tl.constexpr = tl.constexpr(14)  # the group's unary stream: first bit,
C_UE: tl.constexpr = tl.constexpr(15)  # end bit (exclusive)
C_GFIRST: tl.constexpr = tl.constexpr(16)  # the group's entries: first,
C_GLAST: tl.constexpr = tl.constexpr(17)  # end (exclusive)
C_GM: tl.constexpr = tl.constexpr(18)  # row of the group's first member with entries
C_XB: tl.constexpr = tl.constexpr(19)  # the group's extra-bit stream: first bit,
C_XN: tl.constexpr = tl.constexpr(20)  # length in bytes
C_EOFF: tl.constexpr = tl.constexpr(21)  # the member's first element in the batch's elements

# value and target dtypes
F32: tl.constexpr = tl.constexpr(0)
F16: tl.constexpr = tl.constexpr(1)
BF16: tl.constexpr = tl.constexpr(2)


@triton.jit
def _find(tab, col, key, nrows, ITERS: tl.constexpr):
    """Per lane: the last row r with ``tab[r, col] <= key`` (the column ascends, row 0 <= key)."""
    lo = tl.zeros(key.shape, dtype=tl.int64)
    hi = lo + (nrows - 1)
    for _ in tl.static_range(ITERS):
        mid = (lo + hi + 1) // 2
        go = tl.load(tab + mid * NF + col) <= key
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return lo


@triton.jit
def _bit(ptr, p, nbytes, mask):
    """Bit ``p`` of a little-endian bit stream of ``nbytes`` bytes (0 where masked or beyond)."""
    byte = p >> 3
    v = tl.load(ptr + byte, mask=mask & (byte < nbytes) & (p >= 0), other=0).to(tl.int32)
    return (v >> (p & 7).to(tl.int32)) & 1


@triton.jit
def _flag(err, bad):
    """``err`` becomes 1 when any lane is ``bad`` (a flag, not a count: a count could wrap)."""
    n = tl.sum(bad.to(tl.int32), axis=0)
    if n > 0:
        tl.atomic_max(err, 1)


@triton.jit
def _store(tab, j, local, val, mask, OUT: tl.constexpr):
    addr = tl.load(tab + j * NF + C_DST)
    if OUT == F32:
        tl.store(addr.to(tl.pointer_type(tl.int32)) + local, val.to(tl.int32), mask=mask)
    else:
        tl.store(addr.to(tl.pointer_type(tl.int16)) + local, val.to(tl.int16), mask=mask)


@triton.jit
def _value(values, i, mask, tab, j, VAL: tl.constexpr, OUT: tl.constexpr):
    """The bits of entry ``i``'s value in the target dtype: the stored value, plus the member's
    offset in binary32 when it has one, rounded once (RNE; NaN stays NaN)."""
    raw = tl.load(values + i, mask=mask, other=0)
    if VAL == F32:
        f = raw.to(tl.float32, bitcast=True)
    elif VAL == F16:
        f = raw.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        f = ((raw.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    row = tab + j * NF
    has_off = tl.load(row + C_L2) != 0
    off = tl.load(row + C_L1).to(tl.int32).to(tl.float32, bitcast=True)
    f = tl.where(has_off, f + off, f)
    if OUT == F32:
        out = f.to(tl.int32, bitcast=True).to(tl.int64)
    elif OUT == F16:
        out = f.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int64)
    else:  # RNE to bfloat16 on the bits (Triton's interpreter truncates this conversion)
        u = f.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        out = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
    if VAL == OUT:  # no conversion: the stored bits, NaN payloads included
        out = tl.where(has_off, out, raw.to(tl.int64))
    return out


# -- bit counting -------------------------------------------------------------------------------
@triton.jit
def count_ones(bits, nbytes, counts, BLOCK: tl.constexpr):
    """``counts[b]``: the 1 bits among bits ``[b * BLOCK, (b + 1) * BLOCK)`` of a stream."""
    b = tl.program_id(0).to(tl.int64)
    byte = b * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    v = tl.load(bits + byte, mask=byte < nbytes, other=0).to(tl.int32)
    v = v - ((v >> 1) & 0x55)
    v = (v & 0x33) + ((v >> 2) & 0x33)
    v = (v + (v >> 4)) & 0x0F
    tl.store(counts + b, tl.sum(v, axis=0).to(tl.int64))


@triton.jit
def compact_ones(bits, nbytes, base, ends, total, BLOCK: tl.constexpr):
    """``ends[r]``: the bit index of the stream's r-th 1 bit, for r < ``total`` (``base``: the
    exclusive prefix sum of ``count_ones``)."""
    b = tl.program_id(0).to(tl.int64)
    p = b * BLOCK + tl.arange(0, BLOCK)
    bit = _bit(bits, p, nbytes, (p >> 3) < nbytes)  # bytes compared: nbytes * 8 could overflow int32
    rank = tl.load(base + b) + tl.cumsum(bit, axis=0) - bit
    tl.store(ends + rank, p, mask=(bit != 0) & (rank < total))


# -- bit-plane positions ------------------------------------------------------------------------
@triton.jit
def bitmap_decode(plane, nbytes, base, total, tab, nrows, signs, nsigns, values, err,
                  ITERS: tl.constexpr, BLOCK: tl.constexpr, TERNARY: tl.constexpr, VAL: tl.constexpr,
                  OUT: tl.constexpr):
    """Every element of every member, one program per ``BLOCK`` bits of the plane: a set bit is an
    entry whose rank among the plane's set bits is its index in the entry sequence."""
    b = tl.program_id(0).to(tl.int64)
    p = b * BLOCK + tl.arange(0, BLOCK)
    live = (p >> 3) < nbytes  # bytes compared: nbytes * 8 could overflow int32
    bit = _bit(plane, p, nbytes, live)
    j = _find(tab, C_BIT, p, nrows, ITERS)
    row = tab + j * NF
    local = p - tl.load(row + C_BIT)
    inside = live & (local < tl.load(row + C_NUMEL))
    rank = tl.load(base + b) + tl.cumsum(bit, axis=0) - bit
    first = tl.load(row + C_FIRST)
    is_set = bit != 0
    # a set bit between members (padding), or whose rank is not one of its member's entries
    _flag(err, is_set & (~inside | (rank < first) | (rank >= first + tl.load(row + C_NNZ))))
    entry = is_set & inside & (rank < total)
    if TERNARY:
        neg = _bit(signs, tl.load(row + C_SBASE) + rank, nsigns, entry)
        val = tl.load(row + C_L0 + tl.where(entry, 1 + neg, 0))
    else:
        val = tl.where(entry, _value(values, rank, entry, tab, j, VAL, OUT), tl.load(row + C_L0))
    _store(tab, j, local, val, inside, OUT)


# -- Golomb positions ---------------------------------------------------------------------------
@triton.jit
def _golomb_code(tab, i, live, ends, rem, nrem, nrows, ITERS: tl.constexpr):
    """Entry ``i``'s member row, quotient and remainder field, whether the remainder takes an
    extra bit, and whether its unary code is out of place."""
    j = _find(tab, C_FIRST, i, nrows, ITERS)
    row = tab + j * NF
    m = tl.load(row + C_M)
    w = tl.load(row + C_W)
    ub = tl.load(row + C_UB)
    ue = tl.load(row + C_UE)
    gfirst = tl.load(row + C_GFIRST)
    end = tl.load(ends + i, mask=live, other=0)
    after = live & (i > gfirst)
    prev = tl.where(after, tl.load(ends + i - 1, mask=after, other=0), ub - 1)
    q = end - prev - 1
    limit = tl.load(row + C_LIMIT)
    last = i == tl.load(row + C_GLAST) - 1
    bad = live & ((end < ub) | (end >= ue) | (q < 0) | (q > limit) | (last & (end < ue - 8)))
    q = tl.minimum(tl.maximum(q, 0), limit)
    start = tl.load(row + C_FB) + (i - tl.load(row + C_FIRST)) * w
    byte = start >> 3
    window = tl.zeros(i.shape, dtype=tl.int64)
    for k in tl.static_range(8):
        window |= tl.load(rem + byte + k, mask=live & (byte + k < nrem), other=0).to(tl.int64) << (8 * k)
    x = (window >> (start & 7)) & ((tl.full(i.shape, 1, tl.int64) << w) - 1)
    need = live & (m > 1) & (x >= tl.load(row + C_U))
    return j, q, x, need, bad


@triton.jit
def _golomb_gap(tab, i, live, j, q, x, need, nbase, mloc, extra, nextra, BLOCK: tl.constexpr):
    """Entry ``i``'s gap + 1 (its remainder completed by its extra bit), whether the remainder is
    out of range, and the extra bits its group used before and including it."""
    row = tab + j * NF
    n = need.to(tl.int64)
    before = tl.load(nbase + i // BLOCK, mask=live, other=0) + tl.cumsum(n, axis=0) - n
    gm = tl.load(row + C_GM)
    gm_first = tl.load(tab + gm * NF + C_FIRST)
    group_before = tl.load(nbase + gm_first // BLOCK) + tl.load(mloc + gm * 2)
    xi = tl.load(row + C_XB) + before - group_before
    e = _bit(extra, xi, nextra, need).to(tl.int64)
    m = tl.load(row + C_M)
    x = tl.where(need, 2 * x + e - tl.load(row + C_U), x)
    bad = live & (m > 1) & (x >= m)
    return q * m + x + 1, bad, before + n - group_before


@triton.jit
def golomb_need(tab, nrows, ends, total, rem, nrem, counts, mloc, err, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 over the entries: checks the unary codes; ``counts[b]``: remainders of block b that
    take an extra bit; ``mloc[r, 0]``: those before row r's first entry within its block."""
    b = tl.program_id(0).to(tl.int64)
    i = b * BLOCK + tl.arange(0, BLOCK)
    live = i < total
    j, q, x, need, bad = _golomb_code(tab, i, live, ends, rem, nrem, nrows, ITERS)
    _flag(err, bad)
    n = need.to(tl.int64)
    tl.store(counts + b, tl.sum(n, axis=0))
    tl.store(mloc + j * 2, tl.cumsum(n, axis=0) - n, mask=live & (i == tl.load(tab + j * NF + C_FIRST)))


@triton.jit
def golomb_sums(tab, nrows, ends, total, rem, nrem, extra, nextra, nbase, counts, mloc, err,
                ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: checks remainders and each group's extra-bit stream; ``counts[b]``: the sum of
    block b's gaps + 1; ``mloc[r, 1]``: that sum before row r's first entry within its block."""
    b = tl.program_id(0).to(tl.int64)
    i = b * BLOCK + tl.arange(0, BLOCK)
    live = i < total
    j, q, x, need, _ = _golomb_code(tab, i, live, ends, rem, nrem, nrows, ITERS)
    g, bad, used = _golomb_gap(tab, i, live, j, q, x, need, nbase, mloc, extra, nextra, BLOCK)
    row = tab + j * NF
    # the group's last entry: its extra-bit stream is exactly the bits used, zero-padded
    last = live & (i == tl.load(row + C_GLAST) - 1)
    xn = tl.load(row + C_XN)
    tail = tl.load(extra + tl.load(row + C_XB) // 8 + xn - 1, mask=last & (xn > 0), other=0).to(tl.int64)
    bad |= last & ((xn != (used + 7) // 8) | (((used & 7) != 0) & ((tail >> (used & 7)) != 0)))
    _flag(err, bad)
    g = tl.where(live, g, 0)
    tl.store(counts + b, tl.sum(g, axis=0))
    tl.store(mloc + j * 2 + 1, tl.cumsum(g, axis=0) - g, mask=live & (i == tl.load(row + C_FIRST)))


@triton.jit
def fill_background(tab, nrows, elements, ITERS: tl.constexpr, BLOCK: tl.constexpr, OUT: tl.constexpr):
    """Every element of every member set to the member's background (``L0``)."""
    b = tl.program_id(0).to(tl.int64)
    e = b * BLOCK + tl.arange(0, BLOCK)
    live = e < elements
    j = _find(tab, C_EOFF, e, nrows, ITERS)
    row = tab + j * NF
    local = e - tl.load(row + C_EOFF)
    _store(tab, j, local, tl.load(row + C_L0), live & (local < tl.load(row + C_NUMEL)), OUT)


@triton.jit
def golomb_scatter(tab, nrows, ends, total, rem, nrem, extra, nextra, nbase, gbase, mloc, signs, nsigns, values,
                   err, ITERS: tl.constexpr, BLOCK: tl.constexpr, TERNARY: tl.constexpr, VAL: tl.constexpr,
                   OUT: tl.constexpr):
    """Pass 3: each entry's position (its member's running sum of gaps + 1, less one) and value,
    stored over the background."""
    b = tl.program_id(0).to(tl.int64)
    i = b * BLOCK + tl.arange(0, BLOCK)
    live = i < total
    j, q, x, need, _ = _golomb_code(tab, i, live, ends, rem, nrem, nrows, ITERS)
    g, _, _ = _golomb_gap(tab, i, live, j, q, x, need, nbase, mloc, extra, nextra, BLOCK)
    g = tl.where(live, g, 0)
    row = tab + j * NF
    first = tl.load(row + C_FIRST)
    running = tl.load(gbase + b) + tl.cumsum(g, axis=0)
    pos = running - (tl.load(gbase + first // BLOCK) + tl.load(mloc + j * 2 + 1)) - 1
    ok = live & (pos >= 0) & (pos < tl.load(row + C_NUMEL))
    _flag(err, live & ~ok)
    if TERNARY:
        neg = _bit(signs, tl.load(row + C_SBASE) + i, nsigns, ok)
        val = tl.load(row + C_L0 + 1 + neg)
    else:
        val = _value(values, i, ok, tab, j, VAL, OUT)
    _store(tab, j, pos, val, ok, OUT)
