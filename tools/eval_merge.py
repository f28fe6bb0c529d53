#!/usr/bin/env python3
"""Do compressed experts merge as well as uncompressed ones? Two LoRAs on SmolLM2-135M, one per
task of ``tools/eval_quality.py`` (BBC News topics and Rotten Tomatoes sentiment), merged with
``compeft merge`` by task arithmetic, TIES and DARE, from the PEFT folders and from their
ComPEFT files, and every merged adapter scored on both tasks.

    python tools/eval_merge.py [--out out/merge] [--adapter lora-r8-attn] [--keep 0.2]

Each merged adapter is written as a file and read back through ``load_adapter``: with
``--density 1 --mode prune`` (the merge alone: every value kept) and, for task arithmetic, also
compressed again at the default density (what ``compeft merge`` writes by default). The experts
and the tasks' splits are those of ``eval_quality.py`` (same seeds, same cache). Rows go to
``results.jsonl``; ``results.md`` holds the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from eval_quality import ADAPTERS, TASKS, load_model, score, smollm2_dir, trained_adapter  # noqa: E402

import compeft_format as cf  # noqa: E402

METHODS = ("task-arithmetic", "ties", "dare")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "merge")
    ap.add_argument("--adapter", default="lora-r8-attn", choices=sorted(a for a in ADAPTERS if a.startswith("lora")))
    ap.add_argument("--keep", type=float, default=0.2, help="TIES' and DARE's kept fraction")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    work = a.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    mdir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(mdir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tasks = {"bbc": TASKS["bbc"](tok, 40), "reviews": TASKS["reviews"](tok, 100)}
    spec = ADAPTERS[a.adapter]
    experts: dict[str, dict[str, Path]] = {}
    for name, task in tasks.items():  # each expert as a PEFT folder and as a ComPEFT file (defaults)
        folder = work / f"{name}-peft"
        if not (folder / "adapter_model.safetensors").is_file():
            trained_adapter(mdir, task, spec, pad).save_pretrained(folder)
        packed = work / f"{name}.cpeft.safetensors"
        cf.save(cf.compress_peft(folder), packed)
        experts[name] = {"uncompressed": folder, "compressed": packed}

    rows: list[dict[str, Any]] = []
    results = a.out / "results.jsonl"
    results.write_text("")

    def evaluate(label: str, adapter: Path | None, inputs: str, nbytes: int | None) -> None:
        row: dict[str, Any] = {"variant": label, "inputs": inputs, "bytes": nbytes}
        t0 = time.time()
        model = load_model(mdir)  # one model with the adapter, scored on every task
        if adapter is not None:
            if adapter.is_dir():
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, adapter)
            else:
                model = cf.load_adapter(model, adapter)
        for name, task in tasks.items():
            row[name] = score(model, task.test, task.label_ids, a.batch, pad)[0]
        row["mean"] = sum(row[n] for n in tasks) / len(tasks)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        with open(results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    evaluate("base model", None, "-", None)
    for name in tasks:
        for inputs, path in experts[name].items():
            size = path.stat().st_size if path.is_file() else (path / "adapter_model.safetensors").stat().st_size
            evaluate(f"{name} expert", path, inputs, size)
    cli = [sys.executable, "-m", "compeft_format.cli", "merge"]
    for inputs in ("uncompressed", "compressed"):
        srcs = [str(experts[n][inputs]) for n in tasks]
        for method in METHODS:
            out = work / f"merged-{method}-{inputs}.cpeft.safetensors"
            subprocess.run(cli + srcs + ["-o", str(out), "--force", "--method", method, "--keep", str(a.keep),
                                         "--density", "1", "--mode", "prune"], check=True)
            evaluate(f"{method}, every value kept", out, inputs, out.stat().st_size)
        out = work / f"merged-task-arithmetic-{inputs}-compressed.cpeft.safetensors"
        subprocess.run(cli + srcs + ["-o", str(out), "--force"], check=True)
        evaluate("task-arithmetic, merged file compressed (defaults)", out, inputs, out.stat().st_size)

    lines = [f"SmolLM2-135M-Instruct, {a.adapter} experts on BBC News ({len(tasks['bbc'].test)} test articles) and "
             f"Rotten Tomatoes ({len(tasks['reviews'].test)} test sentences); TIES and DARE keep {a.keep:g}. "
             "Accuracy on each task's test split.", "",
             "| adapter | inputs | bytes | BBC News | Rotten Tomatoes | mean |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        size = "-" if r["bytes"] is None else f"{r['bytes']:,}"
        lines.append(f"| {r['variant']} | {r['inputs']} | {size} | {r['bbc']:.3f} | {r['reviews']:.3f} "
                     f"| {r['mean']:.3f} |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
