"""Real peft and transformers: compress a saved PEFT adapter, decompress it, load it with
``PeftModel.from_pretrained`` and compare outputs with weights merged by hand from the decoded tensors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import compeft_format as cf

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CFG).eval()


def perturb_trainables(model, scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_key(module_path: str, kind: str) -> str:
    suffix = "" if kind == "ia3_l" else ".weight"  # peft saves (IA)3 vectors without ".weight"
    return f"base_model.model.{module_path}.{kind}{suffix}"


@pytest.fixture
def ids():
    return torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))


def test_lora_round_trip_through_peft(tmp_path, ids):
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    pm = get_peft_model(base_model(), lcfg)
    perturb_trainables(pm, 0.05)
    src = tmp_path / "lora"
    pm.save_pretrained(src)

    out = tmp_path / "lora.cpeft.safetensors"
    ca = cf.compress_peft(src, density=0.2, alpha=1.0)
    assert ca.adapter.kind == "lora" and ca.compression.reference == "zero"
    cf.save(ca, out)
    dest = tmp_path / "restored"
    cf.decompress_to_peft(out, dest)
    assert json.loads((dest / "adapter_config.json").read_text())["r"] == 4

    reloaded = PeftModel.from_pretrained(base_model(), dest).eval()
    decoded = cf.load(out, dtype=torch.float32)

    # merge by hand: W + (alpha / r) * B @ A for every targeted projection
    merged = base_model()
    sd = merged.state_dict()
    n_modules = 0
    for name in list(sd):
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            path = name.removesuffix(".weight")
            a, b = decoded[peft_key(path, "lora_A")], decoded[peft_key(path, "lora_B")]
            sd[name] = sd[name] + (8 / 4) * (b @ a)
            n_modules += 1
    assert n_modules == 2 * CFG.num_hidden_layers
    merged.load_state_dict(sd)
    torch.testing.assert_close(logits(reloaded, ids), logits(merged, ids), rtol=1e-5, atol=1e-5)
    # and the compressed adapter does change the model
    assert not torch.allclose(logits(reloaded, ids), logits(base_model(), ids), atol=1e-4)


def test_ia3_round_trip_through_peft(tmp_path, ids):
    icfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    pm = get_peft_model(base_model(), icfg)
    perturb_trainables(pm, 0.2)
    src = tmp_path / "ia3"
    pm.save_pretrained(src)

    out = tmp_path / "ia3.cpeft.safetensors"
    ca = cf.compress_peft(src, density=0.3, alpha=1.0)
    assert ca.adapter.kind == "ia3" and ca.compression.reference == "ones"
    cf.save(ca, out)
    dest = tmp_path / "restored"
    cf.decompress_to_peft(out, dest)
    reloaded = PeftModel.from_pretrained(base_model(), dest).eval()
    decoded = cf.load(out, dtype=torch.float32)
    # untouched entries decode to exactly 1 (the (IA)3 identity)
    vec = decoded[peft_key("model.layers.0.self_attn.k_proj", "ia3_l")]
    assert int((vec != 1.0).sum()) == ca.tensors[peft_key("model.layers.0.self_attn.k_proj", "ia3_l")].nnz

    merged = base_model()
    sd = merged.state_dict()
    for name in list(sd):
        if name.endswith(("k_proj.weight", "v_proj.weight", "down_proj.weight")):
            sd[name] = sd[name] * decoded[peft_key(name.removesuffix(".weight"), "ia3_l")]
    merged.load_state_dict(sd)
    torch.testing.assert_close(logits(reloaded, ids), logits(merged, ids), rtol=1e-5, atol=1e-5)


def test_legacy_bin_adapter_loads_weights_only(tmp_path):
    lcfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    pm = get_peft_model(base_model(), lcfg)
    perturb_trainables(pm, 0.05)
    src = tmp_path / "legacy"
    pm.save_pretrained(src, safe_serialization=False)
    assert (src / "adapter_model.bin").is_file()
    ca = cf.compress_peft(src, density=0.5)
    assert len(ca.tensors) == 2 * CFG.num_hidden_layers
