"""Files: every file is safetensors, decoding equals the in-memory tensors, lazy access, atomicity."""

from __future__ import annotations

import json
import os

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

import compeft_format as cf
from compeft_format import constants as C
from compeft_format.manifest import decode_manifest_text
from compeft_format.writer import build
from conftest import ROOT, bits_equal, state_dicts


@given(sd=state_dicts(), density=st.floats(0.01, 1.0), mode=st.sampled_from(C.MODES),
       scope=st.sampled_from(C.SCOPES), max_group=st.sampled_from([1, 17, 1 << 26]))
def test_save_load_exact_and_safetensors(tmp_path_factory, sd, density, mode, scope, max_group):
    path = tmp_path_factory.mktemp("f") / "x.cpeft.safetensors"
    ca = cf.compress(sd, density=density, mode=mode, scope=scope, min_sparse_numel=3)
    manifest = cf.save(ca, path, max_group_elements=max_group)
    # a valid safetensors file whose tensors are exactly the manifest's U8 streams
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        # a file without the members 1.4 added is written as 1.3 (spec 8.1)
        assert meta[C.META_FORMAT] == "compeft" and meta[C.META_VERSION] == C.FORMAT_VERSION_WITHOUT_RECOVERY == "1.3"
        names = set(f.keys())
        for g in manifest.groups:
            for s in g.streams.values():
                t = f.get_tensor(s.name)
                assert t.dtype == torch.uint8 and t.numel() == s.size
                names.discard(s.name)
        assert names == set()
    assert cf.verify(path).to_json() == manifest.to_json()
    out = cf.load(path)
    assert list(out) == sorted(sd)
    for n, t in ca.tensors.items():
        assert bits_equal(out[n], t.to_dense())
        assert out[n].shape == sd[n].shape and out[n].dtype == sd[n].dtype
    with cf.open_file(path) as f:  # lazy, one tensor at a time, in reverse order
        for n in reversed(f.keys()):
            assert bits_equal(f.get_tensor(n, dtype="float32"), ca.tensors[n].to_dense(torch.float32))


def test_inspect_sizes_equal_file_bytes(tmp_file):
    torch.manual_seed(1)
    sd = {f"l{i}.lora_A.weight": torch.randn(16, 300, dtype=torch.float16) for i in range(3)}
    sd["l0.bias"] = torch.randn(300)
    ca = cf.compress(sd, density=0.1)
    cf.save(ca, tmp_file)
    r = cf.inspect(tmp_file)
    assert r["file_bytes"] == os.path.getsize(tmp_file)
    with safe_open(str(tmp_file), framework="pt") as f:
        stored = sum(f.get_tensor(k).numel() for k in f.keys())
    assert r["stream_bytes"] == stored
    assert r["header_bytes"] == r["file_bytes"] - stored
    for g in r["groups"]:
        assert g["bytes"] == sum(s["size"] for s in g["streams"].values())
    assert r["params"] == 3 * 16 * 300 + 300
    assert r["bound_bits"] > 0 and r["file_vs_bound"] > 1.0
    n, k = 3 * 16 * 300, ca.compression.kept
    assert abs(r["ternary_bound_bits"] - cf.ternary_bound_bits(n, k)) < 0.05 * k  # per-tensor bound <= joint


def test_ternary_bound_matches_anchors_table():
    n = 1_000_000
    for d, bits in [(0.01, 0.091), (0.05, 0.336), (0.10, 0.569), (0.20, 0.922), (0.50, 1.500)]:
        assert abs(cf.ternary_bound_bits(n, int(d * n)) / n - bits) < 0.001


def test_manifest_records_metadata(tmp_file):
    sd = {"w": torch.randn(8, 8)}
    base = {"w": torch.randn(8, 8)}
    fp = cf.fingerprint(base)
    ca = cf.compress(sd, density=0.5, base=cf.BaseBinding(id="org/base", revision="abc123", fingerprint=fp),
                     peft_config={"peft_type": "LORA", "r": 8}, adapter_kind="lora", min_sparse_numel=0)
    cf.save(ca, tmp_file)
    m = cf.verify(tmp_file)
    assert m.base_model.id == "org/base" and m.base_model.revision == "abc123"
    assert m.base_model.fingerprint == fp and fp.algorithm == C.FINGERPRINT_ALGORITHM
    assert m.adapter.peft_config == {"peft_type": "LORA", "r": 8}
    assert m.compression.density == 0.5 and m.compression.method == "compeft"
    assert m.library_version == cf.__version__
    # fingerprint changes with any weight
    base["w"][0, 0] += 1
    assert cf.fingerprint(base).value != fp.value


def test_manifest_schema_accepts_written_manifests(tmp_file):
    schema = json.loads((ROOT / "spec" / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    ca = cf.compress({"a": torch.randn(40), "b": torch.randn(3)}, density=0.3, mode="prune")
    cf.save(ca, tmp_file)
    files = [tmp_file] + sorted((ROOT / "spec" / "vectors").glob("v1_*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        text = decode_manifest_text(meta[C.META_MANIFEST], meta[C.META_MANIFEST_ENCODING])
        jsonschema.validate(json.loads(text), schema)
    bad = json.loads(text)
    next(iter(bad["groups"][0]["streams"].values()))["sha256"] = "ABC"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    dest = tmp_path / "out.cpeft.safetensors"
    ca = cf.compress({"w": torch.randn(64)}, density=0.5)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("compeft_format.writer.write_safetensors", boom)
    with pytest.raises(cf.IOFailure):
        cf.save(ca, dest)
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_existing_file_whole(tmp_file):
    cf.save(cf.compress({"w": torch.randn(64)}, density=0.5), tmp_file)
    cf.save(cf.compress({"v": torch.randn(32)}, density=0.5), tmp_file)
    assert list(cf.load(tmp_file)) == ["v"]
    assert [p.name for p in tmp_file.parent.iterdir()] == [tmp_file.name]


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(cf.FileNotFound):
        cf.save(cf.compress({"w": torch.randn(8)}, density=0.5), tmp_path / "nope" / "x.safetensors")


def test_groups_split_at_limit():
    ca = cf.compress({f"t{i}": torch.randn(10) for i in range(5)}, density=0.5, min_sparse_numel=0)
    m, streams, _ = build(ca, max_group_elements=25, positions="bitmap")
    assert [len(ix) for ix in m.group_members()] == [2, 2, 1]
    assert len(streams) == 6


def test_decoded_digests_group_by_default_tensor_on_request(tmp_file):
    ca = cf.compress({"a": torch.randn(100), "b": torch.randn(60)}, density=0.2)
    m = cf.save(ca, tmp_file)
    assert all(t.sha256 is None for t in m.tensors)
    assert m.groups[0].decoded_sha256 == cf.integrity.group_sha256([ca.tensors["a"].to_dense(),
                                                                     ca.tensors["b"].to_dense()])
    cf.verify(tmp_file)
    m = cf.save(ca, tmp_file, tensor_digests=True, group_digests=False)
    assert m.groups[0].decoded_sha256 is None
    assert [t.sha256 for t in m.tensors] == [cf.tensor_sha256(ca.tensors[n].to_dense()) for n in ("a", "b")]
    cf.verify(tmp_file)


def test_sizes_smaller_than_fp16(tmp_file):
    torch.manual_seed(0)
    sd = {f"layers.{i}.{p}.lora_{ab}.weight": torch.randn((8, 512) if ab == "A" else (512, 8), dtype=torch.float16)
          for i in range(8) for p in ("q", "v") for ab in ("A", "B")}
    cf.save(cf.compress(sd, density=0.1), tmp_file)
    r = cf.inspect(tmp_file)
    assert 10 <= r["ratio_vs_fp16"] <= 30, r["ratio_vs_fp16"]
    np.testing.assert_allclose(r["bits_per_param"], 8 * r["file_bytes"] / r["params"])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("positions", ["golomb", "bitmap"])
def test_decode_on_device_equals_cpu(tmp_file, device, positions, monkeypatch):
    """Packed streams are moved to the device and decoded there: every stream handed to a codec
    is already on the device, and the tensors equal the CPU decode bit for bit."""
    torch.manual_seed(0)
    sd = {"a.lora_A.weight": torch.randn(8, 300, dtype=torch.float16), "b": torch.randn(50, 7),
          "c.bias": torch.randn(7, dtype=torch.bfloat16)}
    ca = cf.compress(sd, density=0.2)
    cf.save(ca, tmp_file, positions=positions)
    seen = []
    for codec in cf.codecs.REGISTRY.values():
        def decode(raw, *args, _real=codec.decode, **kw):
            seen.extend(t.device.type for t in raw.values())
            return _real(raw, *args, **kw)

        monkeypatch.setattr(codec, "decode", decode)
    out = cf.load(tmp_file, device=device, dtype=torch.float32)
    assert seen and set(seen) == {torch.device(device).type}
    for n, t in out.items():
        assert t.device.type == torch.device(device).type
        assert bits_equal(t.cpu(), ca.tensors[n].to_dense(torch.float32))


@given(sd=state_dicts(), density=st.floats(0.01, 1.0), mode=st.sampled_from(C.MODES),
       scope=st.sampled_from(C.SCOPES), positions=st.sampled_from(["auto", "golomb", "bitmap"]),
       reference=st.sampled_from(["zero", "ones"]), method=st.sampled_from(["paper", "fit"]))
def test_read_is_the_inverse_of_save(tmp_path_factory, backend, sd, density, mode, scope, positions, reference, method):
    """read() gives back the compressed adapter: written again with the same options it makes the
    same manifest and streams, and it decodes to what load() decodes."""
    path = tmp_path_factory.mktemp("r") / "x.cpeft.safetensors"
    ca = cf.compress(sd, density=density, mode=mode, scope=scope, reference=reference, min_sparse_numel=3,
                     method=method)
    opts = cf.WriterOptions(positions=positions, tensor_digests=True)
    cf.save(ca, path, opts)
    back = cf.read(path, verify=True)
    assert list(back.tensors) == list(ca.tensors)
    first, again = build(ca, opts), build(back, opts)
    assert first[0].to_json() == again[0].to_json()
    assert first[1].keys() == again[1].keys() and all(np.array_equal(first[1][k], again[1][k]) for k in first[1])
    loaded = cf.load(path)
    for n, t in back.tensors.items():
        assert t.encoding == ca.tensors[n].encoding and t.nnz == ca.tensors[n].nnz
        assert bits_equal(t.to_dense(), loaded[n])
    if mode == C.MODE_TERNARY and any(t.encoding == C.ENC_TERNARY for t in ca.tensors.values()):
        # the selection survives, so alpha can still be changed on a file read back
        rescaled = cf.rescale(back, 2.0)
        for n, t in rescaled.tensors.items():
            if t.encoding == C.ENC_TERNARY:  # each scale doubles (the fitted scales have no sigma)
                assert t.scale == float(np.float32(2.0 * back.tensors[n].scale))


def test_read_checks_what_decoding_checks():
    from conftest import VECTORS

    for name, err in [("bad_stream_digest", cf.StreamDigestMismatch), ("bad_popcount", cf.StreamCorrupt),
                      ("bad_golomb_overrun", cf.StreamCorrupt)]:
        with pytest.raises(err):
            cf.read(VECTORS / f"{name}.cpeft.safetensors")
    with pytest.raises(cf.TensorDigestMismatch):
        cf.read(VECTORS / "bad_tensor_digest.cpeft.safetensors", verify=True)


def test_writer_options_and_compeft_config_are_checked(tmp_file):
    ca = cf.compress({"w": torch.randn(64)}, density=0.5)
    for bad in ({"positions": "rle"}, {"zstd_level": 23}, {"zstd_level": 1.5}, {"max_group_elements": -1},
                {"manifest_encoding": "brotli"}, {"colour": "red"}):
        with pytest.raises(cf.InvalidArgument):
            cf.save(ca, tmp_file, **bad)
    assert not tmp_file.exists()
    opts = cf.WriterOptions(positions="bitmap")
    assert cf.save(ca, tmp_file, opts, tensor_digests=True).tensors[0].sha256 is not None
    assert cf.verify(tmp_file).groups[0].params["positions"] == "bitmap"
    cfg = cf.CompeftConfig(density=0.25, dtype=torch.float16, dense_patterns=["*.bias"])
    assert cfg.dtype == "float16" and cfg.dense_patterns == ("*.bias",)
    assert cfg.replace(alpha=2.0).alpha == 2.0 and cfg.alpha == 1.0
    for bad in ({"density": 0}, {"alpha": float("inf")}, {"mode": "quaternary"}, {"reference": "twos"},
                {"min_sparse_numel": -1}, {"dense_patterns": "*.bias"}):
        with pytest.raises(cf.InvalidArgument):
            cf.CompeftConfig(**bad)
    with pytest.raises(cf.UnsupportedDtype):
        cf.CompeftConfig(dtype=torch.int8)
    with pytest.raises(cf.InvalidArgument, match="unknown ComPEFT parameter"):
        cf.compress({"w": torch.randn(64)}, densty=0.2)


def test_one_open_file_serves_several_threads_and_reopens_after_close(tmp_file):
    from conftest import run_in_threads

    torch.manual_seed(0)
    sd = {f"t{i}.lora_A.weight": torch.randn(16, 64) for i in range(8)}
    ca = cf.compress(sd, density=0.2)
    cf.save(ca, tmp_file, max_group_elements=2048)
    results = {}
    with cf.open_file(tmp_file) as f:
        def work(k):
            for _ in range(20):
                for n in sd:
                    results[(k, n)] = f.get_tensor(n)

        errors = run_in_threads(work)
    assert errors == []
    assert all(bits_equal(t, ca.tensors[n].to_dense()) for (_, n), t in results.items())
    # closed: the next read opens the file again
    assert bits_equal(f.get_tensor("t3.lora_A.weight"), ca.tensors["t3.lora_A.weight"].to_dense())
    f.close()
    tmp_file.write_bytes(tmp_file.read_bytes() + b"\0")
    with pytest.raises(cf.TruncatedFile, match="changed size"):
        f.get_tensor("t0.lora_A.weight")


def test_files_are_the_same_byte_for_byte_and_read_by_safetensors(tmp_path):
    """The header is written in one order (the safetensors library writes metadata keys in a
    random order per call), and the file is one safetensors reads."""
    from safetensors import safe_open

    ca = cf.compress({"w": torch.randn(300), "v": torch.randn(40, 8)}, density=0.3, created_at="2020-01-01T00:00:00Z")
    a, b = tmp_path / "a.cpeft.safetensors", tmp_path / "b.cpeft.safetensors"
    cf.save(ca, a)
    cf.save(ca, b)
    assert a.read_bytes() == b.read_bytes()
    n = int.from_bytes(a.read_bytes()[:8], "little")
    assert n % 8 == 0
    with safe_open(str(a), framework="np") as f:
        assert sorted(f.metadata()) == sorted(cf.open_file(a).metadata)
        assert all(f.get_tensor(k).dtype.name == "uint8" for k in f.keys())
