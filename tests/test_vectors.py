"""spec/vectors: every valid vector decodes to its declared digests, every invalid one is refused
with its declared code, and tools/gen_vectors.py reproduces the declarations."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors import safe_open

import compeft_format as cf
from compeft_format import constants as C
from conftest import ROOT, VECTORS

INDEX = json.loads((VECTORS / "vectors.json").read_text())


def test_index_covers_every_reader_code():
    codes = {v["code"] for v in INDEX["invalid"]}
    assert codes >= set(C.READER_ERROR_CODES) - {C.E_FILE_NOT_FOUND}
    files = {p.name for p in VECTORS.iterdir() if p.name != "vectors.json"}
    assert files == {v["file"] for v in INDEX["valid"] + INDEX["invalid"]}


@pytest.mark.parametrize("vec", INDEX["valid"], ids=lambda v: v["file"])
def test_valid_vector(vec, backend):
    path = VECTORS / vec["file"]
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()[C.META_FORMAT] == "compeft"
    cf.verify(path)
    out = cf.load(path)
    assert set(out) == set(vec["tensors"])
    for name, exp in vec["tensors"].items():
        t = out[name]
        assert list(t.shape) == exp["shape"]
        assert str(t.dtype).removeprefix("torch.") == exp["dtype"]
        assert cf.tensor_sha256(t) == exp["sha256"], name


@pytest.mark.parametrize("vec", INDEX["invalid"], ids=lambda v: v["file"])
def test_invalid_vector(vec, backend):
    with pytest.raises(cf.CompeftError) as e:
        cf.verify(VECTORS / vec["file"])
    assert e.value.code == vec["code"]


def test_generator_reproduces_declarations(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_vectors.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    regenerated = json.loads((tmp_path / "vectors.json").read_text())
    assert regenerated == INDEX
    for vec in regenerated["valid"]:
        cf.verify(tmp_path / vec["file"])


def test_lazy_reads_check_counts_before_the_tensor(backend):
    """A bit-plane with one entry too many early in a group is caught when a later tensor of the
    group is read on its own (the count of bits before it disagrees with the declared nnz)."""
    with cf.open_file(VECTORS / "bad_popcount.cpeft.safetensors") as f:
        g0 = [n for n in f.keys() if f.tensor_info(n).group == 0]
        with pytest.raises(cf.StreamCorrupt, match="disagrees with nnz"):
            f.get_tensor(g0[-1])
    with cf.open_file(VECTORS / "v1_ternary_global.cpeft.safetensors") as f:
        f.get_tensor(g0[-1])


@pytest.mark.parametrize("vec", [v for v in INDEX["valid"] + INDEX["invalid"] if "golomb" in v["file"]],
                         ids=lambda v: v["file"])
@pytest.mark.parametrize("block", [1, 3, 7])
def test_golomb_blocked_decoding(monkeypatch, vec, block):
    """Decoding in blocks of any size (blocks cut across tensors) gives the same tensors and
    refuses the same defects."""
    monkeypatch.setenv("COMPEFT_NATIVE", "0")  # blocks are the torch decoder's
    monkeypatch.setattr("compeft_format.codecs.positions.DECODE_BLOCK", block)
    if "code" in vec:
        with pytest.raises(cf.CompeftError) as e:
            cf.verify(VECTORS / vec["file"])
        assert e.value.code == vec["code"]
    else:
        cf.verify(VECTORS / vec["file"])
        for name, t in cf.load(VECTORS / vec["file"]).items():
            assert cf.tensor_sha256(t) == vec["tensors"][name]["sha256"]
