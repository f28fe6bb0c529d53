"""CPET training (cpet_adapters.train, .data, .inherit) on a 2-layer Llama built from a config:
the loss falls, distillation pulls the student towards the teacher, inherited weights equal
their source, accumulation equals a larger batch, and a resumed run is bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import compeft_format as cf
from conftest import save_tiny_causal_lm, write_task
from cpet_adapters import data as D
from cpet_adapters.inherit import inherit_lora, read_lora
from cpet_adapters.train import (
    ADAPTER_DIR,
    FINAL,
    LOG_FILE,
    RUN_FILE,
    TrainConfig,
    build_student,
    load_causal_lm,
    train,
)


def perturbed_copy(src: Path, dst: Path, scale: float = 0.02, seed: int = 1) -> Path:
    """The base with noise on every linear weight of its blocks: a stand-in for a compressed base."""
    model = load_causal_lm(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    model.save_pretrained(dst)
    for f in src.glob("tokenizer*"):
        (dst / f.name).write_bytes(f.read_bytes())
    for f in src.glob("special_tokens_map.json"):
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpet")
    original = save_tiny_causal_lm(root / "original")
    compressed = perturbed_copy(original, root / "compressed")
    return {"root": root, "original": original, "compressed": compressed,
            "train": write_task(root / "train.jsonl", 48), "eval": write_task(root / "eval.jsonl", 16, seed=1)}


def config(world, out: Path, **kw) -> TrainConfig:
    base = {"base": str(world["compressed"]), "data": str(world["train"]), "output": str(out),
            "max_steps": 4, "batch_size": 4, "lr": 1e-2, "save_every": 0, "max_len": 32}
    return TrainConfig(**{**base, **kw})


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


# --- data ---------------------------------------------------------------------------------------
def test_jsonl_lines_are_checked_with_their_line_number(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"prompt": "p", "completion": "c"}\n[1]\n')
    with pytest.raises(cf.InputError, match=r"d.jsonl:4:"):
        D.read_jsonl(p)
    p.write_text('{"text": "a"}\n{"prompt": "p"}\n')
    with pytest.raises(cf.InputError, match=r":2: each line"):
        D.read_jsonl(p)
    p.write_text("\n\n")
    with pytest.raises(cf.InputError, match="no examples"):
        D.read_jsonl(p)
    with pytest.raises(cf.FileNotFound):
        D.read_jsonl(tmp_path / "missing.jsonl")


def test_a_prompt_is_context_and_a_completion_is_learned(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["compressed"])
    ex = D.tokenize([{"prompt": "ab", "completion": "cd"}, {"text": "xyz"}], tok, max_len=16)
    assert ex[0].input_ids == (*tok("abcd")["input_ids"], tok.eos_token_id)
    assert ex[0].labels == (D.IGNORE, D.IGNORE, *tok("cd")["input_ids"], tok.eos_token_id)
    assert ex[0].tokens == 3 and ex[1].labels == ex[1].input_ids and ex[1].tokens == 2
    batch = D.collate(ex, pad_id=0)
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["labels"][1].tolist()[3:] == [D.IGNORE, D.IGNORE]


def test_batches_follow_the_seed_and_resume_where_they_stopped():
    a = D.micro_batches(10, 3, seed=5)
    first = [next(a) for _ in range(7)]
    assert all(len(b) == 3 for b in first) and sorted(first[0] + first[1] + first[2]) != list(range(9))[:0]
    resumed = D.micro_batches(10, 3, seed=5, start=4)
    assert [next(resumed) for _ in range(3)] == first[4:]
    assert [next(D.micro_batches(10, 3, seed=6)) for _ in range(1)] != first[:1]


# --- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"max_steps": 0}, "max_steps"), ({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"),
    ({"task_lora": False}, "nothing to train"), ({"distill": 1.0}, "teacher"),
    ({"temperature": 0.0}, "temperature"), ({"batch_size": True}, "batch_size"),
])
def test_bad_settings_are_typed_errors(world, tmp_path, kw, match):
    with pytest.raises(cf.InvalidArgument, match=match):
        config(world, tmp_path, **kw)


def test_a_config_file_holds_the_same_names_and_refuses_unknown_ones(world, tmp_path):
    cfg = config(world, tmp_path / "run", distill_layers="-1,1", target_modules="q_proj,k_proj")
    assert cfg.distill_layers == (-1, 1) and cfg.target_modules == ("q_proj", "k_proj")
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_json()))
    assert TrainConfig.from_file(path) == cfg
    assert TrainConfig.from_file(path, lr=0.5, seed=None).lr == 0.5
    path.write_text(json.dumps({**cfg.to_json(), "learning_rate": 1}))
    with pytest.raises(cf.InvalidArgument, match="learning_rate"):
        TrainConfig.from_file(path)


# --- training -----------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_writes_a_peft_adapter(world, tmp_path):
    out = tmp_path / "run"
    before = train(config(world, out, eval=str(world["eval"]), max_steps=1, lr=1e-9)).eval
    r = train(config(world, tmp_path / "run2", eval=str(world["eval"]), max_steps=30, lr=2e-2))
    assert r.finished and r.steps == 30 and r.eval["loss"] < before["loss"] - 0.3, (before, r.eval)
    assert r.eval["accuracy"] > before["accuracy"] + 0.3
    log = log_of(tmp_path / "run2")
    assert [x["step"] for x in log] == list(range(1, 31)) and log[-1]["lr"] == 0.0
    adapter = tmp_path / "run2" / FINAL / ADAPTER_DIR
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    run = json.loads((tmp_path / "run2" / RUN_FILE).read_text())
    assert run["steps"] == 30 and run["config"]["lr"] == 2e-2 and run["eval"]["loss"] == r.eval["loss"]

    # the saved adapter reproduces the trained model's evaluation
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_causal_lm(world["compressed"]), str(adapter))
    from transformers import AutoTokenizer

    from cpet_adapters.train import evaluate

    tok = AutoTokenizer.from_pretrained(world["compressed"])
    ex = D.tokenize(D.read_jsonl(world["eval"]), tok, 32)
    again = evaluate(pm, ex, pad_id=int(tok.pad_token_id), batch_size=8, device=torch.device("cpu"))
    assert again["loss"] == pytest.approx(r.eval["loss"], rel=1e-5)


def test_distillation_pulls_the_student_towards_the_teacher(world, tmp_path):
    far = perturbed_copy(world["original"], tmp_path / "far", scale=0.5)
    out = tmp_path / "run"
    train(config(world, out, base=str(far), teacher=str(world["original"]), distill=100.0, max_steps=25, lr=5e-3,
                 target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    mse = [x["mse"] for x in log_of(out)]
    assert mse[0] > 0 and sum(mse[-5:]) / 5 < 0.7 * mse[0], mse


def test_accumulating_two_half_batches_is_one_full_batch(world, tmp_path):
    full = train(config(world, tmp_path / "full", max_steps=1, batch_size=4, grad_accum=1, max_grad_norm=0.0))
    half = train(config(world, tmp_path / "half", max_steps=1, batch_size=2, grad_accum=2, max_grad_norm=0.0))
    assert full.finished and half.finished
    a = load_file(str(tmp_path / "full" / FINAL / ADAPTER_DIR / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "half" / FINAL / ADAPTER_DIR / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert log_of(tmp_path / "full")[0]["ce"] == pytest.approx(log_of(tmp_path / "half")[0]["ce"], rel=1e-5)


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(world, tmp_path):
    kw = {"max_steps": 6, "lora_dropout": 0.1, "warmup_steps": 2, "grad_accum": 2, "batch_size": 2,
          "teacher": str(world["original"]), "distill": 0.5}
    straight = train(config(world, tmp_path / "straight", **kw))
    first = train(config(world, tmp_path / "resumed", **kw), stop_after=3)
    assert not first.finished and first.steps == 3 and not (tmp_path / "resumed" / FINAL).exists()
    second = train(config(world, tmp_path / "resumed", **kw))
    assert second.resumed_from == 3 and second.finished and straight.finished
    a = load_file(str(tmp_path / "straight" / FINAL / ADAPTER_DIR / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / FINAL / ADAPTER_DIR / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [x["ce"] for x in log_of(tmp_path / "straight")] == [x["ce"] for x in log_of(tmp_path / "resumed")]


def test_a_run_folder_refuses_other_settings(world, tmp_path):
    out = tmp_path / "run"
    train(config(world, out, max_steps=4), stop_after=2)
    with pytest.raises(cf.InvalidArgument, match="lr"):
        train(config(world, out, max_steps=4, lr=0.5))
    assert train(config(world, out, max_steps=4, eval=str(world["eval"]))).finished  # evaluation may change


# --- inheritance --------------------------------------------------------------------------------
def lora_on_original(world, tmp_path) -> Path:
    """A LoRA trained briefly on the original model, as a PEFT folder."""
    out = tmp_path / "orig-run"
    train(config(world, out, base=str(world["original"]), max_steps=3, target_modules=("q_proj", "v_proj"),
                 lora_r=4, lora_alpha=8))
    return out / FINAL / ADAPTER_DIR


def test_inherited_weights_equal_their_source(world, tmp_path):
    src = lora_on_original(world, tmp_path)
    tensors, cfg_json, prov = read_lora(src)
    assert prov.format == "peft" and prov.tensors == len(tensors) == 8 and cfg_json["r"] == 4
    student = build_student(config(world, tmp_path / "x", inherit=str(src)), load_causal_lm(world["compressed"]))
    from peft import get_peft_model_state_dict

    got = get_peft_model_state_dict(student.model)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in got)
    assert student.inheritance == prov and student.lora_config["r"] == 4

    # from a compeft file: the decoded tensors, verbatim
    f = tmp_path / "src.cpeft.safetensors"
    cf.save(cf.compress_peft(src, density=0.5), f)
    tensors2, _, prov2 = read_lora(f)
    assert prov2.format == "compeft" and prov2.sha256 == cf.hub.file_sha256(f) and prov2.manifest_sha256
    student2 = build_student(config(world, tmp_path / "y", inherit=str(f)), load_causal_lm(world["compressed"]))
    got2 = get_peft_model_state_dict(student2.model)
    decoded = cf.load(f, dtype="float32")
    assert all(torch.equal(got2[k], decoded[k]) for k in got2)


def test_an_inherited_lora_that_does_not_fit_is_refused(world, tmp_path):
    src = lora_on_original(world, tmp_path)
    sd = load_file(str(src / "adapter_model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    key = next(k for k in sd if "lora_A" in k)
    save_file({**sd, key: torch.zeros(3, sd[key].shape[1])}, str(bad / "adapter_model.safetensors"))
    base = load_causal_lm(world["compressed"])
    from peft import get_peft_model

    from compeft_format.peft_layout import peft_config

    tensors, cfg_json, _ = read_lora(bad)
    pm = get_peft_model(base, peft_config(cfg_json, inference_mode=False))
    with pytest.raises(cf.ConfigMismatch, match="shape"):
        inherit_lora(pm, tensors)
    with pytest.raises(cf.ModelMismatch, match="missing"):
        inherit_lora(pm, {k: v for k, v in tensors.items() if k != key})
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(cf.UnsupportedAdapter):
        read_lora(bad)


# --- the Trainer subclass -----------------------------------------------------------------------
def test_the_trainer_subclass_computes_the_same_loss_and_learns(world, tmp_path):
    from transformers import AutoTokenizer, TrainingArguments

    from cpet_adapters.train import evaluate, hidden_mse, token_cross_entropy
    from cpet_adapters.trainer import CPETTrainer

    tok = AutoTokenizer.from_pretrained(world["compressed"])
    examples = D.tokenize(D.read_jsonl(world["train"]), tok, 32)
    held_out = D.tokenize(D.read_jsonl(world["eval"]), tok, 32)
    student = build_student(config(world, tmp_path / "s"), load_causal_lm(world["compressed"])).model
    teacher = load_causal_lm(world["original"])
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=30, learning_rate=2e-2, lr_scheduler_type="constant", report_to=[],
                             save_strategy="no", use_cpu=True, remove_unused_columns=False, logging_steps=5,
                             warmup_steps=0, weight_decay=0.0)
    trainer = CPETTrainer(model=student, args=args, train_dataset=examples, teacher=teacher, distill=0.5,
                          data_collator=lambda items: D.collate(items, int(tok.pad_token_id)))

    batch = D.collate(examples[:4], int(tok.pad_token_id))
    trainer.current_gradient_accumulation_steps = 2
    student.train()
    got = trainer.compute_loss(student, dict(batch), num_items_in_batch=50)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        ce, _ = token_cross_entropy(s.logits, batch["labels"])
        want = ce / 50 + 0.5 * hidden_mse(s.hidden_states, t.hidden_states, (-1,), batch["attention_mask"]) / 2
    assert float(got) == pytest.approx(float(want), rel=1e-5) and trainer.last_parts["mse"] > 0

    before = evaluate(student, held_out, pad_id=int(tok.pad_token_id), batch_size=8, device=torch.device("cpu"))
    trainer.train()
    after = evaluate(student, held_out, pad_id=int(tok.pad_token_id), batch_size=8, device=torch.device("cpu"))
    assert after["loss"] < before["loss"] - 0.2 and after["accuracy"] > before["accuracy"] + 0.2, (before, after)


def test_two_processes_train_as_one_process_with_twice_the_batch(tmp_path):
    """``torchrun`` with two CPU processes (accelerate's MULTI_CPU, gloo): the loss is normalised by
    the predictions of both processes, so DDP's averaged gradient is the one-process gradient."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import ROOT

    base = save_tiny_causal_lm(tmp_path / "llama")
    data = write_task(tmp_path / "train.jsonl", 32)
    args = ["cpet", "train", str(base), "--data", str(data), "--max-steps", "3", "--max-len", "32", "--lora-r", "2",
            "--recovery", "--recovery-r", "2", "--save-every", "0", "--lr", "1e-2", "--teacher", str(base),
            "--distill", "1", "--distill-kl", "0.5"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "compeft_format.cli", *args, "-o", str(tmp_path / "two"), "--batch-size", "2"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "compeft_format.cli", *args, "-o", str(tmp_path / "one"),
                          "--batch-size", "4"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "resumed" not in two.stderr  # the processes ran together, not one after the other
    for name in ("adapter/adapter_model.safetensors", "recovery.safetensors"):
        a, b = load_file(str(tmp_path / "two" / "final" / name)), load_file(str(tmp_path / "one" / "final" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    logs = [[json.loads(x) for x in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("two", "one")]
    assert [r["tokens"] for r in logs[0]] == [r["tokens"] for r in logs[1]]
    for key in ("ce", "mse", "kl"):
        assert [round(r[key], 4) for r in logs[0]] == [round(r[key], 4) for r in logs[1]], key
    assert logs[0][-1]["mse"] > 0 and logs[0][-1]["kl"] > 0


class _Planted:
    """Unpickling this writes a file: what a hostile ``pytorch_model.bin`` could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_model_folders_are_read_from_safetensors_only(tmp_path):
    import pickle
    import shutil

    from compeft_format.hf_models import load_float_model
    from cpet_adapters.train import load_model

    folder = save_tiny_causal_lm(tmp_path / "llama")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "executed"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Planted(str(marker))}))
    for load in (load_model, load_float_model):
        with pytest.raises(cf.InputError):
            load(folder)
    assert not marker.exists()
    shutil.rmtree(folder)


def test_the_teacher_cache_trains_as_the_teacher_run_at_every_step(tmp_path, monkeypatch):
    import sys

    from safetensors.torch import load_file

    T = sys.modules["cpet_adapters.train"]  # the package's ``train`` is the function
    base = save_tiny_causal_lm(tmp_path / "llama")
    data = write_task(tmp_path / "train.jsonl", 24)
    kw = {"base": str(base), "data": str(data), "teacher": str(base), "distill": 1.0, "recovery": True,
          "recovery_r": 2, "lora_r": 2, "max_steps": 4, "max_len": 32, "save_every": 0, "lr": 1e-2,
          "eval_batch_size": 5}
    lines: list[str] = []
    train(TrainConfig(output=str(tmp_path / "cached"), **kw), log=lines.append)
    assert any("cached" in line for line in lines)
    monkeypatch.setattr(T, "TEACHER_CACHE_BYTES", 0)
    lines.clear()
    train(TrainConfig(output=str(tmp_path / "live"), **kw), log=lines.append)
    assert not any("cached" in line for line in lines)
    logs = [[json.loads(x) for x in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("cached", "live")]
    assert logs[0][-1]["mse"] > 0
    for a, b in zip(*logs, strict=True):
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-4, abs=1e-7) and a["ce"] == pytest.approx(b["ce"], rel=1e-5)
    for name in ("adapter/adapter_model.safetensors", "recovery.safetensors"):
        x, y = (load_file(str(tmp_path / r / "final" / name)) for r in ("cached", "live"))
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-5)
