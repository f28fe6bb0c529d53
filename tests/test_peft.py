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


# --- the PEFT layout: what each tensor of a real peft adapter is ------------------------------------
LAYOUT_CASES = {
    "lora": (LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
             {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "parameter", "base_layer"}),
    "dora": (LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), {"lora_A", "lora_B", "magnitude"}),
    "lora_bias": (LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True), {"lora_A", "lora_B", "lora_bias"}),
    "ia3": (IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), {"ia3"}),
    "trainable_tokens": (LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2]}),
                         {"lora_A", "lora_B", "trainable_tokens"}),
}


@pytest.mark.parametrize("name", LAYOUT_CASES)
def test_layout_names_every_tensor_of_real_peft_adapters(name):
    from peft import get_peft_model_state_dict

    from compeft_format import peft_layout

    config, roles = LAYOUT_CASES[name]
    model = base_model()
    pm = get_peft_model(model, config)
    sd = get_peft_model_state_dict(pm)
    parsed = {k: peft_layout.parse_key(k) for k in sd}
    assert {kr.role.name for kr in parsed.values()} == roles
    params = dict(base_model().named_parameters())
    for key, kr in parsed.items():
        assert kr.adapter is None and kr.role.name != "unknown", key
        if kr.role.apply == "parameter":  # full weights name a parameter of the base model, of its shape
            assert tuple(params[kr.parameter].shape) == tuple(sd[key].shape), key
        else:
            assert kr.module in dict(model.named_modules()), key
        # only LoRA and (IA)3 factors are task vectors; a compressed adapter keeps the rest dense
        assert kr.role.sparsifiable == (kr.role.name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                                                         "ia3")), key
    ca = cf.compress(pm, density=0.3)
    for key, kr in parsed.items():
        assert (ca.tensors[key].encoding == "ternary") == (kr.role.sparsifiable and ca.tensors[key].numel >= 32), key


def test_layout_of_trained_biases():
    from peft import get_peft_model_state_dict

    from compeft_format import peft_layout

    biased = LlamaConfig(**{**CFG.to_dict(), "attention_bias": True})
    torch.manual_seed(0)
    pm = get_peft_model(LlamaForCausalLM(biased), LoraConfig(r=2, target_modules=["q_proj"], bias="all"))
    sd = get_peft_model_state_dict(pm)
    parsed = {k: peft_layout.parse_key(k) for k in sd}
    assert {kr.role.name for kr in parsed.values()} == {"lora_A", "lora_B", "base_layer", "bias"}
    params = dict(LlamaForCausalLM(biased).named_parameters())
    for key, kr in parsed.items():
        if kr.role.apply == "parameter":
            assert tuple(params[kr.parameter].shape) == tuple(sd[key].shape), key
            assert kr.parameter.endswith(".bias") and ".base_layer." not in kr.parameter, key


def test_layout_of_a_live_model_state_dict():
    from compeft_format import peft_layout

    kr = peft_layout.parse_key("model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert (kr.module, kr.role.name, kr.adapter) == ("model.layers.0.self_attn.q_proj", "lora_A", "default")
    for key in ("base_model.model.x.vera_lambda_b", "base_model.model.x.hada_w1_a", "base_model.model.x.oft_R.weight"):
        assert peft_layout.parse_key(key).role.name == "unknown", key


def _tuners():
    import peft

    return {
        "lora+modules_to_save+trainable_tokens": LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                            trainable_token_indices={"embed_tokens": [1, 2]}),
        "lora on embeddings": LoraConfig(r=2, target_modules=["embed_tokens", "v_proj"]),
        "dora": LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "vera": peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        "oft": peft.OFTConfig(oft_block_size=4, r=0, target_modules=["q_proj"]),
        "boft": peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"]),
        "hra": peft.HRAConfig(r=2, target_modules=["q_proj"]),
        "ln_tuning": peft.LNTuningConfig(target_modules=["input_layernorm"]),
        "loha": peft.LoHaConfig(r=2, target_modules=["q_proj"]),
        "lokr": peft.LoKrConfig(r=2, target_modules=["q_proj"]),
        "fourierft": peft.FourierFTConfig(target_modules=["q_proj"], n_frequency=10),
        "adalora": peft.AdaLoraConfig(r=2, target_modules=["q_proj"], total_step=10),
    }


@pytest.mark.parametrize("name", list(_tuners()))
def test_base_weights_of_a_model_holding_any_peft_adapter(name):
    """peft's own layers say which tensors are theirs: every kind of adapter leaves the base model's
    tensors and names, and so its fingerprint, as they were."""
    from compeft_format import peft_layout

    model = base_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = cf.fingerprint(model)
    wrapped = get_peft_model(model, _tuners()[name])
    assert set(wrapped.state_dict()) - {f"base_model.model.{k}" for k in before}, "peft added nothing"
    after = peft_layout.base_state_dict(wrapped)
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert cf.fingerprint(wrapped) == fp


def test_compress_takes_a_peft_model_and_peft_config_objects(tmp_path, ids):
    """The three ways in give one file: a PeftModel, its state dict with the LoraConfig object
    (whose target_modules is a set), and the folder save_pretrained wrote."""
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    pm = get_peft_model(base_model(), lcfg)
    perturb_trainables(pm, 0.05)
    assert isinstance(pm.peft_config["default"].target_modules, set)
    pm.save_pretrained(tmp_path / "src")
    from peft import get_peft_model_state_dict

    made = {
        "model": cf.compress(pm, density=0.2, created_at="2026-01-01T00:00:00Z"),
        "objects": cf.compress(get_peft_model_state_dict(pm), density=0.2, peft_config=pm.peft_config["default"],
                               created_at="2026-01-01T00:00:00Z"),
        "folder": cf.compress_peft(tmp_path / "src", density=0.2, created_at="2026-01-01T00:00:00Z", source=None,
                                   base=cf.BaseBinding()),
    }
    manifests = {}
    for way, ca in made.items():
        path = tmp_path / f"{way}.cpeft.safetensors"
        cf.save(ca, path)
        manifests[way] = cf.verify(path)
    assert manifests["model"].adapter.peft_config["target_modules"] == ["q_proj", "v_proj"]
    assert manifests["model"].adapter.peft_config["peft_type"] == "LORA"
    assert manifests["model"].adapter.peft_config == manifests["objects"].adapter.peft_config
    for way in ("objects", "folder"):
        assert [g.to_dict() for g in manifests[way].groups] == [g.to_dict() for g in manifests["model"].groups], way
    cf.decompress_to_peft(tmp_path / "model.cpeft.safetensors", tmp_path / "restored")
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "restored").eval()
    direct = cf.load_adapter(base_model(), tmp_path / "model.cpeft.safetensors")
    torch.testing.assert_close(logits(reloaded, ids), logits(direct, ids), rtol=1e-6, atol=1e-6)
    with pytest.raises(cf.InvalidArgument):
        cf.compress(base_model(), density=0.2)
    with pytest.raises(cf.InvalidArgument, match="JSON cannot hold"):
        cf.compress(get_peft_model_state_dict(pm), peft_config={"peft_type": "LORA", "x": object()})
