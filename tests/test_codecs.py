"""Codecs and stream framing: exact round trips, and refusal of malformed streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given
from hypothesis import strategies as st

import compeft_format as cf
from compeft_format import constants as C
from compeft_format.codecs import REGISTRY, get_codec
from compeft_format.codecs.bits import pack_bits, unpack_bits
from compeft_format.framing import frame, smallest_frame, unframe
from compeft_format.manifest import TensorInfo
from conftest import bits_equal, state_dicts


@given(st.lists(st.booleans(), max_size=200))
def test_bits_round_trip_lsb_first(bits):
    packed = pack_bits(np.array(bits, dtype=bool))
    assert len(packed) == (len(bits) + 7) // 8
    for i, b in enumerate(bits):  # bit i of the stream is bit i%8 of byte i//8
        assert ((packed[i // 8] >> (i % 8)) & 1) == b
    out = unpack_bits(torch.frombuffer(bytearray(packed), dtype=torch.uint8) if packed else torch.empty(0, dtype=torch.uint8), len(bits))
    assert out.tolist() == bits


def test_unpack_refuses_padding_and_length():
    with pytest.raises(cf.StreamCorrupt):
        unpack_bits(torch.tensor([0b1000_0001], dtype=torch.uint8), 3)
    with pytest.raises(cf.StreamCorrupt):
        unpack_bits(torch.tensor([1, 2], dtype=torch.uint8), 3)


@given(st.binary(max_size=3000))
def test_framing_round_trip(raw):
    for comp in C.COMPRESSIONS:
        stored = frame(raw, comp)
        assert bytes(unframe(stored, comp, len(raw))) == raw
    comp, stored = smallest_frame(raw)
    assert len(stored) <= len(raw)
    assert bytes(unframe(stored, comp, len(raw))) == raw


def test_unframe_refuses_bombs_and_garbage():
    big = zstandard.ZstdCompressor().compress(b"\0" * 100_000)
    with pytest.raises(cf.StreamCorrupt, match="declares 100000"):
        unframe(big, C.COMP_ZSTD, 10)
    # a frame without a content size is refused too
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    nosize = cobj.compress(b"abc" * 10) + cobj.flush()
    with pytest.raises(cf.StreamCorrupt):
        unframe(nosize, C.COMP_ZSTD, 30)
    with pytest.raises(cf.StreamCorrupt):
        unframe(b"garbage!", C.COMP_ZSTD, 8)
    ok = frame(b"abc" * 10, C.COMP_ZSTD)
    with pytest.raises(cf.StreamCorrupt):
        unframe(ok + b"\0", C.COMP_ZSTD, 30)
    with pytest.raises(cf.StreamCorrupt):
        unframe(b"abc", C.COMP_NONE, 4)
    with pytest.raises(cf.UnknownEncoding):
        unframe(b"abc", "lzma", 3)


def test_registry_is_the_only_dispatch():
    assert set(REGISTRY) == set(C.ENCODINGS)
    with pytest.raises(cf.UnknownEncoding):
        get_codec("quaternary")


@given(sd=state_dicts(), density=st.floats(0.01, 1.0), mode=st.sampled_from(C.MODES),
       dense=st.booleans(), out_dtype=st.sampled_from([None, torch.float32, torch.float16, torch.bfloat16]),
       coding=st.sampled_from([C.POSITIONS_BITMAP, C.POSITIONS_GOLOMB]))
def test_group_encode_decode_is_exact(backend, sd, density, mode, dense, out_dtype, coding):
    """Encoding a group and decoding it gives exactly the in-memory tensors, in any dtype."""
    ca = cf.compress(sd, density=density, mode=mode, dense_patterns=("*",) if dense else (), min_sparse_numel=0)
    members = list(ca.tensors.values())
    by_enc: dict[str, list] = {}
    for m in members:
        by_enc.setdefault(m.encoding, []).append(m)
    for enc, group in by_enc.items():
        params = {"positions": coding} if enc != C.ENC_DENSE else {}
        if enc != C.ENC_TERNARY:
            params["value_dtype"] = group[0].value_dtype
            group = [m for m in group if m.value_dtype == params["value_dtype"]]
        codec = get_codec(enc)
        raw = codec.encode(group, params)
        raw_t = {r: torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)
                 for r, b in raw.items()}
        infos = [TensorInfo(m.name, m.shape, m.dtype, m.nnz, m.scale, m.offset, group=0) for m in group]
        out = codec.decode(raw_t, infos, params, list(range(len(group))), out_dtype)
        for j, m in enumerate(group):
            assert bits_equal(out[j], m.to_dense(out_dtype)), m.name
        # one member at a time gives the same tensor
        for j, m in enumerate(group):
            one = codec.decode(raw_t, infos, params, [j], out_dtype)
            assert bits_equal(one[j], m.to_dense(out_dtype))


def test_ternary_levels_rounding_is_once_to_target():
    # offset 1 + scale that is not representable in fp16: computed in binary32, rounded once
    scale = float(np.float32(1e-3 + 1e-7))
    ct = cf.CompressedTensor.ternary("w", (3,), "float16", indices=np.array([0, 2]),
                                     negative=np.array([False, True]), scale=scale, offset=1.0)
    expect32 = np.array([np.float32(1) + np.float32(scale), 1.0, np.float32(1) - np.float32(scale)], np.float32)
    assert bits_equal(ct.to_dense(), torch.from_numpy(expect32).to(torch.float16))
    assert bits_equal(ct.to_dense(torch.float32), torch.from_numpy(expect32))


def test_sparse_negative_zero_survives_with_zero_offset():
    ct = cf.CompressedTensor.sparse("w", (2,), "float16", indices=np.array([1]),
                                    values=torch.tensor([-0.0], dtype=torch.float16))
    out = ct.to_dense()
    assert out.view(torch.int16).tolist() == [0, -32768]
