"""CPET for sequence classification on an encoder: a 2-layer BERT built from a config
(``BertModel``, no head), compressed, a classifier LoRA trained on the original and inherited with
its head onto the compressed encoder with recovery modules and distillation, exported, and loaded
back from the files into the compressed encoder, which the artifacts are bound to by the
fingerprint of its backbone."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import compeft_format as cf
from compeft_format.binding import FLOAT32, BaseWeights
from conftest import save_tiny_bert, write_classes
from cpet_adapters.base import compress_base, load_compressed_base
from cpet_adapters.data import label_names, read_jsonl, tokenize_classes
from cpet_adapters.export import TASK_FILE, export, load_into, trained_for
from cpet_adapters.train import (
    ADAPTER_DIR,
    FINAL,
    RECOVERY_WEIGHTS,
    TrainConfig,
    build_student,
    load_model,
    logit_kl,
    recovery_layers,
    train,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    original = save_tiny_bert(root / "original")
    data, held_out = write_classes(root / "train.jsonl", 32), write_classes(root / "eval.jsonl", 16, seed=1)
    common = {"data": str(data), "eval": str(held_out), "task": "classify", "max_len": 16, "batch_size": 8,
              "save_every": 0, "lora_r": 4, "lora_alpha": 8}
    train(TrainConfig(base=str(original), output=str(root / "orig-run"), max_steps=6, lr=1e-2, **common))
    inherited = root / "orig-run" / FINAL / ADAPTER_DIR
    compressed = compress_base(original, root / "int3", "int3:g32", source_id="org/tiny-bert").path
    cfg = TrainConfig(base=str(compressed), output=str(root / "run"), teacher=str(original), inherit=str(inherited),
                      recovery=True, recovery_r=4, distill=1.0, distill_kl=1.0, max_steps=6, lr=1e-2, **common)
    result = train(cfg)
    arts = export(root / "run", root / "out", density=0.5)
    return {"root": root, "original": original, "compressed": compressed, "inherited": inherited, "cfg": cfg,
            "result": result, "arts": arts, "common": common}


def probe() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[2, 5, 20, 31, 9, 3], [2, 14, 8, 40, 22, 3]]),
            "attention_mask": torch.ones(2, 6, dtype=torch.long)}


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**probe()).logits


def test_an_encoder_is_compressed_as_a_bare_model_and_its_folder_verifies(run):
    config = json.loads((run["compressed"] / "config.json").read_text())
    assert config["architectures"] == ["BertModel"]
    base = load_compressed_base(run["compressed"], verify=True)
    # the transformer blocks' linear layers only: 6 per BERT layer, not the pooler
    assert len(base.target_modules) == 12 and all(t.startswith("encoder.layer.") for t in base.target_modules)
    assert base.binding.fingerprint == cf.fingerprint(run["compressed"], FLOAT32)


def test_a_classifier_is_fingerprinted_by_its_backbone(run):
    model = load_model(run["compressed"], "classify", ("neg", "pos"))
    weights = BaseWeights(model)
    folder = cf.fingerprint(run["compressed"], FLOAT32)
    assert folder not in weights.fingerprints(FLOAT32)  # the head and the "bert." names
    assert weights.backbone_fingerprint(FLOAT32) == folder
    cf.binding.check(cf.BaseBinding(fingerprint=folder), model)
    with pytest.raises(cf.BaseMismatch):
        cf.binding.check(cf.BaseBinding(fingerprint=cf.fingerprint(run["original"], FLOAT32)), model)
    with torch.no_grad():  # a changed backbone weight changes the backbone fingerprint
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] += 1
    assert BaseWeights(model).backbone_fingerprint(FLOAT32) != folder


def test_the_inherited_head_and_lora_equal_their_source(run):
    from safetensors.torch import load_file

    source = load_file(str(run["inherited"] / "adapter_model.safetensors"))
    assert any("classifier" in k for k in source)
    cfg = TrainConfig(base=str(run["compressed"]), output=str(run["root"] / "unused"), inherit=str(run["inherited"]),
                      **run["common"])
    student = build_student(cfg, load_model(run["compressed"], "classify", ("neg", "pos")))
    params = dict(student.model.named_parameters())
    head = params["base_model.model.classifier.modules_to_save.default.weight"]
    assert torch.equal(head, source["base_model.model.classifier.weight"])
    assert head.requires_grad
    a = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    assert torch.equal(params[a.replace("lora_A.", "lora_A.default.")], source[a])


def test_recovery_modules_sit_in_the_blocks_not_on_the_head(run):
    model = load_model(run["compressed"], "classify", ("neg", "pos"))
    layers = recovery_layers(model)
    assert len(layers) == 12 and not any("classifier" in n or "pooler" in n for n in layers)
    assert recovery_layers(model, ("query",)) == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]


def test_the_run_trains_the_head_and_records_its_labels(run):
    info = json.loads((run["root"] / "run" / "run.json").read_text())
    assert info["labels"] == ["neg", "pos"] and info["steps"] == 6
    assert set(run["result"].eval) == {"loss", "accuracy", "tokens"} and run["result"].eval["tokens"] == 16
    assert 0 <= run["result"].eval["accuracy"] <= 1
    log = [json.loads(x) for x in (run["root"] / "run" / "log.jsonl").read_text().splitlines()]
    assert all(r["mse"] > 0 and r["kl"] >= 0 and r["ce"] > 0 for r in log)
    assert (run["root"] / "run" / FINAL / RECOVERY_WEIGHTS).is_file()


def test_exported_classifier_loads_from_the_files_into_the_compressed_encoder(run):
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    from compeft_format.recovery import RecoveryConfig, add_recovery

    task = run["root"] / "out" / TASK_FILE
    assert trained_for(task) == ("classify", ("neg", "pos"))
    loaded = load_into(run["compressed"], task)
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    assert loaded.config.id2label == {0: "neg", 1: "pos"}
    got = logits(loaded)
    # the trained student, its LoRA and head set to what the file decodes to
    final = run["root"] / "run" / FINAL
    reference = PeftModel.from_pretrained(load_model(run["compressed"], "classify", ("neg", "pos")),
                                          str(final / ADAPTER_DIR))
    rc = json.loads((final / "recovery.json").read_text())
    add_recovery(reference, RecoveryConfig(r=rc["r"], alpha=rc["alpha"], target_modules=tuple(rc["target_modules"])),
                 init=False).load_state_dict(load_file(str(final / RECOVERY_WEIGHTS)))
    trained = logits(reference)
    set_peft_model_state_dict(reference, cf.load(task, dtype="float32"))
    torch.testing.assert_close(got, logits(reference), rtol=1e-5, atol=1e-5)
    # the head is stored exactly: with the LoRA's own entries at full precision the outputs match
    decoded = cf.load(task, dtype="float32")
    head = load_file(str(final / ADAPTER_DIR / "adapter_model.safetensors"))
    assert torch.equal(decoded["base_model.model.classifier.weight"], head["base_model.model.classifier.weight"])
    assert got.shape == trained.shape == (2, 2)


def test_the_original_encoder_is_refused(run):
    with pytest.raises(cf.BaseMismatch):
        load_into(run["original"], run["root"] / "out" / TASK_FILE)


def test_resume_continues_bit_identically(run, tmp_path):
    kw = {**run["common"], "base": str(run["compressed"]), "recovery": True, "recovery_r": 2, "max_steps": 4,
          "lr": 1e-2, "save_every": 2}
    train(TrainConfig(output=str(tmp_path / "whole"), **kw))
    first = train(TrainConfig(output=str(tmp_path / "split"), **kw), stop_after=2)
    assert not first.finished and first.steps == 2
    second = train(TrainConfig(output=str(tmp_path / "split"), **kw))
    assert second.resumed_from == 2 and second.finished
    from safetensors.torch import load_file

    for name in (f"{ADAPTER_DIR}/adapter_model.safetensors", RECOVERY_WEIGHTS):
        a, b = (load_file(str(tmp_path / r / FINAL / name)) for r in ("whole", "split"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_class_logit_kl_is_the_kl_divergence():
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    mask = torch.ones(5, 7)
    want = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean") * 4
    torch.testing.assert_close(logit_kl(s, t, mask, 2.0), want)
    assert float(logit_kl(t, t, mask, 1.0)) == pytest.approx(0.0, abs=1e-7)


def test_classification_data_is_checked(tmp_path, run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run["original"])
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "good w1", "label": 3}\n{"text": "bad w2", "label": 12}\n{"text": "w3"}\n')
    records = read_jsonl(p)
    assert records[0] == {"text": "good w1", "label": "3"}
    with pytest.raises(cf.InvalidArgument, match="label"):
        label_names(records)
    assert label_names(records[:2]) == ("3", "12")  # integers in numeric order
    with pytest.raises(cf.InvalidArgument, match="two labels"):
        label_names(records[:1])
    with pytest.raises(cf.InvalidArgument, match="not one of"):
        tokenize_classes(records[:2], tok, 8, ("3", "4"))
    examples = tokenize_classes(records[:2], tok, 3, ("3", "12"))
    assert [e.label for e in examples] == [0, 1] and all(len(e.input_ids) <= 3 and e.tokens == 1 for e in examples)
    p.write_text('{"text": "good", "label": true}\n')
    with pytest.raises(cf.InputError, match="label"):
        read_jsonl(p)


@pytest.mark.parametrize("bad", [{"task": "regress"}, {"labels": ("a",)}, {"labels": ("a", "a")},
                                 {"labels": ("a", "b"), "task": "causal-lm"},
                                 {"distill_kl": 1.0, "teacher": "t"}])
def test_classification_settings_are_checked(bad):
    kw = {"base": "b", "data": "d", "output": "o", "task": "classify", **bad}
    with pytest.raises(cf.InvalidArgument):
        TrainConfig(**kw)


def test_the_cli_trains_a_classifier(run, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    p = subprocess.run([sys.executable, "-m", "compeft_format.cli", "cpet", "train", str(run["compressed"]),
                        "--task", "classify", "--labels", "neg,pos", "--data", str(run["root"] / "train.jsonl"),
                        "--eval", str(run["root"] / "eval.jsonl"), "-o", str(tmp_path / "run"), "--max-steps", "2",
                        "--max-len", "16", "--recovery", "--recovery-r", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "2 steps, done" in p.stdout and ", accuracy " in p.stdout and "token accuracy" not in p.stdout
    assert json.loads((tmp_path / "run" / "run.json").read_text())["labels"] == ["neg", "pos"]


def test_labels_that_only_look_numeric_sort_as_text():
    records = [{"text": "a", "label": x} for x in ("--1", "²", "+2", "10")]
    assert label_names(records) == tuple(sorted(["--1", "²", "+2", "10"]))
    assert label_names([{"text": "a", "label": x} for x in ("10", "-3", "2")]) == ("-3", "2", "10")


def test_an_artifact_with_malformed_labels_is_refused_with_a_typed_error(run, tmp_path):
    final = run["root"] / "run" / FINAL / ADAPTER_DIR
    for labels in ([["a"], ["b"]], ["a"], ["a", "a"], "ab"):
        ca = cf.compress_peft(final, density=0.5, training={"settings": {"task": "classify"}, "labels": labels})
        path = tmp_path / "bad.cpeft.safetensors"
        cf.save(ca, path)
        with pytest.raises(cf.InputError, match="labels"):
            trained_for(path)


def test_a_causal_lm_is_not_trained_as_a_classifier(tmp_path):
    from conftest import save_tiny_causal_lm

    llama = save_tiny_causal_lm(tmp_path / "llama")
    with pytest.raises(cf.InvalidArgument, match="causal language model"):
        load_model(llama, "classify", ("a", "b"))


def test_every_new_module_of_a_head_is_trained_and_exported(tmp_path, run):
    """DistilBERT's head is two new layers (pre_classifier and classifier): both train with the LoRA
    and travel in the artifact, so loading it does not depend on the random initialisation."""
    import shutil

    from transformers import DistilBertConfig, DistilBertModel

    folder = tmp_path / "distil"
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(vocab_size=51, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                     max_position_embeddings=64)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(run["original"] / name, folder / name)
    common = {"base": str(folder), "data": str(run["root"] / "train.jsonl"), "task": "classify", "max_len": 16,
              "batch_size": 8, "save_every": 0, "max_steps": 2, "lora_r": 2}
    with pytest.raises(cf.InvalidArgument, match="target_modules"):
        train(TrainConfig(output=str(tmp_path / "no-targets"), **common))
    train(TrainConfig(output=str(tmp_path / "run"), target_modules=("q_lin", "v_lin"), **common))
    arts = export(tmp_path / "run", tmp_path / "out", density=0.5)
    with cf.open_file(arts[-1].path) as f:
        names = set(f.keys())
    assert {"base_model.model.pre_classifier.weight", "base_model.model.classifier.weight"} <= names
    outs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        outs.append(logits(load_into(folder, arts[-1].path)))
    torch.testing.assert_close(outs[0], outs[1])


def test_a_run_saved_before_a_setting_existed_resumes(run, tmp_path):
    kw = {**run["common"], "base": str(run["compressed"]), "max_steps": 2, "lr": 1e-2, "save_every": 1}
    out = tmp_path / "run"
    train(TrainConfig(output=str(out), **kw), stop_after=1)
    saved = json.loads((out / "config.json").read_text())
    del saved["recovery_from"]  # a setting added after the run was made, left at its default
    (out / "config.json").write_text(json.dumps(saved))
    assert train(TrainConfig(output=str(out), **kw)).resumed_from == 1


def test_a_checkpoint_the_classifier_would_not_fully_use_is_refused(tmp_path):
    """RoBERTa's classifier has no pooler, but a bare RobertaModel checkpoint stores one: the
    classifier's backbone would never match that checkpoint's fingerprint, so training on it is
    refused at the start instead of producing artifacts no base accepts."""
    from transformers import RobertaConfig, RobertaModel

    folder = tmp_path / "roberta"
    RobertaModel(RobertaConfig(vocab_size=51, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, max_position_embeddings=40)).save_pretrained(folder)
    with pytest.raises(cf.InvalidArgument, match="does not use"):
        load_model(folder, "classify", ("a", "b"))


def test_the_artifact_records_the_layers_peft_chose(run):
    with cf.open_file(run["arts"][-1].path) as f:
        settings = f.manifest.provenance.training["settings"]
    assert settings["task"] == "classify" and settings["target_modules"] == ["query", "value"]
