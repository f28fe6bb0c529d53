"""Fidelity of compressed adapters: the Gram-matrix error of LoRA products against dense algebra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import compeft_format as cf
from compeft_format.fidelity import compare_task_vectors, pair_error
from compeft_format.peft_layout import lora_pairs


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


def test_fit_pairs_factors_named_with_their_adapter_and_convolution_factors():
    """``lora_A.default.weight`` keys (a model's own state dict) and Conv2d LoRA factors
    (A: r x in x k x k, B: out x r x 1 x 1) are balanced and refitted like linear ones."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 40, 1))
    pm = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))
    with torch.no_grad():  # B's entries much smaller than A's, as after training from B = 0
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    sd = get_peft_model_state_dict(pm)
    assert {tuple(v.shape) for k, v in sd.items() if "lora_A" in k} == {(4, 8, 3, 3), (4, 16, 1, 1)}
    named = {k.replace(".weight", ".default.weight"): v for k, v in sd.items()}
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["0", "2"]}
    results = {}
    for label, tensors in (("plain", sd), ("named", named)):
        fit = cf.compress(tensors, density=0.2, peft_config=cfg)
        paper = cf.compress(tensors, density=0.2, peft_config=cfg, method="paper")
        fid = cf.measure_fidelity(tensors, fit)
        assert [m.kind for m in fid.modules] == ["lora", "lora"] and fid.emptied == []
        assert cf.measure_fidelity(tensors, paper).emptied  # the paper's global top-k empties every B
        # the product of the decoded factors is what the fidelity measures
        dec = {k: v.double() for k, v in fit.state_dict(torch.float32).items()}
        by = {m.name: m for m in fid.modules}
        for module, a_key, b_key in lora_pairs(tensors):
            r = tensors[a_key].shape[0]
            prod = tensors[b_key].double().reshape(-1, r) @ tensors[a_key].double().reshape(r, -1)
            hat = dec[b_key].reshape(-1, r) @ dec[a_key].reshape(r, -1)
            assert by[module].error == pytest.approx(2 * float((prod - hat).norm()), rel=1e-4)
        results[label] = fid.relative_error
    assert results["plain"] == pytest.approx(results["named"], rel=1e-9) and results["plain"] < 0.9
