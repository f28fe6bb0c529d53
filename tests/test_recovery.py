"""Recovery modules (spec 3.6) on real transformers and peft models, recovery artifacts and
artifacts that require them: written, read by both readers, applied, refused."""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import compeft_format as cf
from compeft_format import constants as C
from compeft_format.cli import main
from compeft_format.peft_layout import base_state_dict
from compeft_format.recovery import RecoveryConfig, RecoveryModule, add_recovery, get_recovery
from compeft_format.report import format_report
from conftest import VECTORS, bits_equal

sys.path.insert(0, str(Path(__file__).resolve().parent))
import second_reader  # noqa: E402

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
IDS = torch.arange(24).reshape(2, 12) % CFG.vocab_size
TARGETS = ("q_proj", "v_proj", "down_proj")
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def base_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(CFG).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb(params, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def trained_recovery(model, seed: int = 1, r: int = 4, alpha: float = 8.0, targets=TARGETS):
    handle = add_recovery(model, RecoveryConfig(r=r, alpha=alpha, target_modules=targets), seed=seed)
    perturb(handle.modules.parameters(), seed)
    return handle


def gelu_erf(z: torch.Tensor) -> torch.Tensor:
    return z / 2 * (1 + torch.erf(z / math.sqrt(2)))


# --- the modules --------------------------------------------------------------------------------
def test_recovery_starts_as_an_exact_no_op():
    model = base_model()
    before, reference = snapshot(model), logits(model)
    handle = add_recovery(model, RecoveryConfig(r=4, alpha=8.0, target_modules=TARGETS), seed=3)
    assert len(handle.config.target_modules) == 6 and "model.layers.1.mlp.down_proj" in handle.config.target_modules
    assert bits_equal(logits(model), reference)
    m = handle.module("model.layers.0.self_attn.q_proj")
    assert m.A1.shape == (4, 64) and m.A2.shape == (64, 4)
    assert not torch.any(m.A2) and bool(torch.all(m.A1 != 0))
    assert float(m.A1.detach().abs().max()) <= 1 / math.sqrt(64)  # Kaiming-uniform, a = sqrt(5): bound 1/sqrt(in)
    assert handle.module("model.layers.0.mlp.down_proj").A1.shape == (4, 112)
    # a seed gives the same initialisation
    again = add_recovery(base_model(), RecoveryConfig(r=4, alpha=8.0, target_modules=TARGETS), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(handle.state_dict().values(), again.state_dict().values(), strict=True))
    # the model holds them: parameters(), .to() and state_dict() see them; the base is unchanged
    rec = {id(p) for p in handle.modules.parameters()}
    assert rec <= {id(p) for p in model.parameters()} and len(rec) == 12
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model.to(torch.float64)
    assert m.A1.dtype == torch.float64


def test_forward_is_the_formula_in_the_input_dtype():
    torch.manual_seed(0)
    m = RecoveryModule(8, 5, r=3, alpha=6.0)
    perturb(m.parameters(), 1, scale=1.0)
    x = torch.randn(2, 7, 8)
    x64, a1, a2 = x.double(), m.A1.detach().double(), m.A2.detach().double()
    expected = gelu_erf(x64 @ a1.T) @ a2.T * (6.0 / 3)
    torch.testing.assert_close(m(x).double(), expected, rtol=1e-5, atol=1e-5)
    m64 = RecoveryModule(8, 5, r=3, alpha=6.0, dtype=torch.float64)
    m64.load_state_dict(m.state_dict())
    torch.testing.assert_close(m64(x64), expected, rtol=1e-12, atol=1e-12)  # the formula, in binary64
    half = m(x.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), expected, rtol=2e-3, atol=2e-3)
    # beside a layer: the layer's output (bias included) plus the bypass of its input
    model = base_model()
    handle = trained_recovery(model)
    layer, rm = model.model.layers[0].self_attn.q_proj, handle.module("model.layers.0.self_attn.q_proj")
    h = torch.randn(3, 64)
    with torch.no_grad():
        got = layer(h).double()
    want = h.double() @ layer.weight.double().T + gelu_erf(h.double() @ rm.A1.double().T) @ rm.A2.double().T * 2.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_factors_and_not_the_base():
    model = base_model()
    model.requires_grad_(False)
    handle = add_recovery(model, RecoveryConfig(r=4, alpha=8.0, target_modules=TARGETS), seed=0)
    before = snapshot(model)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    m = handle.module("model.layers.1.self_attn.v_proj")
    assert m.A2.grad is not None and float(m.A2.grad.abs().sum()) > 0
    assert m.A1.grad is not None and not torch.any(m.A1.grad)  # A2 = 0: nothing reaches A1 yet
    assert all(p.grad is None for n, p in model.named_parameters() if "cpet_recovery" not in n)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    opt.step()
    opt.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert float(m.A1.grad.abs().sum()) > 0  # after one step A2 is not zero: A1 learns too
    after = model.state_dict()
    base_keys = [k for k in before if not k.startswith("cpet_recovery.")]
    assert base_keys and all(torch.equal(after[k], before[k]) for k in base_keys)
    assert not torch.equal(after["cpet_recovery.model__layers__1__self_attn__v_proj.A2"],
                           before["cpet_recovery.model__layers__1__self_attn__v_proj.A2"])


def test_remove_restores_the_model_bit_for_bit():
    model = base_model()
    before, reference = snapshot(model), logits(model)
    modules = [n for n, _ in model.named_modules()]
    handle = trained_recovery(model)
    assert not bits_equal(logits(model), reference)
    get_recovery(model).remove()
    assert get_recovery(model) is None and not hasattr(model, "cpet_recovery")
    assert [n for n, _ in model.named_modules()] == modules
    after = model.state_dict()
    assert list(after) == list(before) and all(bits_equal(after[k], v) for k, v in before.items())
    assert all(not m._forward_hooks for m in model.modules())
    assert bits_equal(logits(model), reference)
    handle.remove()  # twice: nothing more to do
    add_recovery(model, RecoveryConfig(r=2, target_modules=("q_proj",)))  # and again possible


def test_recovery_is_not_base_weights():
    model = base_model()
    plain = {alg: cf.fingerprint(model, alg) for alg in (cf.binding.AS_STORED, cf.binding.FLOAT32)}
    plain_sd = base_state_dict(model)
    trained_recovery(model)
    assert {alg: cf.fingerprint(model, alg) for alg in plain} == plain
    held = base_state_dict(model)
    assert list(held) == list(plain_sd) and all(torch.equal(held[k], plain_sd[k]) for k in plain_sd)
    peft = get_peft_model(model, LORA)  # recovery under LoRA: the base is still the same weights
    assert cf.fingerprint(peft) == plain[cf.binding.AS_STORED]
    assert set(base_state_dict(peft)) == set(plain_sd)


def test_targets_and_refusals():
    model = base_model()
    with pytest.raises(cf.ModelMismatch, match="no module 'model.layers.9.mlp.up_proj'") as e:
        add_recovery(model, RecoveryConfig(target_modules=("model.layers.9.mlp.up_proj",)))
    assert e.value.code == C.E_MODEL_MISMATCH
    with pytest.raises(cf.ModelMismatch, match="not a linear layer"):
        add_recovery(model, RecoveryConfig(target_modules=("mlp",)))
    pm = get_peft_model(base_model(), LORA)
    with pytest.raises(cf.ModelMismatch, match="a layer an adapter added"):
        add_recovery(pm, RecoveryConfig(target_modules=("model.layers.0.self_attn.q_proj.lora_A.default",)))
    with pytest.raises(cf.InvalidArgument, match="activation"):
        add_recovery(model, RecoveryConfig(activation="relu", target_modules=("q_proj",)))
    with pytest.raises(cf.InvalidArgument, match="no target_modules"):
        add_recovery(model, RecoveryConfig())
    for bad in ({"r": 0}, {"r": 2.0}, {"alpha": math.inf}, {"target_modules": "q_proj"}):
        with pytest.raises(cf.InvalidArgument):
            RecoveryConfig(**bad)
    assert not hasattr(model, "cpet_recovery")  # nothing was added by a refused call
    add_recovery(model, RecoveryConfig(target_modules=("model.layers.0.self_attn.q_proj",)))
    with pytest.raises(cf.InvalidArgument, match="already"):
        add_recovery(model, RecoveryConfig(target_modules=("k_proj",)))


def test_state_dict_names_and_checked_loading():
    model = base_model()
    handle = trained_recovery(model, targets=("q_proj", "down_proj"))
    sd = handle.state_dict()
    assert list(sd)[:2] == ["model.layers.0.mlp.down_proj.recovery_A1.weight",
                            "model.layers.0.mlp.down_proj.recovery_A2.weight"]
    assert sd["model.layers.0.mlp.down_proj.recovery_A2.weight"].shape == (64, 4)
    fresh = add_recovery(base_model(), handle.config, init=False)
    assert not any(torch.any(t) for t in fresh.state_dict().values())
    fresh.load_state_dict(sd)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())

    def edited(**changes):
        out = dict(sd)
        out.update(changes)
        return out

    a1, a2 = "model.layers.0.self_attn.q_proj.recovery_A1.weight", "model.layers.0.self_attn.q_proj.recovery_A2.weight"
    target = add_recovery(base_model(), handle.config, init=False)
    cases = [
        (edited(**{a1: torch.zeros(5, 64), a2: torch.zeros(64, 5)}), cf.ConfigMismatch, "rank 5"),
        (edited(**{a1: torch.zeros(4, 32)}), cf.ModelMismatch, "32 inputs"),
        ({k: v for k, v in sd.items() if "q_proj" not in k or "layers.1" not in k}, cf.ConfigMismatch, "no tensors"),
        (edited(**{"model.layers.0.self_attn.k_proj.recovery_A1.weight": torch.zeros(4, 64),
                   "model.layers.0.self_attn.k_proj.recovery_A2.weight": torch.zeros(32, 4)}),
         cf.ModelMismatch, "no recovery module beside"),
        (edited(**{"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}), cf.ConfigMismatch,
         "is not <module>.recovery_A1.weight"),
        ({k: v for k, v in sd.items() if k != a2}, cf.ConfigMismatch, "only its recovery_A1"),
    ]
    for state, error, match in cases:
        with pytest.raises(error, match=match):
            target.load_state_dict(state)
        assert not any(torch.any(t) for t in target.state_dict().values())  # nothing copied


@pytest.mark.parametrize("order", ["recovery-then-lora", "lora-then-recovery"])
def test_composition_with_peft_lora(order):
    """Outputs are base + LoRA + recovery whichever comes first, LoRA trains, merges and unloads
    as before, and the recovery modules stay beside the base layers."""
    if order == "recovery-then-lora":
        model = base_model()
        handle = trained_recovery(model)
        pm = get_peft_model(model, LORA)
        handle.modules.requires_grad_(True)  # peft freezes what is not its own
    else:
        pm = get_peft_model(base_model(), LORA)
        names = tuple(f"base_model.model.{n}.base_layer" for n, _ in pm.base_model.model.named_modules()
                      if n.endswith(("q_proj", "v_proj")) and "lora" not in n and "base_layer" not in n)
        assert len(names) == 4
        handle = add_recovery(pm, RecoveryConfig(r=4, alpha=8.0, target_modules=names + ("down_proj",)), seed=1)
        perturb(handle.modules.parameters(), 1)
        assert get_recovery(pm) is not None and get_recovery(pm.base_model.model) is not None
    assert handle.config.target_modules[0] == "model.layers.0.mlp.down_proj"
    perturb([p for n, p in pm.named_parameters() if "lora_B" in n], 2)
    pm.eval()
    # one layer: its output is W x + LoRA + recovery
    wrapper = pm.base_model.model.model.layers[1].self_attn.v_proj
    rm = handle.module("model.layers.1.self_attn.v_proj")
    h = torch.randn(3, 64)
    with torch.no_grad():
        lora = wrapper.lora_B["default"](wrapper.lora_A["default"](h)) * 2.0
        want = torch.nn.functional.linear(h, wrapper.base_layer.weight) + lora + rm(h)
        torch.testing.assert_close(wrapper(h), want, rtol=1e-5, atol=1e-6)
    # a whole model: the same as the model built the other way round from the same factors
    other = base_model()
    other_handle = add_recovery(other, handle.config, init=False)
    other_handle.load_state_dict(handle.state_dict())
    other_pm = get_peft_model(other, LORA)
    other_pm.load_state_dict(pm.state_dict())
    torch.testing.assert_close(logits(pm), logits(other_pm.eval()), rtol=0, atol=0)
    # LoRA and recovery both train; the base does not
    pm.train()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("cpet_recovery" in n for n in trainable)
    base_before = {k: v.clone() for k, v in base_state_dict(pm).items()}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    moved = {n for n, p in pm.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in moved) and any("cpet_recovery" in n for n in moved)
    assert all(torch.equal(v, base_before[k]) for k, v in base_state_dict(pm).items())
    # merge and unload: the recovery modules stay, the outputs do not change
    pm.eval()
    expected = logits(pm)
    merged = pm.merge_and_unload()
    assert not isinstance(merged, PeftModel) and get_recovery(merged) is not None
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    get_recovery(merged).remove()
    assert not any(m._forward_hooks for m in merged.modules())


# --- artifacts ----------------------------------------------------------------------------------
def cpet_pair(folder: Path, base: LlamaForCausalLM, *, dense: bool = True, seed: int = 1) -> tuple[Path, Path, dict]:
    """A recovery artifact and a task LoRA that requires it, both bound to ``base``; and the
    factors they were written from."""
    folder.mkdir(parents=True, exist_ok=True)
    binding = cf.binding.compute(base, id="org/tiny-int4", derived_from=cf.ModelRef(id="org/tiny"),
                                 recipe={"name": "int4:g32", "params": {"bits": 4, "group_size": 32}})
    work = base_model()
    handle = trained_recovery(work, seed=seed)
    pm = get_peft_model(work, LORA)
    perturb([p for n, p in pm.named_parameters() if "lora_B" in n], seed + 1)
    keep = {"method": "paper", "density": 1.0, "dense_patterns": ("*",)} if dense else {"density": 0.3}
    rec = folder / "recovery.cpeft.safetensors"
    cf.save(cf.compress(handle.state_dict(), recovery=handle.config, base=binding, **keep), rec)
    task = folder / "task.cpeft.safetensors"
    training = {"method": "cpet", "steps": 10, "distill": {"lambda": 1.0}}
    cf.save(cf.compress(pm, base=binding, requires=[cf.requirements.requirement(rec)], training=training, **keep),
            task)
    factors = {"recovery": handle.state_dict(), "lora": {k: v.clone() for k, v in pm.state_dict().items()
                                                         if "lora" in k}, "config": handle.config}
    return rec, task, factors


def test_writing_recovery_and_task_artifacts(tmp_path):
    rec, task, factors = cpet_pair(tmp_path, base_model())
    m = cf.verify(rec)
    assert m.adapter.kind == "recovery" and m.adapter.peft_config is None and m.format_version == "1.4"
    assert m.adapter.recovery == factors["config"]  # r, alpha, activation and the modules
    assert all(m.groups[t.group].encoding == "dense" for t in m.tensors) and m.compression.options is None
    loaded = cf.load(rec)
    assert all(bits_equal(loaded[k], v) for k, v in factors["recovery"].items())
    t = cf.verify(task)
    assert t.requires == [cf.Requirement(kind="recovery", manifest_sha256=cf.requirements.manifest_digest(rec),
                                         name="recovery.cpeft.safetensors")]
    assert t.provenance.training == {"method": "cpet", "steps": 10, "distill": {"lambda": 1.0}}
    assert t.base_model == m.base_model and t.base_model.recipe["name"] == "int4:g32"
    # read() gives the compressed form back; saving it again gives the same manifest
    again = tmp_path / "again.cpeft.safetensors"
    cf.save(cf.read(task), again)
    assert cf.requirements.manifest_digest(again) == cf.requirements.manifest_digest(task)
    # an artifact without the 1.4 members stays a 1.3 file; with any of them it is 1.4
    plain = tmp_path / "plain.cpeft.safetensors"
    cf.save(cf.compress({"w": torch.randn(40)}, density=0.5), plain)
    assert cf.open_file(plain).metadata[C.META_VERSION] == "1.3"
    trained = tmp_path / "trained.cpeft.safetensors"
    cf.save(cf.compress({"w": torch.randn(40)}, density=0.5, training={"steps": 1}), trained)
    assert cf.open_file(trained).metadata[C.META_VERSION] == "1.4"


def test_writing_refuses_what_readers_would(tmp_path):
    model = base_model()
    handle = trained_recovery(model)
    sd = handle.state_dict()
    wrong = dict(sd, **{"model.layers.0.self_attn.q_proj.recovery_A1.weight": torch.zeros(3, 64)})
    with pytest.raises(cf.InvalidArgument, match="rank 3"):
        cf.compress(wrong, recovery=handle.config)
    with pytest.raises(cf.InvalidArgument, match="needs its configuration"):
        cf.compress(sd, adapter_kind="recovery")
    with pytest.raises(cf.InvalidArgument, match="PEFT config"):
        cf.compress(sd, recovery=handle.config, peft_config={"peft_type": "LORA", "r": 4})
    with pytest.raises(cf.InvalidArgument, match="same"):
        cf.compress(sd, recovery=RecoveryConfig(r=4, alpha=8.0, target_modules=("model.layers.0.self_attn.q_proj",)))
    with pytest.raises(cf.InvalidArgument, match="Requirement"):
        cf.compress(sd, requires=["recovery.cpeft.safetensors"])
    with pytest.raises(cf.InvalidArgument, match="64 lowercase hex"):
        cf.Requirement(kind="recovery", manifest_sha256="abc")
    with pytest.raises(cf.InvalidArgument, match="JSON cannot hold"):
        cf.compress({"w": torch.randn(40)}, training={"loss": math.nan})
    # a hand-made adapter that breaks 3.6 is not written
    ca = cf.compress(sd, recovery=handle.config)
    ca.tensors.pop("model.layers.0.self_attn.q_proj.recovery_A2.weight")
    with pytest.raises(cf.InvalidArgument, match="only its recovery_A1"):
        cf.save(ca, tmp_path / "broken.cpeft.safetensors")
    assert not (tmp_path / "broken.cpeft.safetensors").exists()


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "ternary"])
def test_load_recovery_artifact_reproduces_outputs(tmp_path, dense):
    base = base_model()
    rec, _, factors = cpet_pair(tmp_path, base, dense=dense)
    reference = base_model()
    handle = add_recovery(reference, factors["config"], init=False)
    handle.load_state_dict(factors["recovery"] if dense else cf.load(rec))
    model = base_model()
    out = cf.load_adapter(model, rec)
    assert out is model and get_recovery(model).source == cf.requirements.manifest_digest(rec)
    assert not any(p.requires_grad for p in get_recovery(model).modules.parameters())
    assert bits_equal(logits(model), logits(reference))  # dense: the trained modules exactly
    if not dense:  # ternary: the decoded factors exactly, which differ from the trained ones
        exact = base_model()
        add_recovery(exact, factors["config"], init=False).load_state_dict(factors["recovery"])
        assert not torch.equal(logits(model), logits(exact))
    with pytest.raises(cf.InvalidArgument, match="holds recovery modules already"):
        cf.load_adapter(model, rec)
    with pytest.raises(cf.UnsupportedAdapter, match="cannot be merged"):
        cf.merge_adapter(base_model(), rec)
    trainable = cf.load_adapter(base_model(), rec, is_trainable=True, dtype="bfloat16")
    params = list(get_recovery(trainable).modules.parameters())
    assert all(p.requires_grad and p.dtype == torch.bfloat16 for p in params)


def test_task_artifact_brings_its_recovery_artifact(tmp_path):
    base = base_model()
    rec, task, factors = cpet_pair(tmp_path / "run", base)
    expected_model = base_model()
    add_recovery(expected_model, factors["config"], init=False).load_state_dict(factors["recovery"])
    expected_pm = get_peft_model(expected_model, LORA)
    expected_pm.load_state_dict({**expected_pm.state_dict(), **factors["lora"]})
    expected = logits(expected_pm.eval())

    model = base_model()
    pm = cf.load_adapter(model, task)  # the recovery artifact is found beside it
    assert isinstance(pm, PeftModel) and get_recovery(pm).source == cf.requirements.manifest_digest(rec)
    assert bits_equal(logits(pm), expected)
    # a second task adapter that requires the same recovery artifact does not apply it again
    cf.load_adapter(pm, task, adapter_name="second")
    assert get_recovery(pm).source == cf.requirements.manifest_digest(rec)

    # elsewhere, named explicitly
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(task, lonely / "task.cpeft.safetensors")
    pm = cf.load_adapter(base_model(), lonely / "task.cpeft.safetensors", requires=[rec])
    assert bits_equal(logits(pm), expected)
    # a recovery file under another name beside it is found by its digest
    shutil.copy(rec, lonely / "renamed.cpeft.safetensors")
    pm = cf.load_adapter(base_model(), lonely / "task.cpeft.safetensors")
    assert bits_equal(logits(pm), expected)
    # merging the task LoRA needs the recovery modules in the model first
    with pytest.raises(cf.RequirementMissing, match="apply it first"):
        cf.merge_adapter(base_model(), task)
    held = base_model()
    cf.load_adapter(held, rec)
    cf.merge_adapter(held, task)
    torch.testing.assert_close(logits(held), expected, rtol=1e-5, atol=1e-5)


def test_missing_or_mismatched_requirements_are_refused_untouched(tmp_path):
    base = base_model()
    rec, task, _ = cpet_pair(tmp_path / "run", base)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(task, lonely / "task.cpeft.safetensors")
    model = base_model()
    before = snapshot(model)
    digest = cf.requirements.manifest_digest(rec)
    with pytest.raises(cf.RequirementMissing, match=digest) as e:
        cf.load_adapter(model, lonely / "task.cpeft.safetensors")
    assert e.value.code == "REQUIREMENT_MISSING" and e.value.manifest_sha256 == digest
    assert e.value.kind == "recovery" and e.value.name == "recovery.cpeft.safetensors"
    assert isinstance(e.value, LookupError)
    # another recovery artifact of the same name and kind: not the one required
    _, _, other = cpet_pair(tmp_path / "other", base, seed=5)
    shutil.copy(tmp_path / "other" / "recovery.cpeft.safetensors", lonely / "recovery.cpeft.safetensors")
    with pytest.raises(cf.RequirementMissing):
        cf.load_adapter(model, lonely / "task.cpeft.safetensors")
    with pytest.raises(cf.RequirementMissing):  # named explicitly, still not it
        cf.load_adapter(model, lonely / "task.cpeft.safetensors", requires=[lonely / "recovery.cpeft.safetensors"])
    # a model holding other recovery modules
    held = base_model()
    cf.load_adapter(held, lonely / "recovery.cpeft.safetensors")
    with pytest.raises(cf.InvalidArgument, match="holds recovery modules already"):
        cf.load_adapter(held, task)
    assert get_recovery(held).source == cf.requirements.manifest_digest(lonely / "recovery.cpeft.safetensors")
    assert not isinstance(model, PeftModel) and get_recovery(model) is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_wrong_base_is_refused_naming_both_fingerprints(tmp_path):
    rec, task, _ = cpet_pair(tmp_path, base_model(0))
    other = base_model(7)
    before, reference = snapshot(other), logits(other)
    for path in (rec, task):
        with pytest.raises(cf.BaseMismatch) as e:
            cf.load_adapter(other, path)
        assert e.value.code == "BASE_MISMATCH"
        recorded, found = e.value.expected.fingerprint, e.value.actual.fingerprint
        assert recorded == cf.fingerprint(base_model(0)) and found == cf.fingerprint(other)
        assert recorded.value[:16] in str(e.value) and found.value[:16] in str(e.value)
        # the task's requirement was applied first and is taken out again
        assert get_recovery(other) is None and not isinstance(other, PeftModel)
        assert list(other.state_dict()) == list(before) and bits_equal(logits(other), reference)
    with pytest.warns(UserWarning, match="check_base=False") as caught:
        pm = cf.load_adapter(other, task, check_base=False)
    assert get_recovery(pm) is not None
    (w,) = [w for w in caught if "check_base" in str(w.message)]
    assert str(rec) in str(w.message) and str(task) in str(w.message) and w.filename == __file__
    # a file that records no fingerprint has nothing to skip: no warning
    unbound = tmp_path / "unbound.cpeft.safetensors"
    cf.save(cf.compress(cf.load(rec), recovery=cf.verify(rec).adapter.recovery), unbound)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cf.load_adapter(base_model(), unbound, check_base=False)


def test_inspect_and_validate_show_recovery_and_requirements(tmp_path, capsys):
    rec, task, _ = cpet_pair(tmp_path, base_model())
    r = cf.inspect(rec)
    assert r["adapter"]["kind"] == "recovery" and r["format_version"] == "1.4"
    assert r["adapter"]["recovery"]["r"] == 4 and r["adapter"]["recovery"]["activation"] == "gelu"
    assert len(r["adapter"]["recovery"]["modules"]) == 6
    text = format_report(r)
    assert "adapter: recovery" in text and "recovery modules: 6, r=4 alpha=8.0 activation=gelu" in text
    assert main(["inspect", str(task)]) == 0
    out = capsys.readouterr().out
    assert f"requires: recovery artifact recovery.cpeft.safetensors, manifest sha256 " \
           f"{cf.requirements.manifest_digest(rec)}" in out
    assert "training: method=cpet, steps=10" in out
    assert main(["inspect", str(task), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["requires"][0]["kind"] == "recovery" and js["training"]["steps"] == 10
    bad = [VECTORS / f"bad_{n}.cpeft.safetensors" for n in ("recovery_rank", "requires_digest")]
    assert main(["validate", str(rec), str(task), *map(str, bad), "--json"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["valid"] for row in rows] == [True, True, False, False]
    assert {row.get("code") for row in rows[2:]} == {"MANIFEST_INVALID"}


# --- the vectors, and the version rule ----------------------------------------------------------
def test_vectors_requirement_is_found_by_digest():
    task = VECTORS / "v1_4_task_requires.cpeft.safetensors"
    (req,) = cf.verify(task).requires
    assert cf.requirements.find(req, folder=VECTORS) == VECTORS / "v1_4_recovery_dense.cpeft.safetensors"
    assert second_reader.read_manifest(task)[1]["requires"] == [req.to_json()]
    rec = cf.verify(VECTORS / "v1_4_recovery_ternary.cpeft.safetensors")
    assert rec.adapter.recovery.to_json() == second_reader.read_manifest(
        VECTORS / "v1_4_recovery_ternary.cpeft.safetensors")[1]["adapter"]["recovery"]
    assert rec.adapter.recovery.target_modules == ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj")


def relabelled(src: Path, dst: Path, version: str) -> Path:
    """``src`` with ``compeft.version`` set to ``version`` (the manifest and its digest unchanged)."""
    buf = src.read_bytes()
    (n,) = struct.unpack_from("<Q", buf)
    header = json.loads(buf[8:8 + n])
    header["__metadata__"][C.META_VERSION] = version
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    dst.write_bytes(struct.pack("<Q", len(head)) + head + buf[8 + n:])
    return dst


@pytest.mark.parametrize("vector", ["bad_recovery_rank", "bad_recovery_r_type", "bad_recovery_missing_config",
                                    "bad_recovery_tensor_name", "bad_requires_digest", "bad_requires_type",
                                    "v1_4_task_requires", "v1_4_recovery_dense"])
def test_members_of_1_4_are_unknown_members_in_earlier_files(tmp_path, vector):
    """A 1.3 file may hold members of those names (they were unknown members then): both readers
    read it as before, as kind other without requirements."""
    path = relabelled(VECTORS / f"{vector}.cpeft.safetensors", tmp_path / "old.cpeft.safetensors", "1.3")
    kind = "lora" if "requires" in vector else "other"  # recovery was no kind before 1.4
    m = cf.verify(path)
    assert m.adapter.kind == kind and m.adapter.recovery is None and m.requires == []
    assert m.provenance.training is None
    version, manifest = second_reader.read_manifest(path)
    assert version == "1.3" and manifest["adapter"]["kind"] == kind and manifest["requires"] == []
    assert "recovery" not in manifest["adapter"] and "training" not in manifest["provenance"]
    ours, theirs = cf.load(path), second_reader.read(path)
    assert set(ours) == set(theirs)
    assert all(cf.tensor_sha256(ours[k]) == second_reader.hashlib.sha256(theirs[k][2]).hexdigest() for k in ours)
    if vector.startswith("bad_"):  # and as 1.4 (or later) files both refuse them
        later = relabelled(path, tmp_path / "later.cpeft.safetensors", "1.7")
        with pytest.raises(cf.ManifestError):
            cf.verify(later)
        with pytest.raises(second_reader.SpecError, match="MANIFEST_INVALID"):
            second_reader.read(later)
