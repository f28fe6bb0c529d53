"""Base-model bindings: fingerprints of models, state dicts and (sharded) checkpoints agree; one
check names both sides; bindings round-trip through files, including those of compressed bases."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import compeft_format as cf
from compeft_format import binding
from compeft_format import constants as C

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)


def tiny(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**CFG.to_dict(), **kw})).eval()


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
@pytest.mark.parametrize("algorithm", [binding.AS_STORED, binding.FLOAT32])
def test_model_and_its_saved_checkpoint_have_one_fingerprint(tmp_path, shard, algorithm):
    """Tied embeddings are stored once in a checkpoint and left out once in memory; shards are one
    set of tensors."""
    model = tiny()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kw)
    if shard:
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
        assert (tmp_path / "model.safetensors.index.json").is_file()
    fp = cf.fingerprint(model, algorithm)
    assert fp.algorithm == algorithm and len(fp.value) == 64
    assert cf.fingerprint(tmp_path, algorithm) == fp
    assert "lm_head.weight" not in binding.model_state_dict(model)
    assert cf.fingerprint(tiny(seed=1), algorithm) != fp


def test_fingerprint_of_a_single_safetensors_file_and_of_a_state_dict(tmp_path):
    sd = {"b": torch.randn(3, dtype=torch.float16), "a": torch.arange(4), "m": torch.tensor([True, False])}
    save_file(sd, str(tmp_path / "w.safetensors"))
    assert cf.fingerprint(tmp_path / "w.safetensors") == cf.fingerprint(sd) == cf.fingerprint(tmp_path)
    sd["a"][0] = 9
    assert cf.fingerprint(sd) != cf.fingerprint(tmp_path)


def test_float32_fingerprint_recognises_a_copy_in_another_float_dtype(tmp_path):
    bf16 = tiny().to(torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    fp32 = LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert next(fp32.parameters()).dtype == torch.float32
    assert cf.fingerprint(fp32, binding.FLOAT32) == cf.fingerprint(tmp_path / "bf16", binding.FLOAT32)
    assert cf.fingerprint(fp32, binding.AS_STORED) != cf.fingerprint(tmp_path / "bf16", binding.AS_STORED)
    # a float16 copy of float32 weights rounds them: another base
    assert cf.fingerprint(tiny().half(), binding.FLOAT32) != cf.fingerprint(tiny(), binding.FLOAT32)


def test_fingerprint_is_unchanged_by_peft_wrapping_with_trainable_tokens():
    from peft import LoraConfig, get_peft_model

    model = tiny()
    fp = cf.fingerprint(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                               trainable_token_indices={"embed_tokens": [1, 2]}))
    assert any("token_adapter" in k for k in wrapped.state_dict())
    assert cf.fingerprint(wrapped) == fp


def test_unknown_algorithm_and_unreadable_checkpoints_are_typed(tmp_path):
    with pytest.raises(cf.InvalidArgument):
        cf.fingerprint({"w": torch.ones(2)}, "md5")
    with pytest.raises(cf.FileNotFound):
        cf.fingerprint(tmp_path / "missing")
    with pytest.raises(cf.InputError, match="no safetensors checkpoint"):
        cf.fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(cf.TruncatedFile):
        cf.fingerprint(tmp_path)
    with pytest.raises(cf.InvalidArgument):
        cf.fingerprint(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("weight_map, message", [
    ({"a": "../outside.safetensors"}, "not a file beside it"),
    ({"a": "one.safetensors", "b": "one.safetensors"}, "disagree"),
    ({"a": "two.safetensors"}, "disagree"),
])
def test_sharded_index_must_match_its_shards(tmp_path, weight_map, message):
    save_file({"a": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "two.safetensors"))
    (tmp_path.parent / "outside.safetensors").write_bytes(b"")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(cf.InputError, match=message):
        cf.fingerprint(tmp_path)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "two.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "one.safetensors"}, "other": {"a": "two.safetensors"}}))
    cf.fingerprint(tmp_path)  # the index names one shard: the other file is not part of the checkpoint
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "one.safetensors", "x": "two.safetensors"}}))
    with pytest.raises(cf.InputError, match="stored in both"):
        cf.fingerprint(tmp_path)


def test_check_names_both_sides():
    model = tiny()
    recorded = cf.BaseBinding(id="org/tiny", revision="r1", fingerprint=cf.fingerprint(model))
    binding.check(recorded, model)  # the weights themselves
    binding.check(recorded, cf.BaseBinding(id="org/tiny"))  # a claim of the id only
    other = tiny(seed=3)
    with pytest.raises(cf.BaseMismatch, match=r"made for org/tiny@r1 \(fingerprint sha256-state-dict-v1 [0-9a-f]{16}\)"
                                              r", not the weights given \(fingerprint .*fingerprint differs") as e:
        binding.check(recorded, other)
    assert e.value.expected == recorded and e.value.actual.fingerprint == cf.fingerprint(other)
    assert isinstance(e.value, ValueError) and e.value.code == C.E_BASE_MISMATCH
    with pytest.raises(cf.BaseMismatch, match="id differs"):
        binding.check(recorded, cf.BaseBinding(id="org/other"))
    with pytest.raises(cf.BaseMismatch, match="sha256-state-dict-v1, the one given sha256-state-dict-f32-v1"):
        binding.check(recorded, cf.BaseBinding(fingerprint=cf.fingerprint(model, binding.FLOAT32)))


def test_require_asks_for_what_the_candidate_gives():
    unbound = cf.BaseBinding()
    binding.check(unbound, tiny())  # nothing recorded, nothing to compare
    binding.check(unbound, cf.BaseBinding(id="org/tiny"))
    with pytest.raises(cf.BaseMismatch, match="records no fingerprint"):
        binding.check(unbound, tiny(), require=True)
    with pytest.raises(cf.BaseMismatch, match="records no id"):
        binding.check(unbound, cf.BaseBinding(id="org/tiny"), require=True)
    unknown = cf.BaseBinding(fingerprint=cf.Fingerprint("sha512-future", "ab"))
    with pytest.raises(cf.BaseMismatch, match="unknown to this library"):
        binding.check(unknown, tiny())


def test_binding_json_round_trip_and_unbound_form():
    assert cf.BaseBinding().to_json() == {"id": None, "revision": None, "fingerprint": None}
    full = cf.BaseBinding(id="org/tiny-int4", revision="v2", fingerprint=cf.Fingerprint(binding.FLOAT32, "a" * 64),
                          derived_from=cf.ModelRef(id="org/tiny", fingerprint=cf.Fingerprint(binding.AS_STORED,
                                                                                             "b" * 64)),
                          recipe={"name": "int4:g128", "library": "torchao", "params": {"group_size": 128}})
    assert cf.BaseBinding.from_json(json.loads(json.dumps(full.to_json()))) == full
    assert "derived from org/tiny (fingerprint sha256-state-dict-v1 bbbb" in full.describe()
    assert full.describe().endswith("by int4:g128")
    for bad in ({"derived_from": "x"}, {"recipe": []}, {"fingerprint": {"algorithm": 1, "value": "x"}},
                {"derived_from": {"fingerprint": {"algorithm": "a"}}}, {"id": 5}):
        with pytest.raises(cf.ManifestError):
            cf.BaseBinding.from_json(bad)


def test_a_compressed_base_binding_travels_in_the_file(tmp_path):
    """An adapter bound to a quantised base: the file records the compressed weights' fingerprint,
    the model they came from and the recipe; the base's checkpoint passes the check, the original
    does not."""
    original = tiny()
    original.save_pretrained(tmp_path / "original")
    quantised = tiny()
    with torch.no_grad():
        for p in quantised.parameters():
            p.copy_((p / 0.05).round() * 0.05)
    quantised.save_pretrained(tmp_path / "int")
    base = binding.compute(tmp_path / "int", id="org/tiny-rtn", algorithm=binding.FLOAT32,
                           derived_from=cf.ModelRef(id="org/tiny", fingerprint=cf.fingerprint(tmp_path / "original")),
                           recipe={"name": "rtn:0.05", "library": None, "library_version": None, "params": {},
                                   "calibration_sha256": None})
    sd = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4)}
    path = tmp_path / "a.cpeft.safetensors"
    cf.save(cf.compress(sd, density=0.5, base=base), path)
    m = cf.verify(path)
    assert m.base_model == base and m.base_model.derived_from is not None
    binding.check(m.base_model, quantised)
    binding.check(m.base_model, tmp_path / "int", require=True)
    with pytest.raises(cf.BaseMismatch, match="derived from org/tiny"):
        binding.check(m.base_model, tmp_path / "original", require=True)


def test_tied_weights_count_once_and_older_fingerprints_still_match():
    """Writers before format 1.2 hashed a model's whole state dict, tied tensors twice; a model
    still matches such a fingerprint, and a state dict in memory hashes as its model does."""
    import hashlib

    model = tiny()
    sd = model.state_dict()
    assert cf.fingerprint(model) == cf.fingerprint(sd) == cf.fingerprint(binding.untied(sd))
    h = hashlib.sha256()  # the pre-1.2 value, written out: every state-dict entry, in name order
    for name in sorted(sd):
        t = sd[name].contiguous()
        h.update(json.dumps({"name": name, "dtype": "float32", "shape": list(t.shape)}, separators=(",", ":"))
                 .encode() + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    legacy = cf.Fingerprint(binding.AS_STORED, h.hexdigest())
    assert legacy != cf.fingerprint(model)
    assert binding.BaseWeights(model).fingerprints(binding.AS_STORED) == [cf.fingerprint(model), legacy]
    binding.check(cf.BaseBinding(fingerprint=legacy), model)
    binding.check(cf.BaseBinding(fingerprint=legacy), sd)
    with pytest.raises(cf.BaseMismatch):
        binding.check(cf.BaseBinding(fingerprint=legacy), tiny(seed=2))
    untied_model = tiny(tie_word_embeddings=False)
    assert binding.BaseWeights(untied_model).fingerprints(binding.AS_STORED) == [cf.fingerprint(untied_model)]


def test_a_claim_is_compared_field_by_field():
    source = cf.ModelRef(id="org/tiny", fingerprint=cf.Fingerprint(binding.AS_STORED, "b" * 64))
    recorded = cf.BaseBinding(id="org/tiny-int4", derived_from=source, recipe={"name": "int4"})
    binding.check(recorded, cf.BaseBinding(derived_from=source), require=True)
    with pytest.raises(cf.BaseMismatch, match="derived from differs"):
        binding.check(recorded, cf.BaseBinding(derived_from=cf.ModelRef(id="org/other")))
    with pytest.raises(cf.BaseMismatch, match="recipe differs"):
        binding.check(recorded, cf.BaseBinding(recipe={"name": "int8"}))
    with pytest.raises(cf.BaseMismatch, match="records no derived_from"):
        binding.check(cf.BaseBinding(id="org/tiny-int4"), cf.BaseBinding(derived_from=source), require=True)


def test_base_weights_compute_each_algorithm_once(tmp_path, monkeypatch):
    tiny().save_pretrained(tmp_path)
    weights = binding.BaseWeights(tmp_path)
    recorded = cf.BaseBinding(fingerprint=cf.fingerprint(tmp_path))
    calls = []
    real = binding._digest
    monkeypatch.setattr(binding, "_digest", lambda *a: calls.append(a[2]) or real(*a))
    for _ in range(3):
        binding.check(recorded, weights)
    assert calls == [binding.AS_STORED]
    with pytest.raises(cf.FileNotFound):  # a checkpoint is looked at when named, before any download
        binding.BaseWeights(tmp_path / "missing")
