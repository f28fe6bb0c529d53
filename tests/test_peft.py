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


def round_trip(tmp_path, peft_config, perturb: float, density: float):
    """Train-like perturbation, save_pretrained, compress, decompress, reload with peft.

    Returns (compressed adapter, reloaded PeftModel, decoded float32 tensors)."""
    pm = get_peft_model(base_model(), peft_config)
    perturb_trainables(pm, perturb)
    src = tmp_path / "src"
    pm.save_pretrained(src)
    out = tmp_path / "a.cpeft.safetensors"
    ca = cf.compress_peft(src, density=density, alpha=1.0)
    cf.save(ca, out)
    dest = tmp_path / "restored"
    cf.decompress_to_peft(out, dest)
    assert json.loads((dest / "adapter_config.json").read_text())["peft_type"] == peft_config.peft_type.value
    reloaded = PeftModel.from_pretrained(base_model(), dest).eval()
    return ca, reloaded, cf.load(out, dtype=torch.float32)


def merged_model(edit) -> LlamaForCausalLM:
    """The base model with ``edit(name, weight) -> weight`` applied to its state dict."""
    m = base_model()
    sd = m.state_dict()
    m.load_state_dict({k: edit(k, v) for k, v in sd.items()})
    return m


def test_lora_round_trip_through_peft(tmp_path, ids):
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ca, reloaded, decoded = round_trip(tmp_path, lcfg, 0.05, 0.2)
    assert ca.adapter.kind == "lora" and ca.compression.reference == "zero"
    touched = []

    def edit(name, w):  # merge by hand: W + (alpha / r) * B @ A for every targeted projection
        if not name.endswith(("q_proj.weight", "v_proj.weight")):
            return w
        path = name.removesuffix(".weight")
        touched.append(name)
        return w + (8 / 4) * (decoded[peft_key(path, "lora_B")] @ decoded[peft_key(path, "lora_A")])

    merged = merged_model(edit)
    assert len(touched) == 2 * CFG.num_hidden_layers
    torch.testing.assert_close(logits(reloaded, ids), logits(merged, ids), rtol=1e-5, atol=1e-5)
    # and the compressed adapter does change the model
    assert not torch.allclose(logits(reloaded, ids), logits(base_model(), ids), atol=1e-4)


def test_ia3_round_trip_through_peft(tmp_path, ids):
    icfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    ca, reloaded, decoded = round_trip(tmp_path, icfg, 0.2, 0.3)
    assert ca.adapter.kind == "ia3" and ca.compression.reference == "ones"
    # untouched entries decode to exactly 1 (the (IA)3 identity)
    key = peft_key("model.layers.0.self_attn.k_proj", "ia3_l")
    assert int((decoded[key] != 1.0).sum()) == ca.tensors[key].nnz > 0

    def edit(name, w):  # (IA)3 scales rows (k, v) or columns (down_proj, feed-forward) of W
        if name.endswith(("k_proj.weight", "v_proj.weight", "down_proj.weight")):
            return w * decoded[peft_key(name.removesuffix(".weight"), "ia3_l")]
        return w

    torch.testing.assert_close(logits(reloaded, ids), logits(merged_model(edit), ids), rtol=1e-5, atol=1e-5)


def test_legacy_bin_adapter_loads_weights_only(tmp_path):
    lcfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    pm = get_peft_model(base_model(), lcfg)
    perturb_trainables(pm, 0.05)
    src = tmp_path / "legacy"
    pm.save_pretrained(src, safe_serialization=False)
    assert (src / "adapter_model.bin").is_file()
    ca = cf.compress_peft(src, density=0.5)
    assert len(ca.tensors) == 2 * CFG.num_hidden_layers
