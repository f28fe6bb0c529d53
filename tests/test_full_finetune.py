"""Full fine-tunes from the command line: a model folder (sharded) as the source, the model it was
fine-tuned from as the reference, and the fine-tuned checkpoint rebuilt with ``apply-delta``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import compeft_format as cf
from compeft_format.cli import main


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.fixture
def models(tmp_path):
    """(base folder, fine-tuned folder, fine-tuned model), both saved as sharded checkpoints."""
    base = tiny_llama(0)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    ft = tiny_llama(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if n.endswith(("q_proj.weight", "down_proj.weight")):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    ft.save_pretrained(tmp_path / "ft", max_shard_size="20KB")
    assert (tmp_path / "ft" / "model.safetensors.index.json").is_file()
    return tmp_path / "base", tmp_path / "ft", ft


def test_a_model_folder_needs_a_reference(models, tmp_path, capsys):
    _, ft_dir, _ = models
    out = tmp_path / "x.cpeft.safetensors"
    assert main(["compress", str(ft_dir), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "INVALID_ARGUMENT" in err and "--reference" in err and not out.exists()
    assert main(["compress", str(ft_dir), "-o", str(out), "--reference", "zero"]) == 0  # the weights themselves
    m = cf.verify(out)
    assert m.adapter.representation == "weights" and m.compression.reference == "zero"


def test_compress_then_apply_delta_rebuilds_the_fine_tune(models, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    base_dir, ft_dir, ft = models
    packed = tmp_path / "ft.cpeft.safetensors"
    # every delta kept with its value: the rebuilt weights are the fine-tune's, to float32 rounding
    assert main(["compress", str(ft_dir / "model.safetensors.index.json"), "-o", str(packed), "--reference",
                 str(base_dir), "--mode", "prune", "--density", "1", "--base-weights", str(base_dir)]) == 0
    m = cf.verify(packed)
    assert m.adapter.kind == "full" and m.adapter.representation == "delta" and m.compression.reference == "base"
    out = tmp_path / "rebuilt"
    capsys.readouterr()
    assert main(["apply-delta", str(packed), "--base", str(base_dir), "-o", str(out), "--max-shard-size", "20KB",
                 "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    names = {p.rsplit("/", 1)[1] for p in written["files"]}
    assert "config.json" in names and "model.safetensors.index.json" in names and len(names) > 3
    rebuilt = LlamaForCausalLM.from_pretrained(out).eval()
    want = ft.state_dict()
    for name, t in rebuilt.state_dict().items():
        assert torch.allclose(t, want[name], rtol=0, atol=1e-6), name
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(rebuilt(ids).logits, ft(ids).logits, atol=1e-5)

    # an existing folder is replaced only with --force, and only a model folder that holds no input;
    # another base is refused by its fingerprint
    assert main(["apply-delta", str(packed), "--base", str(base_dir), "-o", str(out)]) == 1
    assert main(["apply-delta", str(packed), "--base", str(base_dir), "-o", str(out), "--force"]) == 0
    assert main(["apply-delta", str(packed), "--base", str(base_dir), "-o", str(base_dir), "--force"]) == 1
    assert "which this command reads" in capsys.readouterr().err
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert main(["apply-delta", str(packed), "--base", str(base_dir), "-o", str(notes), "--force"]) == 1
    assert "did not write" in capsys.readouterr().err and (notes / "todo.txt").read_text() == "mine"
    tiny_llama(5).save_pretrained(tmp_path / "other")
    assert main(["apply-delta", str(packed), "--base", str(tmp_path / "other"), "-o", str(tmp_path / "o2")]) == 1
    assert "BASE_MISMATCH" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_a_compressed_delta_moves_the_base_towards_the_fine_tune(models, tmp_path):
    base_dir, ft_dir, ft = models
    packed = tmp_path / "ft.cpeft.safetensors"
    assert main(["compress", str(ft_dir), "-o", str(packed), "--reference", str(base_dir), "--density", "0.3"]) == 0
    cf.apply_delta(packed, base_dir, tmp_path / "rebuilt")
    from transformers import LlamaForCausalLM

    rebuilt = LlamaForCausalLM.from_pretrained(tmp_path / "rebuilt").state_dict()
    base = LlamaForCausalLM.from_pretrained(base_dir).state_dict()
    for name, t in ft.state_dict().items():
        if name.endswith(("q_proj.weight", "down_proj.weight")):
            before, after = (base[name] - t).norm(), (rebuilt[name] - t).norm()
            assert after < 0.9 * before, name
        else:
            assert torch.equal(rebuilt[name], t), name  # no delta, copied as it was


def test_deltas_decompress_to_one_file_not_to_a_peft_folder(models, tmp_path, capsys):
    base_dir, ft_dir, _ = models
    packed = tmp_path / "ft.cpeft.safetensors"
    assert main(["compress", str(ft_dir), "-o", str(packed), "--reference", str(base_dir)]) == 0
    capsys.readouterr()
    assert main(["decompress", str(packed), "-o", str(tmp_path / "folder")]) == 1
    assert "apply-delta" in capsys.readouterr().err and not (tmp_path / "folder").exists()
    single = tmp_path / "delta.safetensors"
    assert main(["decompress", str(packed), "-o", str(single)]) == 0
    assert single.is_file()
    got = load_file(str(single))
    expected = cf.load(packed)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)


def test_the_weights_file_of_a_peft_folder_is_refused_alone(tmp_path, capsys):
    from safetensors.torch import save_file

    d = tmp_path / "lora"
    d.mkdir()
    save_file({"base_model.model.x.lora_A.weight": torch.randn(4, 8),
               "base_model.model.x.lora_B.weight": torch.randn(8, 4)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                       "target_modules": ["x"]}))
    assert main(["compress", str(d / "adapter_model.safetensors"), "-o", str(tmp_path / "a.cpeft.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "give its folder" in err and str(d) in err


def test_apply_delta_refuses_an_adapter_and_a_mismatched_base(models, tmp_path, capsys):
    from safetensors.torch import save_file

    base_dir, ft_dir, _ = models
    lora = tmp_path / "lora.cpeft.safetensors"
    cf.save(cf.compress({"base_model.model.x.lora_A.weight": torch.randn(4, 8),
                         "base_model.model.x.lora_B.weight": torch.randn(8, 4)}), lora)
    capsys.readouterr()
    assert main(["apply-delta", str(lora), "--base", str(base_dir), "-o", str(tmp_path / "o")]) == 1
    assert "not the deltas of a full fine-tune" in capsys.readouterr().err
    # a delta for a tensor the base lacks: refused, nothing written
    odd = tmp_path / "odd"
    odd.mkdir()
    save_file({"other.weight": torch.zeros(3)}, str(odd / "model.safetensors"))
    packed = tmp_path / "d.cpeft.safetensors"
    assert main(["compress", str(ft_dir), "-o", str(packed), "--reference", str(base_dir)]) == 0
    capsys.readouterr()
    assert main(["apply-delta", str(packed), "--base", str(odd), "-o", str(tmp_path / "o")]) == 1
    assert "MODEL_MISMATCH" in capsys.readouterr().err and not (tmp_path / "o").exists()
