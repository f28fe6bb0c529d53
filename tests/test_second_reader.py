import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
