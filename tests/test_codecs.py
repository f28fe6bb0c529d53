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


def test_a_new_encoding_is_one_class(tmp_path):
    """A codec defined here, by one class and nothing else, is planned into groups, written,
    validated by the manifest's rules, read lazily, verified, read back compressed and inspected."""
    from compeft_format.codecs import REGISTRY, Codec, Payload
    from compeft_format.codecs.layout import element_offsets
    from compeft_format.dtypes import to_torch

    class Halves(Codec):  # every element as float16, low and high bytes in two streams
        name = "test-halves"
        member_offset = False
        every_element = True

        def parse_params(self, params, where):
            return dict(params)

        def roles(self, params):
            return ("low", "high")

        def raw_sizes(self, params, members):
            n = sum(m.numel for m in members)
            return {"low": (n, True), "high": (n, True)}

        def bound_bits(self, params, member):
            return 16.0 * member.numel

        def choose_params(self, tensor, *, positions="auto"):
            return {}

        def encode(self, members, params):
            b = torch.cat([m.values.reshape(-1).to(torch.float16) for m in members]).view(torch.uint8)
            return {"low": b[0::2].numpy().tobytes(), "high": b[1::2].numpy().tobytes()}

        def _values(self, raw, members):
            v = torch.stack([raw["low"], raw["high"]], dim=1).reshape(-1).view(torch.float16)
            offs = element_offsets([m.numel for m in members])
            return [v[int(offs[j]):int(offs[j + 1])] for j in range(len(members))]

        def decode(self, raw, members, params, select, dtype, memo=None):
            v = self._values(raw, members)
            return {j: v[j].to(to_torch(dtype or members[j].dtype)).clone().view(members[j].shape) for j in select}

        def unpack(self, raw, members, params):
            return [Payload(values=v.clone()) for v in self._values(raw, members)]

        def to_dense(self, tensor, dtype=None, device="cpu"):
            out = tensor.values.to(torch.float16).to(to_torch(dtype or tensor.dtype))
            return out.reshape(tensor.shape).to(device)

    try:
        assert isinstance(REGISTRY["test-halves"], Halves)
        torch.manual_seed(0)
        ca = cf.compress({"a.lora_A.weight": torch.randn(8, 40)}, density=0.25)
        w = torch.randn(3, 5)
        ca.tensors["w"] = cf.CompressedTensor(name="w", shape=(3, 5), dtype="float32", nnz=15, encoding="test-halves",
                                              values=w.reshape(-1))
        path = tmp_path / "h.cpeft.safetensors"
        m = cf.save(ca, path, tensor_digests=True)
        assert [g.encoding for g in m.groups] == ["ternary", "test-halves"]
        assert set(m.groups[1].streams) == {"low", "high"}
        cf.verify(path)
        with cf.open_file(path) as f:
            assert bits_equal(f.get_tensor("w"), w.half().float())
        back = cf.read(path, verify=True)
        assert back.tensors["w"].encoding == "test-halves" and bits_equal(back.tensors["w"].to_dense(), w.half().float())
        assert cf.inspect(path)["tensors"][1]["bound_bits"] == 16.0 * 15
    finally:
        del REGISTRY["test-halves"]
    with pytest.raises(cf.UnknownEncoding):  # a reader without the codec refuses the file
        cf.verify(path)
    with pytest.raises(TypeError, match="registered twice"):
        type("Again", (Halves,), {"name": "ternary"})


def test_auto_positions_write_the_smaller_file(tmp_path, monkeypatch):
    """``positions="auto"`` tries both codings on a small group and keeps the smaller file; a group
    over ``AUTO_TRIAL_ELEMENTS`` keeps the density rule (Golomb under 40%)."""
    import compeft_format.writer as W

    torch.manual_seed(0)
    for dim, density in ((64, 0.1), (256, 0.02), (512, 0.3), (128, 0.5)):
        sd = {f"base_model.model.l{i}.q.lora_{ab}.weight": torch.randn((8, dim) if ab == "A" else (dim, 8))
              for i in range(4) for ab in "AB"}
        ca = cf.compress(sd, density=density, created_at="2020-01-01T00:00:00Z")
        sizes = {}
        for pos in ("auto", "golomb", "bitmap"):
            cf.save(ca, tmp_path / pos, positions=pos)
            sizes[pos] = (tmp_path / pos).stat().st_size
        assert sizes["auto"] == min(sizes["golomb"], sizes["bitmap"]), (dim, density, sizes)
        assert all(bits_equal(cf.load(tmp_path / "auto")[k], cf.load(tmp_path / "golomb")[k]) for k in sd)
    monkeypatch.setattr(W, "AUTO_TRIAL_ELEMENTS", 0)
    for density, coding in ((0.1, C.POSITIONS_GOLOMB), (0.6, C.POSITIONS_BITMAP)):
        cf.save(cf.compress(sd, density=density), tmp_path / "rule", positions="auto")
        assert {g.params["positions"] for g in cf.verify(tmp_path / "rule").groups
                if g.encoding == C.ENC_TERNARY} == {coding}
