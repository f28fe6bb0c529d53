"""Applying compressed adapters to real transformers / peft models, without writing a folder."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import compeft_format as cf
from conftest import perturb_trainable

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def base_model(seed: int = 0, cfg: LlamaConfig = CFG) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def trained(peft_config, seed: int, scale: float = 0.05):
    return perturb_trainable(get_peft_model(base_model(), peft_config), seed, scale)


def compressed(tmp_path, peft_config, seed: int = 1, density: float = 0.3, name: str = "a", **kw):
    src = tmp_path / f"src_{name}"
    trained(peft_config, seed).save_pretrained(src)
    out = tmp_path / f"{name}.cpeft.safetensors"
    cf.save(cf.compress_peft(src, density=density, **kw), out)
    return out


def logits(model, ids=None) -> torch.Tensor:
    ids = torch.arange(24).reshape(2, 12) % CFG.vocab_size if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.cpu()


LORA_RICH = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                       rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}, modules_to_save=["lm_head"])
DORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, use_dora=True)
IA3 = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
#: peft saves lm_head's own weight beside its LoRA factors (save_embedding_layers="auto")
LORA_LM_HEAD = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [LORA_RICH, DORA, IA3, LORA_LM_HEAD],
                         ids=["lora-patterns-modules_to_save", "dora", "ia3", "lora-lm_head"])
def test_load_adapter_equals_peft_loading_the_decompressed_folder(tmp_path, config, device):
    path = compressed(tmp_path, config)
    dest = tmp_path / "restored"
    cf.decompress_to_peft(path, dest)
    reference = PeftModel.from_pretrained(base_model(), dest).eval()
    mine = cf.load_adapter(base_model().to(device), path, device=device)
    assert isinstance(mine, PeftModel)
    torch.testing.assert_close(logits(mine), logits(reference), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits(mine), logits(base_model()), atol=1e-4)


def test_non_factor_tensors_stay_dense(tmp_path):
    path = compressed(tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True,
                                           modules_to_save=["lm_head"]))
    m = cf.verify(path)
    enc = {t.name: m.groups[t.group].encoding for t in m.tensors}
    assert enc["base_model.model.lm_head.weight"] == "dense"
    assert all(e == "dense" for n, e in enc.items() if n.endswith("lora_magnitude_vector"))
    assert all(e == "ternary" for n, e in enc.items() if ".lora_A." in n or ".lora_B." in n)
    sd = cf.load(path)
    ref = trained(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True,
                             modules_to_save=["lm_head"]), 1)
    from peft import get_peft_model_state_dict
    orig = get_peft_model_state_dict(ref)
    assert torch.equal(sd["base_model.model.lm_head.weight"], orig["base_model.model.lm_head.weight"])


def test_several_adapters_side_by_side_switch_and_remove(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    pa = compressed(tmp_path, lora, seed=1, name="a")
    pb = compressed(tmp_path, lora, seed=2, name="b")
    only_a = logits(cf.load_adapter(base_model(), pa))
    only_b = logits(cf.load_adapter(base_model(), pb))
    both = cf.load_adapter(base_model(), pa, adapter_name="a")
    assert cf.load_adapter(both, pb, adapter_name="b") is both
    assert both.active_adapter == "b"
    torch.testing.assert_close(logits(both), only_b, rtol=0, atol=0)
    both.set_adapter("a")
    torch.testing.assert_close(logits(both), only_a, rtol=0, atol=0)
    with pytest.raises(cf.InvalidArgument):
        cf.load_adapter(both, pb, adapter_name="a")
    both.delete_adapter("a")
    assert set(both.peft_config) == {"b"}
    both.set_adapter("b")
    torch.testing.assert_close(logits(both), only_b, rtol=0, atol=0)


@pytest.mark.parametrize("config", [LORA_RICH, DORA, IA3, LORA_LM_HEAD],
                         ids=["lora-patterns-modules_to_save", "dora", "ia3", "lora-lm_head"])
def test_merge_and_unmerge(tmp_path, config):
    path = compressed(tmp_path, config)
    reference = cf.load_adapter(base_model(), path)
    model = base_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = cf.merge_adapter(model, path)
    assert repr(handle) == f"MergedAdapter(source={handle.source!r}, path={str(path)!r})"  # not every weight
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=1e-4)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    handle.unmerge()
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_merge_full_finetuning_delta(tmp_path):
    base = base_model()
    ft = base_model()
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if n.endswith(("q_proj.weight", "o_proj.weight")):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.01)
    sd_base = {k: v.clone() for k, v in base.state_dict().items()}
    sd_ft = ft.state_dict()
    changed = {k: v for k, v in sd_ft.items() if not torch.equal(v, sd_base[k])}
    ca = cf.compress(changed, density=0.2, reference={k: sd_base[k] for k in changed}, adapter_kind="full",
                     base=cf.BaseBinding(fingerprint=cf.fingerprint(base)))
    path = tmp_path / "delta.cpeft.safetensors"
    cf.save(ca, path)
    delta = cf.load(path, dtype=torch.float32)
    handle = cf.merge_adapter(base, path)
    for k in changed:
        torch.testing.assert_close(base.state_dict()[k], sd_base[k] + delta[k], rtol=0, atol=1e-7)
    handle.unmerge()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in sd_base.items())


def _unchanged(model, before):
    sd = model.state_dict()
    return set(sd) == set(before) and all(torch.equal(sd[k], v) for k, v in before.items())


def test_model_lacking_target_modules_is_refused_untouched(tmp_path):
    path = compressed(tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    small = base_model(cfg=LlamaConfig(**{**CFG.to_dict(), "num_hidden_layers": 1}))
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(cf.ModelMismatch, match=r"lacks 1 module\(s\).*model\.layers\.1\.self_attn\.q_proj") as e:
        cf.load_adapter(small, path)
    assert e.value.code == "MODEL_MISMATCH"
    with pytest.raises(cf.ModelMismatch):
        cf.merge_adapter(small, path)
    assert _unchanged(small, before) and not isinstance(small, PeftModel)


def test_shape_mismatch_is_refused(tmp_path):
    path = compressed(tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    wide = base_model(cfg=LlamaConfig(**{**CFG.to_dict(), "hidden_size": 128}))
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(cf.ModelMismatch, match="do not fit"):
        cf.load_adapter(wide, path)
    assert _unchanged(wide, before)


def test_config_that_disagrees_with_tensors(tmp_path):
    src = tmp_path / "src"
    trained(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), 1).save_pretrained(src)
    sd, cfg = cf.read_source(src)
    cfg["r"] = 16
    path = tmp_path / "bad.cpeft.safetensors"
    cf.save(cf.compress(sd, density=0.3, peft_config=cfg), path)
    with pytest.raises(cf.ConfigMismatch) as e:
        cf.load_adapter(base_model(), path)
    assert e.value.code == "CONFIG_MISMATCH"


@pytest.mark.parametrize("hostile", [{"rank_pattern": {"(a+)+b": 4}}, {"alpha_pattern": {"(": 3}},
                                     {"rank_pattern": {".*.*.*q_proj": 4}}, {"target_modules": "(.*)*x"},
                                     {"alpha_pattern": {"q" * 600: 3}},
                                     {"rank_pattern": {"([a-z_.0-9]*|b\\\\)*Z": 4}},
                                     {"rank_pattern": {"(a)\\1": 4}},
                                     {"modules_to_save": ["(.|.)*Q"]},
                                     {"layers_pattern": "(.|.)*Q", "layers_to_transform": [0]}],
                         ids=["nested", "invalid", "repeats", "target_modules", "long", "escaped-backslash",
                              "backreference", "modules_to_save", "layers_pattern"])
def test_config_patterns_that_could_hang_or_crash_are_refused(tmp_path, hostile):
    """rank_pattern / alpha_pattern keys and a string target_modules are regular expressions that
    peft and this library run on module names: a file's are checked before anything runs them."""
    import time

    src = tmp_path / "src"
    trained(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), 1).save_pretrained(src)
    sd, cfg = cf.read_source(src)
    path = tmp_path / "bad.cpeft.safetensors"
    cf.save(cf.compress(sd, density=0.3, peft_config={**cfg, **hostile}), path)
    model = base_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    with pytest.raises(cf.ConfigMismatch) as e:
        cf.load_adapter(model, path)
    assert e.value.code == "CONFIG_MISMATCH" and "pattern" in str(e.value)
    with pytest.raises(cf.ConfigMismatch):  # nor is a PEFT folder written for peft to run them
        cf.decompress_to_peft(path, tmp_path / "peft-out")
    assert not (tmp_path / "peft-out").exists()
    # the fidelity report does not run them either: it compares the products unscaled
    assert cf.measure_fidelity(sd, cf.read(path)).relative_error > 0
    assert time.perf_counter() - t0 < 5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unknown_peft_type_is_refused(tmp_path):
    path = tmp_path / "vera.cpeft.safetensors"
    cf.save(cf.compress({"base_model.model.x.vera_lambda_b": torch.randn(64)}, density=0.5, reference="zero",
                        peft_config={"peft_type": "VERA"}), path)
    with pytest.raises(cf.UnsupportedAdapter) as e:
        cf.load_adapter(base_model(), path)
    assert e.value.code == "UNSUPPORTED_ADAPTER"


def test_adapter_for_another_base_is_refused(tmp_path):
    src = tmp_path / "src"
    trained(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), 1).save_pretrained(src)
    path = tmp_path / "bound.cpeft.safetensors"
    cf.save(cf.compress_peft(src, density=0.3, base=cf.BaseBinding(id="org/tiny",
                                                                   fingerprint=cf.fingerprint(base_model(0)))), path)
    cf.load_adapter(base_model(0), path)  # the right base
    other = base_model(seed=7)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(cf.BaseMismatch, match="made for org/tiny") as e:
        cf.load_adapter(other, path)
    assert e.value.code == "BASE_MISMATCH"
    with pytest.raises(cf.BaseMismatch):
        cf.merge_adapter(other, path)
    assert _unchanged(other, before)
    cf.load_adapter(other, path, check_base=False)  # the caller may override


def test_config_leaving_out_a_module_is_refused_before_touching_the_model(tmp_path):
    src = tmp_path / "src"
    trained(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 1).save_pretrained(src)
    sd, cfg = cf.read_source(src)
    cfg["target_modules"] = ["q_proj"]
    path = tmp_path / "narrow.cpeft.safetensors"
    cf.save(cf.compress(sd, density=0.3, peft_config=cfg), path)
    model = base_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = logits(model)
    with pytest.raises(cf.ConfigMismatch, match="target_modules leave out"):
        cf.load_adapter(model, path)
    assert _unchanged(model, before) and torch.equal(logits(model), reference)
    assert not any("lora" in n for n, _ in model.named_modules())


def test_fingerprint_unchanged_by_loaded_adapters(tmp_path):
    base = base_model()
    fp = cf.fingerprint(base)
    path = compressed(tmp_path, LORA_RICH)  # modules_to_save wraps lm_head
    model = cf.load_adapter(base, path)
    assert cf.fingerprint(model) == fp


# --- quantised layers: LoRA beside them, never merged into them -------------------------------------
WIDE = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def nf4_model(folder):
    """The WIDE model as bitsandbytes NF4 on the CPU (its 4-bit weights are packed uint8 of shape (n, 1))."""
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["lm_head"])
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=q, device_map="cpu").eval()


def test_quantised_layers_receive_a_lora_and_refuse_a_merge(tmp_path):
    base_model(cfg=WIDE).save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    pm = get_peft_model(base_model(cfg=WIDE), config)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
    pm.save_pretrained(tmp_path / "src")
    path = tmp_path / "a.cpeft.safetensors"
    cf.save(cf.compress_peft(tmp_path / "src", density=0.3), path)
    cf.decompress_to_peft(path, tmp_path / "restored")

    quantised = nf4_model(tmp_path / "base")
    q_proj = quantised.model.layers[0].self_attn.q_proj
    assert tuple(q_proj.weight.shape) != (128, 128) and q_proj.in_features == q_proj.out_features == 128
    mine = cf.load_adapter(quantised, path)
    reference = PeftModel.from_pretrained(nf4_model(tmp_path / "base"), tmp_path / "restored").eval()
    assert type(mine.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith("peft.tuners.lora.bnb")
    torch.testing.assert_close(logits(mine), logits(reference), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(mine), logits(nf4_model(tmp_path / "base")), atol=1e-4)

    target = nf4_model(tmp_path / "base")
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(cf.UnsupportedModel, match=r"not plain float arrays \(quantised layers\).*Linear4bit") as e:
        cf.merge_adapter(target, path)
    assert e.value.code == "UNSUPPORTED_MODEL" and len(e.value.modules) == 2 * WIDE.num_hidden_layers
    after = target.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_peft_type_is_read_whatever_its_case(tmp_path):
    src = tmp_path / "src"
    trained(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), 1).save_pretrained(src)
    sd, cfg = cf.read_source(src)
    path = tmp_path / "lower.cpeft.safetensors"
    cf.save(cf.compress(sd, density=0.3, peft_config={**cfg, "peft_type": "lora"}), path)
    assert isinstance(cf.load_adapter(base_model(), path), PeftModel)
    weird = tmp_path / "weird.cpeft.safetensors"
    cf.save(cf.compress(sd, density=0.3, reference="zero", peft_config={**cfg, "peft_type": "lorax"}), weird)
    with pytest.raises(cf.UnsupportedAdapter):
        cf.load_adapter(base_model(), weird)


def test_merges_refuse_a_second_merge_of_one_file_and_unmerge_in_order(tmp_path):
    """Merging a file twice would add its update twice; unmerging an adapter before one merged
    later into the same weights would drop the later one's update: both are refused, and merging
    into a PeftModel is refused with what to do instead."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    paths = [compressed(tmp_path, lora, seed=s, name=f"a{s}") for s in (0, 1)]
    model = base_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = cf.merge_adapter(model, paths[0])
    with pytest.raises(cf.InvalidArgument, match="merged into this model already"):
        cf.merge_adapter(model, paths[0])
    second = cf.merge_adapter(model, paths[1])
    after_both = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(cf.InvalidArgument, match="unmerge .*a1.cpeft.safetensors first"):
        first.unmerge()
    assert all(torch.equal(v, after_both[k]) for k, v in model.state_dict().items())  # nothing changed
    second.unmerge()
    first.unmerge()
    first.unmerge()  # a second unmerge does nothing
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert cf.apply.merged_adapters(model) == []
    wrapped = cf.load_adapter(base_model(), paths[0])
    with pytest.raises(cf.UnsupportedModel, match="PeftModel"):
        cf.merge_adapter(wrapped, paths[1])


def test_dora_on_conv1d_merges_as_peft_applies_it(tmp_path):
    """GPT-2 stores its projections as Conv1D weights, (in, out): DoRA's magnitudes renormalise
    output rows, so the merge works in the (out, in) orientation."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).eval()

    pm = get_peft_model(gpt2(), LoraConfig(r=4, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True))
    perturb_trainable(pm, seed=1).save_pretrained(tmp_path / "dora")
    path = tmp_path / "dora.cpeft.safetensors"
    cf.save(cf.compress_peft(tmp_path / "dora", density=0.5), path)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        want = cf.load_adapter(gpt2(), path)(ids).logits
        model = gpt2()
        cf.merge_adapter(model, path)
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_an_adapter_of_another_peft_type_is_refused_with_what_to_do(tmp_path):
    lora = compressed(tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), name="lora")
    ia3 = compressed(tmp_path, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                     name="ia3")
    model = cf.load_adapter(base_model(), lora)
    with pytest.raises(cf.UnsupportedAdapter, match="IA3 adapter and the model holds LORA"):
        cf.load_adapter(model, ia3, adapter_name="ia3")
    assert list(model.peft_config) == ["default"]
