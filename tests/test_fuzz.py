"""Random damage to valid files: the reader either accepts the file or raises a CompeftError,
never another exception."""

from __future__ import annotations

import json
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

import compeft_format as cf
from compeft_format import constants as C
from compeft_format.integrity import sha256_hex
from compeft_format.manifest import decode_manifest_text, encode_manifest_text
from conftest import VECTORS

FILES = sorted(VECTORS.glob("v1_*.safetensors"))


def check(path) -> None:
    try:
        cf.verify(path)
    except cf.CompeftError:
        pass


@settings(max_examples=300)
@given(which=st.integers(0, len(FILES) - 1), edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                                          min_size=1, max_size=4))
def test_byte_damage(tmp_path_factory, backend, which, edits):
    data = bytearray(FILES[which].read_bytes())
    for where, value in edits:
        data[min(int(where * len(data)), len(data) - 1)] = value
    path = tmp_path_factory.mktemp("fz") / "f.safetensors"
    path.write_bytes(bytes(data))
    check(path)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                    st.text(max_size=5), st.just([]), st.just({}), st.just([1, -1]))


@settings(max_examples=300)
@given(which=st.integers(0, len(FILES) - 1), path_seed=st.integers(0, 10**6), value=scalars)
def test_manifest_damage_with_valid_digest(tmp_path_factory, backend, which, path_seed, value):
    """Replace one value anywhere in the manifest (and fix its digest, as an attacker could)."""
    raw = FILES[which].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header["__metadata__"]
    manifest = json.loads(decode_manifest_text(meta[C.META_MANIFEST], meta[C.META_MANIFEST_ENCODING]))
    slots = []

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            slots.append((node, k))
            walk(v)

    walk(manifest)
    node, key = slots[path_seed % len(slots)]
    node[key] = value
    text = json.dumps(manifest)
    meta[C.META_MANIFEST] = encode_manifest_text(text, meta[C.META_MANIFEST_ENCODING])
    meta[C.META_MANIFEST_SHA256] = sha256_hex(text.encode("utf-8", "surrogatepass"))
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    path = tmp_path_factory.mktemp("fz") / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    check(path)
