"""Merging adapters: task arithmetic exactly, TIES and DARE as their papers define them, into a
compressed file that loads like any other."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import compeft_format as cf
from compeft_format.cli import main
from compeft_format.merge import combine, merge
from conftest import perturb_trainable

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def base_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(CFG).eval()


def adapter(tmp_path, name: str, config, seed: int, compressed: bool = True):
    perturb_trainable(get_peft_model(base_model(), config), seed).save_pretrained(tmp_path / name)
    if not compressed:
        return tmp_path / name
    out = tmp_path / f"{name}.cpeft.safetensors"
    cf.save(cf.compress_peft(tmp_path / name, density=0.5), out)
    return out


def updates(sd: dict, config: dict) -> dict[str, torch.Tensor]:
    """Each LoRA module's update s * B @ A."""
    from compeft_format.peft_layout import lora_pairs, lora_scaling

    return {m: lora_scaling(config, m, sd[a].shape[0]) * (sd[b].float() @ sd[a].float())
            for m, a, b in lora_pairs(sd)}


def test_task_arithmetic_of_loras_is_exact(tmp_path):
    a = adapter(tmp_path, "a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 1)
    b = adapter(tmp_path, "b", LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "k_proj"], use_rslora=True), 2)
    sd, config, _ = merge([a, b], weights=[0.5, 2.0])
    got = updates(sd, config)
    ua = updates(cf.load(a, dtype=torch.float32), cf.verify(a).adapter.peft_config)
    ub = updates(cf.load(b, dtype=torch.float32), cf.verify(b).adapter.peft_config)
    assert set(got) == set(ua) | set(ub)
    for m, d in got.items():
        want = 0.5 * ua.get(m, torch.zeros_like(d)) + 2.0 * ub.get(m, torch.zeros_like(d))
        torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-6)
    assert config["r"] == 6 and config["rank_pattern"]  # q_proj has both ranks stacked, the others one


def test_the_merged_file_loads_and_applies_the_merged_update(tmp_path):
    a = adapter(tmp_path, "a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 1)
    b = adapter(tmp_path, "b", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 2)
    out = tmp_path / "m.cpeft.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(out), "--weights", "0.5,0.5", "--density", "1", "--mode",
                 "prune"]) == 0
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    merged = cf.load_adapter(base_model(), out)
    reference = base_model()
    cf.merge_adapter(reference, a, scale=0.5)
    cf.merge_adapter(reference, b, scale=0.5)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_ties_trims_elects_signs_and_averages_the_agreeing():
    t1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    t2 = torch.tensor([1.0, 2.0, -0.1, -4.0])
    # keep half of each: t1 -> [3, 0, 0, 2], t2 -> [0, 2, 0, -4]; signs + + 0 -: the agreeing mean
    got = combine([t1, t2], [1.0, 1.0], "ties", 0.5)
    assert got.tolist() == [3.0, 2.0, 0.0, -4.0]
    # weights weigh the election: element 3 is elected positive when the first weighs 3x the second
    got = combine([t1, t2], [3.0, 1.0], "ties", 0.5)
    assert got.tolist() == [3.0, 2.0, 0.0, 2.0]


def test_dare_drops_and_rescales_and_is_seeded():
    t = torch.ones(100_000)
    g = torch.Generator().manual_seed(0)
    got = combine([t], [1.0], "dare", 0.25, g)
    kept = got != 0
    assert torch.all(got[kept] == 4.0) and abs(kept.float().mean().item() - 0.25) < 0.01
    again = combine([t], [1.0], "dare", 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(got, again)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_merge_into_a_lora_of_the_given_rank(tmp_path, method):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    a, b = adapter(tmp_path, "a", lora, 1), adapter(tmp_path, "b", lora, 2, compressed=False)  # a file and a folder
    sd, config, _ = merge([a, b], method=method, density=0.5, rank=3)
    assert all(v.shape[0] == 3 for k, v in sd.items() if "lora_A" in k) and config["r"] == 3
    out = tmp_path / "m.cpeft.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(out), "--method", method, "--keep", "0.5", "--json"]) == 0
    cf.load_adapter(base_model(), out)


def test_ia3_vectors_merge_around_one(tmp_path):
    ia3 = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    a, b = adapter(tmp_path, "a", ia3, 1), adapter(tmp_path, "b", ia3, 2)
    sd, config, _ = merge([a, b], weights=[1.0, 1.0])
    la, lb = cf.load(a, dtype=torch.float32), cf.load(b, dtype=torch.float32)
    for k, v in sd.items():
        torch.testing.assert_close(v, 1 + (la[k] - 1) + (lb[k] - 1))
    assert config["peft_type"] == "IA3"


def test_what_does_not_merge_is_refused(tmp_path, capsys):
    lora = adapter(tmp_path, "lora", LoraConfig(r=4, target_modules=["q_proj"]), 1)
    ia3 = adapter(tmp_path, "ia3", IA3Config(target_modules=["k_proj"], feedforward_modules=[]), 2)
    dora = adapter(tmp_path, "dora", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), 3)
    capsys.readouterr()
    for pair, code in (([lora, ia3], "UNSUPPORTED_ADAPTER"), ([lora, dora], "UNSUPPORTED_ADAPTER"),
                       ([lora], "INVALID_ARGUMENT")):
        assert main(["merge", *map(str, pair), "-o", str(tmp_path / "x.cpeft.safetensors")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and code in err
    assert main(["merge", str(lora), str(lora), "-o", str(tmp_path / "x.cpeft.safetensors"), "--weights", "1"]) == 1
    assert "one finite weight per adapter" in capsys.readouterr().err
    other = tmp_path / "other.cpeft.safetensors"
    ca = cf.read(lora)
    ca.base_model = cf.BaseBinding(fingerprint=cf.binding.Fingerprint(cf.binding.AS_STORED, "0" * 64))
    cf.save(ca, other)
    ca.base_model = cf.BaseBinding(fingerprint=cf.binding.Fingerprint(cf.binding.AS_STORED, "1" * 64))
    cf.save(ca, tmp_path / "other2.cpeft.safetensors")
    assert main(["merge", str(other), str(tmp_path / "other2.cpeft.safetensors"), "-o",
                 str(tmp_path / "y.cpeft.safetensors")]) == 1
    assert "CONFIG_MISMATCH" in capsys.readouterr().err


def test_adapters_for_base_models_of_other_names_are_refused_unless_told(tmp_path, capsys, monkeypatch):
    """Without fingerprints the recorded base names decide: a Llama adapter and a GPT-2 adapter do
    not merge; one model under a hub id and a local path of the same name does; --any-base
    overrides names, never fingerprints; --keep out of range names the flag; --created-at pins
    the file."""
    import json

    def with_base(name: str, base: str, seed: int):
        folder = adapter(tmp_path, name, LoraConfig(r=4, target_modules=["q_proj"]), seed, compressed=False)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base}))
        return folder

    llama = with_base("llama", "HuggingFaceTB/SmolLM2-135M", 1)
    same = with_base("same", "/models/smollm2-135m/", 2)
    gpt2 = with_base("gpt2", "openai-community/gpt2", 3)
    out = tmp_path / "m.cpeft.safetensors"
    capsys.readouterr()
    assert main(["merge", str(llama), str(gpt2), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CONFIG_MISMATCH" in err and "openai-community/gpt2" in err and "--any-base" in err
    assert not out.exists()
    assert main(["merge", str(llama), str(same), "-o", str(out), "--created-at", "2024-01-02T03:04:05Z"]) == 0
    assert cf.verify(out).provenance.created_at == "2024-01-02T03:04:05Z"
    assert main(["merge", str(llama), str(gpt2), "-o", str(tmp_path / "any.cpeft"), "--any-base"]) == 0
    # folders of one name in two places are two adapters
    (tmp_path / "run1").mkdir()
    (tmp_path / "run2").mkdir()
    a, b = llama.rename(tmp_path / "run1" / "final"), gpt2.rename(tmp_path / "run2" / "final")
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "runs.cpeft")]) == 1
    assert "CONFIG_MISMATCH" in capsys.readouterr().err and not (tmp_path / "runs.cpeft").exists()
    llama = a
    capsys.readouterr()
    assert main(["merge", str(llama), str(same), "-o", str(tmp_path / "k.cpeft"), "--method", "ties",
                 "--keep", "1.5"]) == 1
    assert "--keep must be in (0, 1]" in capsys.readouterr().err
