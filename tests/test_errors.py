"""Bad files and bad input: typed errors with the spec's codes, nothing half-written."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import compeft_format as cf
from compeft_format import constants as C
from compeft_format.manifest import decode_manifest_text


def make(tmp_path, **kw):
    path = tmp_path / "a.cpeft.safetensors"
    cf.save(cf.compress({"w": torch.randn(50, 7), "v": torch.randn(9)}, density=0.3, min_sparse_numel=0, **kw), path)
    return path


def rewrite_header(path, edit):
    """Edit the safetensors header JSON in place (data section unchanged)."""
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    header = json.loads(b[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b[8 + n:])


def edit_manifest(h, fn):
    """Apply ``fn`` to the manifest object and store it back as plain JSON with a fresh digest."""
    meta = h["__metadata__"]
    m = json.loads(decode_manifest_text(meta[C.META_MANIFEST], meta[C.META_MANIFEST_ENCODING]))
    fn(m)
    text = json.dumps(m)
    meta[C.META_MANIFEST_ENCODING] = C.MANIFEST_JSON
    meta[C.META_MANIFEST] = text
    meta[C.META_MANIFEST_SHA256] = cf.integrity.sha256_hex(text.encode())


def code_of(path):
    with pytest.raises(cf.CompeftError) as e:
        cf.verify(path)
    return e.value.code


def test_missing_path(tmp_path):
    assert code_of(tmp_path / "nope.safetensors") == C.E_FILE_NOT_FOUND
    with pytest.raises(cf.FileNotFound):
        cf.load(tmp_path / "nope.safetensors")


def test_directory_is_input_error(tmp_path):
    with pytest.raises(cf.InputError):
        cf.verify(tmp_path)


def test_plain_safetensors(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(3)}, str(p))
    assert code_of(p) == C.E_NOT_COMPEFT


@pytest.mark.parametrize("cut", [0, 5, 8, 20, -1, -30])
def test_truncated(tmp_path, cut):
    p = make(tmp_path)
    b = p.read_bytes()
    p.write_bytes(b[:cut] if cut >= 0 else b[:len(b) + cut])
    assert code_of(p) == C.E_TRUNCATED


def test_empty_file(tmp_path):
    p = tmp_path / "e.safetensors"
    p.write_bytes(b"")
    assert code_of(p) == C.E_TRUNCATED


def test_random_bytes(tmp_path):
    p = tmp_path / "r.safetensors"
    p.write_bytes(bytes(range(256)) * 4)
    assert code_of(p) == C.E_NOT_SAFETENSORS


@pytest.mark.parametrize("version, code", [
    ("3.1", C.E_UNSUPPORTED_VERSION),  # unknown major
    ("1.0\n", C.E_MANIFEST_INVALID),   # not exactly MAJOR.MINOR
    ("01.0", C.E_MANIFEST_INVALID),
    ("1.7", None),                     # a newer minor version is read
])
def test_version_rules(tmp_path, version, code):
    p = make(tmp_path)
    rewrite_header(p, lambda h: h["__metadata__"].update({C.META_VERSION: version}))
    if code is None:
        cf.verify(p)
    else:
        assert code_of(p) == code


def test_unknown_optional_fields_are_ignored(tmp_path):
    p = make(tmp_path)

    def fn(m):
        m["future_field"] = {"x": 1}
        m["tensors"][0]["future"] = True
        next(iter(m["groups"][0]["streams"].values()))["future"] = 1

    rewrite_header(p, lambda h: edit_manifest(h, fn))
    cf.verify(p)


def test_corrupted_stream_byte(tmp_path):
    p = make(tmp_path)
    b = bytearray(p.read_bytes())
    b[-3] ^= 0x40
    p.write_bytes(bytes(b))
    assert code_of(p) == C.E_STREAM_DIGEST_MISMATCH
    with pytest.raises(cf.StreamDigestMismatch, match="sha256 is [0-9a-f]{64}, manifest declares [0-9a-f]{64}"):
        cf.load(p)


def test_manifest_disagrees_with_tensors(tmp_path):
    p = make(tmp_path)

    def fn(m):
        next(iter(m["groups"][0]["streams"].values()))["name"] = "elsewhere"

    rewrite_header(p, lambda h: edit_manifest(h, fn))
    assert code_of(p) == C.E_MANIFEST_MISMATCH


def test_manifest_edited_without_digest(tmp_path):
    p = make(tmp_path)

    def edit(h):
        digest = h["__metadata__"][C.META_MANIFEST_SHA256]
        edit_manifest(h, lambda m: m["tensors"][0].update(nnz=m["tensors"][0]["nnz"]))
        h["__metadata__"][C.META_MANIFEST] = h["__metadata__"][C.META_MANIFEST].replace('"nnz": ', '"nnz":  ')
        h["__metadata__"][C.META_MANIFEST_SHA256] = digest

    rewrite_header(p, edit)
    assert code_of(p) == C.E_MANIFEST_DIGEST_MISMATCH


@pytest.mark.parametrize("encoding", C.MANIFEST_ENCODINGS)
def test_every_manifest_encoding_reads_back(tmp_path, encoding):
    path = tmp_path / "m.cpeft.safetensors"
    ca = cf.compress({"w": torch.randn(50, 7)}, density=0.3)
    cf.save(ca, path, manifest_encoding=encoding)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))["__metadata__"]
    assert meta[C.META_MANIFEST_ENCODING] == encoding
    assert cf.verify(path).to_json() == cf.writer.build(ca)[0].to_json()


def test_manifest_dictionary_is_the_spec_file_and_shrinks_lora_manifests():
    from compeft_format.integrity import sha256_hex
    from compeft_format.manifest import encode_manifest_text
    from conftest import ROOT

    shipped = (ROOT / "compeft_format" / "data" / C.MANIFEST_DICT1_FILE).read_bytes()
    assert shipped == (ROOT / "spec" / C.MANIFEST_DICT1_FILE).read_bytes()
    assert sha256_hex(shipped) == C.MANIFEST_DICT1_SHA256
    assert f"`{C.MANIFEST_DICT1_SHA256}`" in (ROOT / "spec" / "FORMAT.md").read_text()
    sd = {f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{f}.weight": torch.randn(4, 32)
          for i in range(8) for p in "qv" for f in "AB"}
    manifest = cf.writer.build(cf.compress(sd, density=0.1))[0]
    text = manifest.to_json()
    sizes = {e: len(encode_manifest_text(text, e)) for e in C.MANIFEST_ENCODINGS}
    assert sizes[C.MANIFEST_ZSTD_DICT1_BASE64] < 0.7 * sizes[C.MANIFEST_ZSTD_BASE64] < 0.7 * sizes[C.MANIFEST_JSON]


def test_errors_share_one_base_and_print_one_line():
    e = cf.StreamCorrupt("line one\nline two")
    assert isinstance(e, cf.CompeftError) and e.code == "STREAM_CORRUPT" and "\n" not in str(e)
    assert cf.InvalidArgument("x").code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("edit, code", [
    (lambda m: m["tensors"][0].update(name="bad\ud800name"), C.E_MANIFEST_INVALID),
    (lambda m: m["tensors"][0].update(scale=10 ** 400), C.E_MANIFEST_INVALID),
    (lambda m: m["compression"].update(alpha=-(10 ** 400)), C.E_MANIFEST_INVALID),
    (lambda m: m["tensors"][1].update(shape=[0, 1 << 40]), C.E_LIMIT_EXCEEDED),
    (lambda m: m["tensors"][0].update(nnz=10 ** 9), C.E_MANIFEST_INVALID),
    (lambda m: m["groups"].append(m["groups"][0]), C.E_MANIFEST_INVALID),
])
def test_hostile_manifests_get_codes_not_crashes(tmp_path, edit, code):
    p = make(tmp_path)
    rewrite_header(p, lambda h: edit_manifest(h, edit))
    assert code_of(p) == code


def test_negative_zero_offset_reads_as_zero(tmp_path):
    p = make(tmp_path)
    rewrite_header(p, lambda h: edit_manifest(h, lambda m: m["tensors"][0].update(offset=-0.0)))
    assert cf.verify(p).tensors[0].offset == 0.0
    assert str(cf.verify(p).tensors[0].offset) == "0.0"


def test_scale_overflow_is_refused():
    with pytest.raises(cf.InvalidArgument, match="overflows"):
        cf.compress({"w": torch.tensor([1e30, -1e30, 3.0, 4.0])}, alpha=1e10, min_sparse_numel=0, method="paper")
    with pytest.raises(cf.InvalidArgument, match="overflows"):
        cf.compress({"w": torch.tensor([1e30, -1e30, 3.0, 4.0])}, alpha=1e10, density=0.5, min_sparse_numel=0)


def test_writer_enforces_reader_limits(tmp_path):
    ca = cf.compress({"x" * 2000: torch.randn(40)}, density=0.5)
    with pytest.raises(cf.LimitExceeded):
        cf.save(ca, tmp_path / "long.cpeft.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_skippable_or_dictionary_frames_are_refused():
    from compeft_format.framing import unframe

    skippable = b"\x50\x2a\x4d\x18" + (0).to_bytes(4, "little")
    with pytest.raises(cf.StreamCorrupt):
        unframe(skippable, C.COMP_ZSTD, 0)


def test_negative_zero_scale_keeps_its_sign(tmp_path):
    """Only offsets fold -0 into +0; a scale of -0 makes positive entries -0 and negative entries
    +0 (spec 5.2). The recorded decoded digest then no longer matches, as it should not."""
    import math

    p = make(tmp_path)
    rewrite_header(p, lambda h: edit_manifest(h, lambda m: [t.update(scale=-0.0) for t in m["tensors"] if "scale" in t]))
    with cf.open_file(p) as f:
        info = f.tensor_info("w")
        assert math.copysign(1.0, info.scale) == -1.0
        w = f.get_tensor("w", dtype=torch.float32).reshape(-1)
    assert code_of(p) == C.E_TENSOR_DIGEST_MISMATCH
    signs = [math.copysign(1.0, float(x)) for x in w]
    assert signs.count(-1.0) > 0 and signs.count(1.0) > 0 and all(float(x) == 0.0 for x in w)


def test_writer_refuses_values_beyond_the_target_dtype(tmp_path):
    sd = {"w": torch.tensor([1e6, -2.0, 3.0, 0.5])}
    with pytest.raises(cf.InvalidArgument, match="beyond the range of float16"):
        cf.compress(sd, density=0.5, mode="prune", dtype="float16", min_sparse_numel=0)
    with pytest.raises(cf.InvalidArgument, match="beyond the range of float16"):
        cf.compress(sd, dense_patterns=("*",), dtype="float16")


def test_rescale_refuses_overflowing_scale():
    ca = cf.compress({"w": torch.randn(64)}, density=0.5, min_sparse_numel=0)
    with pytest.raises(cf.InvalidArgument, match="overflows"):
        cf.rescale(ca, 1e39)


def test_metadata_that_is_not_an_object_is_not_safetensors(tmp_path):
    p = make(tmp_path)
    rewrite_header(p, lambda h: h.update({"__metadata__": []}))
    assert code_of(p) == C.E_NOT_SAFETENSORS


def test_safetensors_write_failures_are_io_errors(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise OSError(27, "File too large")

    monkeypatch.setattr("compeft_format.writer.open", fail, raising=False)  # the writer's file, not the others
    with pytest.raises(cf.IOFailure):
        cf.save(cf.compress({"w": torch.randn(64)}, density=0.5), tmp_path / "x.cpeft.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_manifest_checks_group_members_once(tmp_path, monkeypatch):
    ca = cf.compress({f"t{i}": torch.randn(40) for i in range(30)}, density=0.5, min_sparse_numel=0)
    path = tmp_path / "g.cpeft.safetensors"
    cf.save(ca, path, max_group_elements=40)
    calls = []
    real = cf.Manifest.group_members
    monkeypatch.setattr(cf.Manifest, "group_members", lambda self: calls.append(1) or real(self))
    cf.manifest.parse_metadata(cf.container.read_safetensors_header(path)[1], cf.codecs.REGISTRY)
    assert len(calls) == 1


def test_each_code_belongs_to_one_class_and_the_spec_lists_it():
    from conftest import ROOT

    codes = {v for k, v in vars(C).items() if k.startswith("E_")}
    assert set(cf.CODES) == codes
    assert all(cls.code == code for code, cls in cf.CODES.items())
    # the kinds that group several codes have none of their own
    for kind in (cf.FormatError, cf.EncodingError, cf.IntegrityError, cf.ApplyError):
        assert kind not in cf.CODES.values()
    spec = (ROOT / "spec" / "FORMAT.md").read_text()
    assert all(f"`{code}`" in spec for code in codes)
    with pytest.raises(TypeError, match="belongs to"):
        type("Again", (cf.CompeftError,), {"code": C.E_STREAM_CORRUPT})


def test_errors_are_the_builtins_callers_already_catch(tmp_path):
    assert issubclass(cf.InvalidArgument, ValueError) and issubclass(cf.FileNotFound, FileNotFoundError)
    assert issubclass(cf.IOFailure, OSError) and issubclass(cf.HubUnreachable, ConnectionError)
    assert issubclass(cf.HubAuthError, PermissionError) and issubclass(cf.UnsupportedDtype, TypeError)
    assert issubclass(cf.StreamCorrupt, ValueError) and issubclass(cf.TensorDigestMismatch, ValueError)
    with pytest.raises(FileNotFoundError):
        cf.verify(tmp_path / "missing.cpeft.safetensors")
    with pytest.raises(ValueError):
        cf.compress({"w": torch.ones(4)}, density=2.0)
    with pytest.raises(TypeError):
        cf.compress({"w": torch.ones(4, dtype=torch.int32)})


def test_errors_carry_their_data(tmp_path):
    import pickle

    p = make(tmp_path)
    b = bytearray(p.read_bytes())
    b[-3] ^= 0x40
    p.write_bytes(bytes(b))
    with pytest.raises(cf.StreamDigestMismatch) as e:
        cf.load(p)
    err = e.value
    assert err.subject.startswith("g") and len(err.expected) == len(err.actual) == 64 and err.expected != err.actual
    assert err.expected in str(err) and err.actual in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is cf.StreamDigestMismatch and (again.subject, again.expected, again.actual) == (
        err.subject, err.expected, err.actual) and str(again) == str(err)
    with pytest.raises(cf.FileNotFound) as e2:
        cf.verify(tmp_path / "gone.cpeft.safetensors")
    assert e2.value.path == str(tmp_path / "gone.cpeft.safetensors")
    with pytest.raises(TypeError, match="no detail 'colour'"):
        cf.StreamCorrupt("x", colour="red")


def test_a_missing_file_is_not_a_value_error(tmp_path):
    assert not issubclass(cf.FileNotFound, ValueError) and issubclass(cf.NonFiniteInput, ValueError)
    try:
        cf.verify(tmp_path / "missing.cpeft.safetensors")
    except ValueError:  # noqa: B014 - the point is what this clause does not catch
        pytest.fail("a missing file was caught as a ValueError")
    except FileNotFoundError:
        pass


def _with_manifest_edit(src, dst, edit):
    """``src`` with its manifest changed by ``edit`` and the manifest digest fixed (an attacker can)."""
    from compeft_format.integrity import sha256_hex
    from compeft_format.manifest import encode_manifest_text

    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header["__metadata__"]
    manifest = json.loads(decode_manifest_text(meta[C.META_MANIFEST], meta[C.META_MANIFEST_ENCODING]))
    edit(manifest)
    text = json.dumps(manifest)
    meta[C.META_MANIFEST] = encode_manifest_text(text, meta[C.META_MANIFEST_ENCODING])
    meta[C.META_MANIFEST_SHA256] = sha256_hex(text.encode())
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    dst.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    return dst


def test_a_file_declaring_more_output_than_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    from conftest import VECTORS

    def huge(m):  # an empty ternary tensor of ~22G elements: valid by the format's limits, not decodable here
        t = next(t for t in m["tensors"] if t["nnz"] == 0)
        t["shape"] = [t["shape"][0], 1_066_364_617]

    path = _with_manifest_edit(VECTORS / "v1_0_ternary_golomb.cpeft.safetensors", tmp_path / "huge.safetensors", huge)
    with pytest.raises(cf.LimitExceeded, match="over this reader's budget"):
        cf.verify(path)
    # with a budget larger than the machine, a failed allocation is the same typed error
    codec = cf.codecs.get_codec("ternary")

    def fail(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(type(codec), "decode", fail)
    with pytest.raises(cf.LimitExceeded, match="can allocate"):
        cf.load(path, budget=cf.Budget(decoded_bytes=1 << 62))
