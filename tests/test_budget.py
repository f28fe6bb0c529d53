"""The reader's resource budget (spec 8.5) and the reader rules around it: files within the
format's limits that would need more than the budget are refused with LIMIT_EXCEEDED before
anything is allocated; zstd frames that declare more than they hold; special files; lone
surrogates in the header; the integer ``-0``."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
import zstandard

import compeft_format as cf
import second_reader
from compeft_format import constants as C
from compeft_format.cli import main
from compeft_format.framing import unframe
from compeft_format.integrity import sha256_hex


def write_file(path, manifest: dict, streams: dict[str, bytes], *, meta_extra: dict | None = None,
               raw_text: str | None = None):
    """A compeft file holding ``manifest`` (or the manifest text ``raw_text``) and ``streams``,
    every digest the reader checks first made right, as an attacker can."""
    text = raw_text if raw_text is not None else json.dumps(manifest, separators=(",", ":"))
    meta = {C.META_FORMAT: C.FORMAT_NAME, C.META_VERSION: C.FORMAT_VERSION, C.META_MANIFEST_ENCODING: "json",
            C.META_MANIFEST: text, C.META_MANIFEST_SHA256: sha256_hex(text.encode("utf-8", "surrogatepass"))}
    meta.update(meta_extra or {})
    header: dict = {"__metadata__": meta}
    offset = 0
    for name, data in streams.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(streams.values()))
    return path


def stream(name, data: bytes, raw_size: int | None = None, compression: str = "none") -> dict:
    return {"name": name, "compression": compression, "size": len(data),
            "raw_size": len(data) if raw_size is None else raw_size, "sha256": sha256_hex(data)}


def huge_ternary(path, numel: int = 1 << 36):
    """One ternary tensor of ``numel`` elements, none kept: 1 KB on disk, 256 GiB decoded."""
    g = {"encoding": "ternary", "params": {"positions": "golomb"},
         "streams": {"unary": stream("g0.unary", b""), "remainders": stream("g0.remainders", b""),
                     "extra": stream("g0.extra", b""), "signs": stream("g0.signs", b"")}}
    t = {"name": "w", "shape": [numel], "dtype": "float32", "group": 0, "nnz": 0, "scale": 1}
    return write_file(path, {"tensors": [t], "groups": [g]}, {n: b"" for n in ("g0.unary", "g0.remainders",
                                                                               "g0.extra", "g0.signs")})


def zstd_bomb_frame(content_size: int) -> bytes:
    """A 14-byte zstd frame declaring ``content_size`` bytes that holds one: magic, a single-segment
    descriptor with an 8-byte content size, one last RLE block of one byte."""
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", content_size) + bytes([0x0B, 0, 0]) + b"\x00"


def dense_bomb(path, numel: int = 1 << 33):
    frame = zstd_bomb_frame(4 * numel)
    g = {"encoding": "dense", "params": {"value_dtype": "float32"},
         "streams": {"values": stream("g0.values", frame, raw_size=4 * numel, compression="zstd")}}
    t = {"name": "w", "shape": [numel], "dtype": "float32", "group": 0, "nnz": numel}
    return write_file(path, {"tensors": [t], "groups": [g]}, {"g0.values": frame})


def test_default_budget_is_half_the_machine_and_the_environment_changes_it(monkeypatch):
    from compeft_format.budget import physical_memory

    monkeypatch.delenv("COMPEFT_MAX_DECODED_BYTES", raising=False)
    monkeypatch.delenv("COMPEFT_MAX_ENTRIES", raising=False)
    b = cf.Budget.default()
    assert b.decoded_bytes == physical_memory() // 2 > 0 and b.entries == 100_000
    monkeypatch.setenv("COMPEFT_MAX_DECODED_BYTES", "1_000_000")
    monkeypatch.setenv("COMPEFT_MAX_ENTRIES", "7")
    assert cf.Budget.default() == cf.Budget(decoded_bytes=1_000_000, entries=7)
    monkeypatch.setenv("COMPEFT_MAX_ENTRIES", "lots")
    with pytest.raises(cf.InvalidArgument, match="COMPEFT_MAX_ENTRIES"):
        cf.Budget.default()
    with pytest.raises(cf.InvalidArgument):
        cf.Budget(decoded_bytes=0)


def test_a_tensor_of_2_36_elements_is_refused_in_milliseconds(tmp_path, capsys):
    path = huge_ternary(tmp_path / "huge.cpeft.safetensors")
    assert path.stat().st_size < 2048
    with cf.open_file(path) as f:  # within the format's limits: it opens
        assert f.tensor_info("w").numel == 1 << 36
    for call in (cf.verify, cf.load, cf.read):
        t0 = time.perf_counter()
        with pytest.raises(cf.LimitExceeded, match="over this reader's budget") as e:
            call(path)
        assert time.perf_counter() - t0 < 1.0 and e.value.code == "LIMIT_EXCEEDED"
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{path}: INVALID LIMIT_EXCEEDED: ")


def test_a_budget_large_enough_decodes_what_the_default_refuses(tmp_path):
    path = huge_ternary(tmp_path / "mid.cpeft.safetensors", numel=1 << 20)
    with pytest.raises(cf.LimitExceeded):
        cf.load(path, budget=cf.Budget(decoded_bytes=1 << 20))
    out = cf.load(path, budget=cf.Budget(decoded_bytes=64 << 20))
    assert out["w"].shape == (1 << 20,) and int(out["w"].count_nonzero()) == 0


def test_a_zstd_frame_declaring_32_gib_is_refused_before_it_is_decompressed(tmp_path):
    frame = zstd_bomb_frame(32 << 30)
    assert zstandard.get_frame_parameters(frame).content_size == 32 << 30
    path = dense_bomb(tmp_path / "bomb.cpeft.safetensors")
    t0 = time.perf_counter()
    with pytest.raises(cf.LimitExceeded, match="over this reader's budget"):
        cf.verify(path)
    assert time.perf_counter() - t0 < 1.0
    # a reader whose budget admits the declared size still gets a typed error, never MemoryError
    with pytest.raises((cf.LimitExceeded, cf.StreamCorrupt)) as e:
        cf.load(path, budget=cf.Budget(decoded_bytes=1 << 40))
    assert e.value.code in ("LIMIT_EXCEEDED", "STREAM_CORRUPT")
    with pytest.raises(cf.StreamCorrupt):  # a frame that holds less than it declares
        unframe(zstd_bomb_frame(100), C.COMP_ZSTD, 100)


def test_a_manifest_over_the_entry_budget_is_refused_before_its_entries_are_checked(tmp_path):
    tensors = [{"name": f"t{i}", "shape": [1], "dtype": "float32", "group": 0, "nnz": 1} for i in range(12_000)]
    g = {"encoding": "dense", "params": {"value_dtype": "float32"}, "streams": {"values": stream("v", b"\0" * 48_000)}}
    path = write_file(tmp_path / "many.cpeft.safetensors", {"tensors": tensors, "groups": [g]}, {"v": b"\0" * 48_000})
    with pytest.raises(cf.LimitExceeded, match="12,001 entries, over this reader's budget of 1,000"):
        cf.open_file(path, budget=cf.Budget(decoded_bytes=1 << 30, entries=1000))
    assert len(cf.load(path)) == 12_000  # within the default budget it is an ordinary file
    # objects are counted while they are built, so a manifest of many more objects stops early
    with pytest.raises(cf.LimitExceeded, match="JSON objects"):
        cf.open_file(path, budget=cf.Budget(decoded_bytes=1 << 30, entries=10))


def test_a_fifo_or_device_is_refused_without_reading(tmp_path, capsys):
    fifo = tmp_path / "pipe.cpeft.safetensors"
    os.mkfifo(fifo)
    result: list = []

    def run():
        try:
            cf.verify(fifo)
        except cf.CompeftError as e:
            result.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert isinstance(result[0], cf.InputError) and "not a regular file" in str(result[0])
    with pytest.raises(cf.InputError, match="not a regular file"):
        cf.open_file("/dev/zero")
    assert main(["validate", str(fifo)]) == 1
    assert "INVALID INVALID_INPUT" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["metadata value", "metadata key", "stream name"])
def test_a_lone_surrogate_in_the_header_is_not_safetensors(tmp_path, capsys, where):
    path = huge_ternary(tmp_path / "s.cpeft.safetensors", numel=8)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].decode()
    if where == "metadata value":
        h = header.replace(f'"{C.META_MANIFEST_SHA256}": "', f'"{C.META_MANIFEST_SHA256}": "\\ud800', 1)
    elif where == "metadata key":
        h = header.replace('"__metadata__": {', '"__metadata__": {"x\\udfff": "", ', 1)
    else:
        h = header.replace('"g0.signs"', '"g0.signs\\ud83d"', 1)
    assert h != header
    hb = h.encode()
    hb += b" " * ((-len(hb)) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    with pytest.raises(cf.NotSafetensors, match="lone surrogate"):
        cf.open_file(path)
    with pytest.raises(second_reader.SpecError) as e:  # the reader written from the spec agrees
        second_reader.read(path)
    assert e.value.code == "NOT_SAFETENSORS"
    assert main(["validate", str(path)]) == 1  # and the one line prints
    assert "INVALID NOT_SAFETENSORS" in capsys.readouterr().out


def test_stream_names_must_be_unicode_and_not_the_metadata_member(tmp_path):
    data = b"\0" * 4
    t = {"name": "w", "shape": [1], "dtype": "float32", "group": 0, "nnz": 1}
    for bad, match in (("__metadata__", "__metadata__"), ("v\ud800", "not valid Unicode")):
        g = {"encoding": "dense", "params": {"value_dtype": "float32"}, "streams": {"values": stream(bad, data)}}
        text = json.dumps({"tensors": [t], "groups": [g]})  # json.dumps escapes the surrogate
        path = write_file(tmp_path / "n.cpeft.safetensors", {}, {"v": data}, raw_text=text)
        with pytest.raises(cf.ManifestError, match=match):
            cf.open_file(path)
        with pytest.raises(second_reader.SpecError) as e:
            second_reader.read(path)
        assert e.value.code == "MANIFEST_INVALID"


def test_missing_params_default_to_an_empty_object(tmp_path):
    """Spec 3.3: ``params`` defaults to ``{}``, so a group without it lacks its required parameter
    (UNKNOWN_ENCODING), not a member (MANIFEST_INVALID); the schema agrees."""
    data = b"\0\0\x80\x3f"
    t = {"name": "w", "shape": [1], "dtype": "float32", "group": 0, "nnz": 1}
    g = {"encoding": "dense", "streams": {"values": stream("v", data)}}
    path = write_file(tmp_path / "p.cpeft.safetensors", {"tensors": [t], "groups": [g]}, {"v": data})
    with pytest.raises(cf.UnknownEncoding, match="value dtype None"):
        cf.open_file(path)
    g["params"] = {"value_dtype": "float32"}
    path = write_file(tmp_path / "p.cpeft.safetensors", {"tensors": [t], "groups": [g]}, {"v": data})
    assert cf.load(path)["w"].tolist() == [1.0]
    schema = json.loads((Path(__file__).parent.parent / "spec" / "manifest.schema.json").read_text())
    group = schema["$defs"]["group"]
    assert "params" not in group["required"] and group["properties"]["params"]["default"] == {}
    assert schema["title"].endswith(f"format version {C.FORMAT_VERSION}")


def with_manifest_text(src, dst, transform):
    """``src`` with its manifest text changed by ``transform`` (stored as ``json``) and the
    manifest digest made right."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header["__metadata__"]
    text = json.dumps(json.loads(cf.manifest.decode_manifest_text(meta[C.META_MANIFEST],
                                                                  meta[C.META_MANIFEST_ENCODING])),
                      separators=(",", ":"))
    new = transform(text)
    assert new != text
    meta.update({C.META_MANIFEST_ENCODING: "json", C.META_MANIFEST: new, C.META_MANIFEST_SHA256: sha256_hex(new.encode())})
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    dst.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    return dst


@pytest.mark.parametrize("literal, negative", [("-0", True), ("0", False), ("-0.0", True), ("-0e0", True)])
def test_a_scale_of_minus_zero_decodes_as_negative_zero(tmp_path, literal, negative):
    import re

    from conftest import VECTORS

    src = VECTORS / "v1_ternary_bitmap.cpeft.safetensors"
    first = cf.open_file(src).manifest.tensors[0]
    assert first.nnz > 0
    def edit(text):  # the decoded digests no longer hold: drop them, then write the literal
        m = json.loads(text)
        for x in m["tensors"] + m["groups"]:
            x.pop("sha256", None), x.pop("decoded_sha256", None)
        return re.sub(r'"scale":[^,}]+', f'"scale":{literal}', json.dumps(m, separators=(",", ":")), count=1)
    path = with_manifest_text(src, tmp_path / "z.cpeft.safetensors", edit)
    with cf.open_file(path) as f:
        assert f.tensor_info(first.name).scale == 0.0
        assert (str(f.tensor_info(first.name).scale) == "-0.0") is negative
    # kept entries are +scale or -scale: which of them carry the sign bit depends on the sign of 0
    bits = cf.load(path)[first.name].float().signbit()
    negatives = cf.read(src).tensors[first.name].negative
    kept = cf.read(src).tensors[first.name].indices
    assert bits.reshape(-1)[torch.from_numpy(kept)].numpy().tolist() == (~negatives if negative else negatives).tolist()
    # the reader written from the spec decodes the same bits
    dtype, shape, data = second_reader.read(path)[first.name]
    assert cf.load(path)[first.name].contiguous().view(torch.uint8).numpy().tobytes() == bytes(data)


def test_an_integer_field_reads_minus_zero_as_zero(tmp_path):
    path = huge_ternary(tmp_path / "z.cpeft.safetensors", numel=8)
    text = json.dumps(json.loads(cf.open_file(path).metadata[C.META_MANIFEST]), separators=(",", ":"))
    text = text.replace('"nnz":0', '"nnz":-0').replace('"group":0', '"group":-0')
    path = write_file(path, {}, {n: b"" for n in ("g0.unary", "g0.remainders", "g0.extra", "g0.signs")},
                      raw_text=text)
    with cf.open_file(path) as f:
        info = f.tensor_info("w")
    assert (info.nnz, info.group) == (0, 0) and type(info.nnz) is int and type(info.group) is int
    assert cf.load(path)["w"].tolist() == [0.0] * 8
