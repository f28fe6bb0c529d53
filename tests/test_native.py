"""The C decoders against the torch decoders: the same tensors from valid streams, the same
verdict (StreamCorrupt, or identical tensors) on damaged ones."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compeft_format as cf
from compeft_format import constants as C
from compeft_format.codecs import get_codec, native
from compeft_format.manifest import TensorInfo
from conftest import bits_equal

needs_native = pytest.mark.skipif(not native.built() and os.environ.get("COMPEFT_REQUIRE_NATIVE") != "1",
                                  reason="compeft_format._native is not built (no C compiler at install)")


def test_extension_is_built_where_required():
    """`make test` (and CI) require the extension; a silent fallback would hide a build failure."""
    if os.environ.get("COMPEFT_REQUIRE_NATIVE") == "1":
        assert native.built()
    assert native.module(torch.device("meta")) is None  # never off the CPU


@needs_native
def test_instruction_sets_switch_and_refuse_unknown_names():
    isas = native.isas()
    assert isas[0] == "generic" and native.isa() == isas[-1]  # the widest by default
    with native.use_isa("generic"):
        assert native.isa() == "generic"
    assert native.isa() == isas[-1]
    with pytest.raises(ValueError, match="not available"):
        native._ext.isa("sse9")


def _group(seed: int, density: float, mode: str, members: int, offset: bool, size: int = 1):
    rng = np.random.default_rng(seed)
    sd = {}
    for i in range(members):
        shape = ((int(rng.integers(1, 40)), size * int(rng.integers(1, 40))) if i % 3
                 else (size * int(rng.integers(0, 300)),))
        sd[f"t{i}"] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    ref = "ones" if offset else "zero"
    ca = cf.compress(sd, density=density, mode=mode, min_sparse_numel=0, reference=ref)
    group = [m for m in ca.tensors.values() if m.encoding == (C.ENC_TERNARY if mode == C.MODE_TERNARY else C.ENC_SPARSE)]
    return group


def _decode(monkeypatch, which: str, raw, infos, params, select, dtype):
    monkeypatch.setenv("COMPEFT_NATIVE", "1" if which == "native" else "0")
    codec = get_codec(C.ENC_TERNARY if "value_dtype" not in params else C.ENC_SPARSE)
    try:
        return codec.decode(raw, infos, params, select, dtype)
    except cf.StreamCorrupt as e:
        return e


def _tensors(raw: dict[str, bytes]) -> dict[str, torch.Tensor]:
    return {r: torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)
            for r, b in raw.items()}


damage = st.lists(st.tuples(st.integers(0, 3), st.floats(0, 1), st.integers(0, 255)), max_size=3)


@needs_native
@settings(max_examples=250)
@given(seed=st.integers(0, 2**32 - 1), density=st.sampled_from([0.002, 0.03, 0.2, 0.5, 0.9, 1.0]),
       mode=st.sampled_from([C.MODE_TERNARY, C.MODE_PRUNE]), members=st.integers(1, 6), offset=st.booleans(),
       coding=st.sampled_from([C.POSITIONS_GOLOMB, C.POSITIONS_BITMAP]), edits=damage,
       cut=st.sampled_from([None, -1, 1]), dtype=st.sampled_from([None, torch.float16, torch.bfloat16]),
       one=st.booleans(), isa=st.sampled_from(native.isas() or ["none"]), size=st.sampled_from([1, 1, 16]))
def test_same_verdict_on_damaged_streams(monkeypatch, seed, density, mode, members, offset, coding, edits, cut,
                                         dtype, one, isa, size):
    """Every instruction set the CPU runs; size 16 gives members long enough for the blocked
    decoding (56 codes a block, eight at a time) to run in the middle of a member."""
    group = _group(seed, density, mode, members, offset, size)
    if not group:
        return
    params = {"positions": coding}
    if mode == C.MODE_PRUNE:
        params["value_dtype"] = group[0].value_dtype
        group = [m for m in group if m.value_dtype == params["value_dtype"]]
    raw = get_codec(C.ENC_TERNARY if mode == C.MODE_TERNARY else C.ENC_SPARSE).encode(group, params)
    roles = sorted(raw)
    damaged = {r: bytearray(b) for r, b in raw.items()}
    for which, where, value in edits:
        buf = damaged[roles[which % len(roles)]]
        if buf:
            buf[min(int(where * len(buf)), len(buf) - 1)] = value
    loose = [r for r in (C.ROLE_UNARY, C.ROLE_EXTRA) if r in damaged]  # the container checks other sizes
    if cut is not None and loose:  # drop or add a byte at the end of a stream of unchecked size
        buf = damaged[loose[len(edits) % len(loose)]]
        if cut < 0 and buf:
            del buf[-1]
        elif cut > 0:
            buf.append(0)
    infos = [TensorInfo(m.name, m.shape, m.dtype, m.nnz, m.scale, m.offset, group=0) for m in group]
    select = [len(group) // 2] if one else list(range(len(group)))
    with native.use_isa(isa):
        results = [_decode(monkeypatch, w, _tensors({r: bytes(b) for r, b in damaged.items()}), infos, params,
                           select, dtype) for w in ("native", "torch")]
    got, want = results
    if isinstance(want, Exception) or isinstance(got, Exception):
        assert isinstance(got, cf.StreamCorrupt) and isinstance(want, cf.StreamCorrupt), (got, want)
        return
    assert set(got) == set(want) == set(select)
    for j in select:
        assert bits_equal(got[j], want[j]), group[j].name
    if not edits and (cut is None or not loose):
        for j in select:
            assert bits_equal(got[j], group[j].to_dense(dtype))


@needs_native
def test_large_group_matches_torch(monkeypatch):
    """A group large enough for the decoders' blocking (fill blocks, 56-bit words) to matter."""
    rng = np.random.default_rng(7)
    sd = {"a": torch.from_numpy(rng.standard_normal((300, 700)).astype(np.float32)),
          "b": torch.from_numpy(rng.standard_normal(100_003).astype(np.float32))}
    for density in (0.001, 0.1, 0.6):
        group = list(cf.compress(sd, density=density).tensors.values())
        infos = [TensorInfo(m.name, m.shape, m.dtype, m.nnz, m.scale, m.offset, group=0) for m in group]
        for coding in (C.POSITIONS_GOLOMB, C.POSITIONS_BITMAP):
            params = {"positions": coding}
            raw = get_codec(C.ENC_TERNARY).encode(group, params)
            for isa in native.isas():
                with native.use_isa(isa):
                    got = _decode(monkeypatch, "native", _tensors(raw), infos, params, [0, 1], torch.float16)
                for j, m in enumerate(group):
                    assert bits_equal(got[j], m.to_dense(torch.float16)), (isa, density, coding)


@needs_native
@given(seed=st.integers(0, 2**32 - 1), density=st.sampled_from([0.001, 0.02, 0.3, 0.7, 1.0]),
       members=st.integers(1, 5))
def test_native_golomb_encoder_writes_the_same_bytes(monkeypatch, seed, density, members):
    group = _group(seed, density, C.MODE_TERNARY, members, False)
    streams = {}
    for which in ("1", "0"):
        monkeypatch.setenv("COMPEFT_NATIVE", which)
        streams[which] = get_codec(C.ENC_TERNARY).encode(group, {"positions": C.POSITIONS_GOLOMB})
    assert streams["1"] == streams["0"]


@needs_native
def test_native_golomb_encoder_refuses_unsorted_indices():
    import dataclasses

    from compeft_format.codecs import get_position_coding

    group = _group(3, 0.3, C.MODE_TERNARY, 1, False)
    unsorted = dataclasses.replace(group[0], indices=group[0].indices[::-1].copy())
    with pytest.raises(cf.InvalidArgument):
        get_position_coding(C.POSITIONS_GOLOMB).encode([unsorted])


@needs_native
def test_extension_refuses_hostile_arguments_without_leaks():
    """The module's own argument checks: group totals that would overflow, parameters out of
    range, and no reference leaked on a refused stream."""
    import sys

    lib = native._ext
    pad = np.zeros(8, np.uint8)
    count = 1 << 24  # nnz sums that wrap int64 must not shrink the required output
    numel = np.full(count, 1 << 40, np.int64)
    with pytest.raises(ValueError, match="out of range"):
        lib.golomb_positions(np.full(1 << 10, 0xFF, np.uint8), pad, pad, numel, numel.copy(),
                             np.ones(count, np.int64), np.empty(0, np.int64))
    one = np.array([8], np.int64)
    with pytest.raises(TypeError, match="0xFF"):  # the unary stream's 1-bit sentinel is missing
        lib.golomb_positions(np.concatenate([[1], np.zeros(16, np.uint8)]), pad, pad, one, np.array([1], np.int64),
                             np.array([1], np.int64), np.empty(1, np.int64))
    with pytest.raises(ValueError, match="out of range"):  # m above numel
        lib.golomb_positions(np.ones(1, np.uint8), pad, pad, one, np.array([1], np.int64),
                             np.array([1 << 62], np.int64), np.empty(1, np.int64))
    out, levels = np.empty(8, np.int16), np.zeros(3, np.int16)
    before = sys.getrefcount(None)
    for _ in range(1000):
        with pytest.raises(ValueError):  # two 1 bits where nnz declares one
            lib.bitmap_ternary(np.array([3], np.uint8), np.zeros(1, np.uint8), one, np.array([1], np.int64),
                               [out], levels, 2)
    assert sys.getrefcount(None) - before < 10
