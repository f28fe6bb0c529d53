import hashlib
import json
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import second_reader  # noqa: E402
from second_reader import SpecError, read  # noqa: E402

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
DECL = json.loads((VECTORS / "vectors.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("entry", DECL["valid"], ids=[e["file"] for e in DECL["valid"]])
def test_valid_vector(entry):
    decoded = read(VECTORS / entry["file"])
    assert sorted(decoded) == sorted(entry["tensors"])
    for name, want in entry["tensors"].items():
        dtype, shape, data = decoded[name]
        assert dtype == want["dtype"], name
        assert list(shape) == want["shape"], name
        assert hashlib.sha256(data).hexdigest() == want["sha256"], name


@pytest.mark.parametrize("entry", DECL["invalid"], ids=[e["file"] for e in DECL["invalid"]])
def test_invalid_vector(entry):
    with pytest.raises(SpecError) as info:
        read(VECTORS / entry["file"])
    assert info.value.code == entry["code"], str(info.value)


# base_model.derived_from and base_model.recipe (spec 1.2, 3.5), on rewritten copies of a valid vector

def _with_base_model(tmp_path, edit):
    """v1_2_compressed_base with its manifest's base_model changed by `edit`, stored as `json` with a
    correct digest, so that only the manifest rules of 3.5 decide."""
    buf = (VECTORS / "v1_2_compressed_base.cpeft.safetensors").read_bytes()
    n = struct.unpack_from("<Q", buf)[0]
    header = json.loads(buf[8:8 + n])
    meta = header["__metadata__"]
    manifest = json.loads(second_reader._manifest_text(meta))
    edit(manifest["base_model"])
    text = json.dumps(manifest, separators=(",", ":"), ensure_ascii=False)
    meta.update({"compeft.manifest_encoding": "json", "compeft.manifest": text,
                 "compeft.manifest_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()})
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    path = tmp_path / "edited.cpeft.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + buf[8 + n:])
    return path


def _set(**members):
    return lambda bm: bm.update(members)


def _drop(*keys):
    return lambda bm: [bm.pop(k, None) for k in keys]


FP = {"algorithm": "sha256-state-dict-v1", "value": "0" * 64}
ACCEPTED = {
    "derived_from_null": _set(derived_from=None),
    "recipe_null": _set(recipe=None),
    "both_absent": _drop("derived_from", "recipe"),
    "recipe_without_derived_from": _drop("derived_from"),
    "derived_from_empty": _set(derived_from={}),
    "derived_from_other_members": _set(derived_from={"id": None, "revision": None, "fingerprint": None,
                                                     "recipe": 5, "extra": [1, {"x": None}]}),
    "derived_from_unknown_algorithm": _set(derived_from={"fingerprint": {"algorithm": "md5-x", "value": "?"}}),
    "recipe_any_members": _set(recipe={"name": 7, "library": ["x"], "library_version": {"a": 1},
                                       "params": "int4", "calibration_sha256": "not hex", "other": True}),
    "recipe_empty": _set(recipe={}),
}
REJECTED = {
    "derived_from_string": _set(derived_from="example/tiny-llama"),
    "derived_from_list": _set(derived_from=[FP]),
    "derived_from_bool": _set(derived_from=False),
    "derived_from_id_number": _set(derived_from={"id": 5}),
    "derived_from_revision_object": _set(derived_from={"revision": {}}),
    "derived_from_fingerprint_string": _set(derived_from={"fingerprint": "abc"}),
    "derived_from_fingerprint_no_value": _set(derived_from={"fingerprint": {"algorithm": "sha256-state-dict-v1"}}),
    "derived_from_fingerprint_algorithm_null": _set(derived_from={"fingerprint": {"algorithm": None,
                                                                                  "value": "0" * 64}}),
    "recipe_string": _set(recipe="int4:g128"),
    "recipe_number": _set(recipe=0),
    "recipe_list": _set(recipe=[]),
}


@pytest.mark.parametrize("edit", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_base_model_v1_2_members_accepted(tmp_path, edit):
    want = next(e for e in DECL["valid"] if e["file"] == "v1_2_compressed_base.cpeft.safetensors")
    decoded = read(_with_base_model(tmp_path, edit))
    assert {k: hashlib.sha256(v[2]).hexdigest() for k, v in decoded.items()} == \
        {k: v["sha256"] for k, v in want["tensors"].items()}


@pytest.mark.parametrize("edit", REJECTED.values(), ids=REJECTED.keys())
def test_base_model_v1_2_members_rejected(tmp_path, edit):
    with pytest.raises(SpecError) as info:
        read(_with_base_model(tmp_path, edit))
    assert info.value.code == "MANIFEST_INVALID", str(info.value)


# Fingerprints (spec 3.4): second_reader.fingerprint against the reference library

def _triples(state_dict):
    import torch
    return {name: (str(t.dtype).removeprefix("torch."), tuple(t.shape),
                   t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            for name, t in state_dict.items()}


def _state_dicts():
    import torch
    g = torch.Generator().manual_seed(1234)

    def randn(*shape, dtype=torch.float32):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype)

    f64 = torch.cat([randn(40, dtype=torch.float64) * 1e-3, torch.tensor(
        [1 + 2.0 ** -24, 1 + 3 * 2.0 ** -24, 2.0 ** -150, 0.75 * 2.0 ** -148, 1e-40, -0.0,
         3.4028235677973366e38, 3.5e38, -1e300, 1e-320], dtype=torch.float64)])
    mixed = {
        "model.embed_tokens.weight": randn(8, 6),
        "model.layers.0.self_attn.q_proj.weight": randn(4, 4, dtype=torch.float16),
        "model.layers.0.mlp.up_proj.weight": randn(3, 2, 5, dtype=torch.bfloat16),
        "model.layers.0.mlp.scale64": f64,
        "model.position_ids": torch.randint(-2 ** 40, 2 ** 40, (5,), generator=g, dtype=torch.int64),
        "model.mask": torch.rand(7, generator=g) > 0.5,
        "model.empty": torch.zeros(0, 4),
        "model.scalar": torch.tensor(0.1),
        "model.scalar_bf16": torch.tensor(-2.5, dtype=torch.bfloat16),
        "model.int8": torch.randint(-128, 128, (3, 3), generator=g, dtype=torch.int8),
        "model.int16": torch.randint(-2 ** 15, 2 ** 15, (4,), generator=g, dtype=torch.int16),
        "model.int32": torch.randint(-2 ** 31, 2 ** 31, (2, 2), generator=g, dtype=torch.int32),
        "model.uint8": torch.randint(0, 256, (5,), generator=g, dtype=torch.uint8),
        "модель.вес": randn(3, dtype=torch.float16),
        "层.权重😀": randn(2, 1, dtype=torch.bfloat16),
        "\uffff.after_bmp": randn(1),  # code point order puts U+FFFF before U+1F600, UTF-16 order after
        "\U0001F600.astral": randn(1),
        'odd "name"\\with\ttabs\nnewline\x01\x7f/é\u2028': randn(2),
        "": randn(1, dtype=torch.float64),
    }
    bf16 = {f"layers.{i}.w": randn(5, 3, dtype=torch.bfloat16) for i in range(3)}
    bf16["norm.weight"] = randn(5, dtype=torch.bfloat16)
    bf16["position_ids"] = torch.arange(5)
    fp16 = {name: t.to(torch.float16) if t.is_floating_point() else t.clone() for name, t in bf16.items()}
    fp64 = {"w": randn(6, 6, dtype=torch.float64), "b": randn(6, dtype=torch.float64), "flag": torch.tensor(True)}
    return {"mixed": mixed, "bf16": bf16, "fp16": fp16, "fp64": fp64}


def _as_float32(state_dict):
    return {name: t.float() if t.is_floating_point() else t.clone() for name, t in state_dict.items()}


ALGORITHMS = ("sha256-state-dict-v1", "sha256-state-dict-f32-v1")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fingerprint_matches_library(algorithm):
    import compeft_format
    from compeft_format import binding

    assert (binding.AS_STORED, binding.FLOAT32) == ALGORITHMS
    seen = set()
    for label, sd in _state_dicts().items():
        for variant in (sd, _as_float32(sd)):
            want = compeft_format.fingerprint(variant, algorithm).value
            got = second_reader.fingerprint(_triples(variant), algorithm)
            assert second_reader.HEX.fullmatch(got), got
            assert got == want, label
            seen.add(got)
    # v1: eight dicts, of which the float32 copies of bf16 and of its exact fp16 copy are equal; f32: a dict and
    # its float32 copy coincide, and so do bf16 and fp16, leaving mixed, bf16 (= fp16) and fp64
    assert len(seen) == (7 if algorithm == binding.AS_STORED else 3)


def test_fingerprint_f32_ignores_stored_float_dtype():
    from compeft_format import binding

    sds = _state_dicts()
    fp = second_reader.fingerprint
    for label in ("bf16", "fp16", "fp64", "mixed"):
        sd, f32 = _triples(sds[label]), _triples(_as_float32(sds[label]))
        # the f32 algorithm reads values: an exact (or, from float64, RNE) float32 copy has the same digest
        assert fp(sd, binding.FLOAT32) == fp(f32, binding.FLOAT32), label
        # v1 reads the stored bytes: the copy differs
        assert fp(sd, binding.AS_STORED) != fp(f32, binding.AS_STORED), label
        # with only float32 (and non-float) tensors the two algorithms hash the same bytes
        assert fp(f32, binding.FLOAT32) == fp(f32, binding.AS_STORED), label
    # float32 -> float16 that rounds: different under both algorithms
    import torch
    w = {"w": torch.tensor([0.1, 1.0])}
    half = {"w": w["w"].half()}
    for algorithm in ALGORITHMS:
        assert fp(_triples(w), algorithm) != fp(_triples(half), algorithm)


def test_fingerprint_f32_makes_every_nan_one_nan():
    """NaNs of any sign and payload, in every float dtype, hash as the binary32 bits 0x7FC00000."""
    import numpy as np
    import torch

    import compeft_format
    from compeft_format import binding

    def bits(dtype, ints, np_dtype):
        return torch.from_numpy(np.array(ints, dtype=np_dtype).view({2: np.int16, 4: np.int32, 8: np.int64}[
            np.dtype(np_dtype).itemsize])).view(dtype)

    nans = {
        "bf16": bits(torch.bfloat16, [0x7F81, 0xFFC0, 0x3F80], np.uint16),        # signalling, negative, 1.0
        "f16": bits(torch.float16, [0x7C01, 0xFE01, 0x3C00], np.uint16),
        "f32": bits(torch.float32, [0x7F800001, 0xFFC00123, 0x3F800000], np.uint32),
        "f64": bits(torch.float64, [0x7FF0000000000001, 0xFFF8000000000000, 0x3FF0000000000000], np.uint64),
    }
    canonical = {k: bits(torch.float32, [0x7FC00000, 0x7FC00000, 0x3F800000], np.uint32) for k in nans}
    want = second_reader.fingerprint(_triples(canonical), binding.FLOAT32)
    assert second_reader.fingerprint(_triples(nans), binding.FLOAT32) == want
    assert compeft_format.fingerprint(nans, binding.FLOAT32).value == want
    assert compeft_format.fingerprint(nans, binding.AS_STORED).value != want


def test_fingerprint_bytes_by_hand():
    """The byte sequence of 3.4 written out literally."""
    bf16 = bytes.fromhex("803f00c0")  # 1.0, -2.0
    f32 = bytes.fromhex("0000803f000000c0")
    name = 'a"\\\n\x7fé😀/'
    esc = '"a\\"\\\\\\n\\u007f\\u00e9\\ud83d\\ude00/"'
    tensors = {"model.norm.weight": ("bfloat16", (2,), bf16), name: ("bool", (1, 2), b"\x01\x00"),
               "z.empty": ("int64", (0, 3), b""), "s": ("float64", (), struct.pack("<d", 1 + 2.0 ** -24))}
    v1 = hashlib.sha256(
        ('{"name":' + esc + ',"dtype":"bool","shape":[1,2]}\n').encode("ascii") + b"\x01\x00"
        + b'{"name":"model.norm.weight","dtype":"bfloat16","shape":[2]}\n' + bf16
        + b'{"name":"s","dtype":"float64","shape":[]}\n' + struct.pack("<d", 1 + 2.0 ** -24)
        + b'{"name":"z.empty","dtype":"int64","shape":[0,3]}\n').hexdigest()
    f32v1 = hashlib.sha256(
        ('{"name":' + esc + ',"dtype":"bool","shape":[1,2]}\n').encode("ascii") + b"\x01\x00"
        + b'{"name":"model.norm.weight","dtype":"float32","shape":[2]}\n' + f32
        + b'{"name":"s","dtype":"float32","shape":[]}\n' + struct.pack("<f", 1.0)  # tie rounds to even
        + b'{"name":"z.empty","dtype":"int64","shape":[0,3]}\n').hexdigest()
    assert second_reader.fingerprint(tensors, "sha256-state-dict-v1") == v1
    assert second_reader.fingerprint(tensors, "sha256-state-dict-f32-v1") == f32v1
    with pytest.raises(ValueError):
        second_reader.fingerprint(tensors, "sha256-state-dict-v2")
    with pytest.raises(ValueError):
        second_reader.fingerprint({"x": ("float32", (3,), b"\x00" * 8)}, "sha256-state-dict-v1")
