"""Task-agnostic recovery: recovery modules trained once for a compressed base (no task LoRA),
exported, and applied frozen under task LoRAs trained later (``recovery_from``), whose task
artifacts require that one recovery artifact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import compeft_format as cf
from compeft_format.recovery import get_recovery
from compeft_format.requirements import requirement
from conftest import save_tiny_causal_lm, write_task
from cpet_adapters.base import compress_base
from cpet_adapters.export import RECOVERY_FILE, TASK_FILE, export, load_into
from cpet_adapters.train import FINAL, TrainConfig, build_student, load_model, train


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    original = save_tiny_causal_lm(root / "original")
    generic = root / "generic.jsonl"
    generic.write_text("".join(json.dumps({"text": f"some generic text number {i} about things"}) + "\n"
                               for i in range(24)))
    data = write_task(root / "train.jsonl", 32)
    compressed = compress_base(original, root / "int3", "int3:g32").path
    common = {"max_len": 32, "batch_size": 4, "save_every": 0, "lr": 1e-2}
    train(TrainConfig(base=str(compressed), data=str(generic), output=str(root / "agnostic"), task_lora=False,
                      recovery=True, recovery_r=4, teacher=str(original), distill=1.0, max_steps=4, **common))
    rec = export(root / "agnostic", root / "agnostic-out")
    assert [a.kind for a in rec] == ["recovery"]
    cfg = TrainConfig(base=str(compressed), data=str(data), output=str(root / "task"), lora_r=4,
                      recovery_from=str(rec[0].path), max_steps=4, **common)
    train(cfg)
    arts = export(root / "task", root / "task-out", density=0.5)
    return {"root": root, "original": original, "compressed": compressed, "recovery": rec[0], "cfg": cfg,
            "arts": arts}


def test_the_shared_recovery_is_applied_frozen_and_left_unchanged(shared):
    student = build_student(shared["cfg"], load_model(shared["compressed"]))
    handle = get_recovery(student.model)
    assert handle is not None and handle.source == shared["recovery"].manifest_sha256
    assert not any(p.requires_grad for p in handle.modules.parameters())
    assert any(p.requires_grad for n, p in student.model.named_parameters() if "lora_" in n)
    assert student.recovery is None and student.shared_recovery.kind == "recovery"
    # training did not move it: the run's final folder holds no recovery weights of its own
    assert not (shared["root"] / "task" / FINAL / "recovery.safetensors").exists()
    info = json.loads((shared["root"] / "task" / "run.json").read_text())
    assert info["recovery_from"]["manifest_sha256"] == shared["recovery"].manifest_sha256


def test_the_task_artifact_requires_the_shared_recovery_artifact(shared):
    rec, task = shared["arts"]
    assert rec.path.name == RECOVERY_FILE and rec.path.read_bytes() == shared["recovery"].path.read_bytes()
    assert task.path.name == TASK_FILE
    with cf.open_file(task.path) as f:
        assert [r.manifest_sha256 for r in f.manifest.requires] == [shared["recovery"].manifest_sha256]
    assert requirement(rec.path).manifest_sha256 == shared["recovery"].manifest_sha256


def test_loading_the_task_artifact_brings_the_shared_recovery(shared):
    from peft import set_peft_model_state_dict

    loaded = load_into(shared["compressed"], shared["arts"][1].path)
    assert get_recovery(loaded).source == shared["recovery"].manifest_sha256
    # the same model built by hand: compressed base, shared recovery, the LoRA as the file decodes it
    reference = build_student(shared["cfg"], load_model(shared["compressed"])).model
    set_peft_model_state_dict(reference, cf.load(shared["arts"][1].path, dtype="float32"))
    probe = torch.tensor([[5, 17, 99, 3, 200, 41]])
    loaded.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=probe).logits, reference(input_ids=probe).logits)
    rec_weights = load_file(str(shared["root"] / "agnostic" / FINAL / "recovery.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in rec_weights.items() if k.endswith("recovery_A2.weight"))


def test_a_recovery_artifact_of_another_base_is_refused(shared, tmp_path):
    other = compress_base(shared["original"], tmp_path / "int4", "int4:g32").path
    cfg = TrainConfig(base=str(other), data=str(shared["root"] / "train.jsonl"), output=str(tmp_path / "run"),
                      recovery_from=str(shared["recovery"].path), max_steps=1, max_len=32)
    with pytest.raises(cf.BaseMismatch):
        train(cfg)
    with pytest.raises(cf.InvalidArgument, match="recovery_from"):
        TrainConfig(base="b", data="d", output="o", recovery_from="r", recovery=True)
    with pytest.raises(cf.InvalidArgument):
        build_student(TrainConfig(base=str(other), data="d", output="o",
                                  recovery_from=str(shared["arts"][1].path)), load_model(other))


def test_export_refuses_a_changed_shared_recovery_file(shared, tmp_path):
    import shutil

    run = tmp_path / "task"
    shutil.copytree(shared["root"] / "task", run)
    info = json.loads((run / "run.json").read_text())
    info["recovery_from"]["manifest_sha256"] = "0" * 64
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(cf.InputError, match="no longer"):
        export(run, tmp_path / "out")


def test_resume_refuses_another_recovery_artifact_at_the_same_path(shared, tmp_path):
    import shutil

    rec = tmp_path / "rec.cpeft.safetensors"
    shutil.copy(shared["recovery"].path, rec)
    kw = {"base": str(shared["compressed"]), "data": str(shared["root"] / "train.jsonl"), "lora_r": 4,
          "recovery_from": str(rec), "max_steps": 2, "max_len": 32, "save_every": 1}
    train(TrainConfig(output=str(tmp_path / "run"), **kw), stop_after=1)
    # another recovery artifact for the same base (ComPEFT at 50%: other bytes, other digest)
    other = export(shared["root"] / "agnostic", tmp_path / "other", recovery_density=0.5)[0]
    shutil.copy(other.path, rec)
    with pytest.raises(cf.ConfigMismatch, match="recovery"):
        train(TrainConfig(output=str(tmp_path / "run"), **kw))
