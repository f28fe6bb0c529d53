"""Fidelity of compressed adapters: the Gram-matrix error of LoRA products against dense algebra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import compeft_format as cf
from compeft_format.fidelity import compare_task_vectors, pair_error


def test_pair_error_matches_dense_products():
    g = np.random.default_rng(0)
    a, b = g.normal(size=(6, 50)), g.normal(size=(40, 6))
    a2, b2 = a + 0.1 * g.normal(size=a.shape), b * (g.random(b.shape) > 0.5)
    norm, err, approx = pair_error(a, b, a2, b2)
    assert norm == pytest.approx(np.linalg.norm(b @ a), rel=1e-10)
    assert err == pytest.approx(np.linalg.norm(b @ a - b2 @ a2), rel=1e-9)
    assert approx == pytest.approx(np.linalg.norm(b2 @ a2), rel=1e-10)


def test_modules_tensors_weights_and_emptied():
    g = torch.Generator().manual_seed(0)
    orig = {"m.lora_A.weight": torch.randn(2, 8, generator=g), "m.lora_B.weight": torch.randn(5, 2, generator=g),
            "n.lora_A.weight": torch.randn(2, 8, generator=g), "n.lora_B.weight": torch.randn(5, 2, generator=g),
            "v.ia3_l.weight": torch.randn(7, generator=g)}
    approx = dict(orig)
    approx["n.lora_B.weight"] = torch.zeros(5, 2)
    approx["v.ia3_l.weight"] = orig["v.ia3_l.weight"] * 0.5
    shapes = {k: tuple(v.shape) for k, v in orig.items()}
    fid = compare_task_vectors(orig, approx, shapes, {"peft_type": "LORA", "r": 2, "lora_alpha": 8})
    by = {m.name: m for m in fid.modules}
    assert [m.kind for m in fid.modules] == ["lora", "lora", "tensor"]
    assert by["m"].error == pytest.approx(0, abs=1e-9) and by["n"].relative_error == pytest.approx(1.0)
    assert by["v.ia3_l.weight"].relative_error == pytest.approx(0.5)
    assert fid.emptied == ["n"]
    # LoRA modules carry their scaling lora_alpha / r = 4
    nb = float((orig["n.lora_B.weight"].double() @ orig["n.lora_A.weight"].double()).norm())
    assert by["n"].norm == pytest.approx(4 * nb)
    total = math.sqrt(by["n"].error ** 2 + by["v.ia3_l.weight"].error ** 2)
    assert fid.relative_error == pytest.approx(total / math.sqrt(sum(m.norm ** 2 for m in fid.modules)))
    assert fid.summary() == {"relative_error": round(fid.relative_error, 6), "modules": 3, "emptied": 1}
    assert fid.worst(1)[0].name == "n"


def test_measure_fidelity_of_files_and_references(tmp_path):
    g = torch.Generator().manual_seed(1)
    ia3 = {"x.ia3_l.weight": 1 + 0.1 * torch.randn(64, generator=g)}
    ca = cf.compress(ia3, density=0.25, peft_config={"peft_type": "IA3", "target_modules": ["x"]})
    cf.save(ca, tmp_path / "i.cpeft.safetensors")
    fid = cf.measure_fidelity(ia3, cf.read(tmp_path / "i.cpeft.safetensors"))
    tau = ia3["x.ia3_l.weight"].double() - 1
    hat = cf.load(tmp_path / "i.cpeft.safetensors")["x.ia3_l.weight"].double() - 1
    assert fid.relative_error == pytest.approx(float((tau - hat).norm() / tau.norm()), rel=1e-6)
    assert ca.compression.fidelity["relative_error"] == pytest.approx(fid.relative_error, abs=1e-6)

    base = {"w": torch.randn(6, 6, generator=g)}
    ft = {"w": base["w"] + 0.01 * torch.randn(6, 6, generator=g)}
    delta = cf.compress(ft, density=0.5, reference=base, min_sparse_numel=0)
    with pytest.raises(cf.InvalidArgument, match="base_weights"):
        cf.measure_fidelity(ft, delta)
    assert 0 < cf.measure_fidelity(ft, delta, base_weights=base).relative_error < 1
    with pytest.raises(cf.InvalidArgument, match="no tensor"):
        cf.measure_fidelity({}, ca)
