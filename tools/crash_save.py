#!/usr/bin/env python3
"""Writers killed mid-save: a child process saves a large-ish file over the same destination again
and again and is killed with SIGKILL after a random delay. The destination must then be absent or
the complete file (``verify`` passes, same tensors and metadata), never a truncated one, and what
a killed writer leaves in the folder (its temporary folder, and the temporary file safetensors
writes through) must be gone after the next save to that destination.

    python tools/crash_save.py [--trials 50] [--mb 16] [--seed 1] [--dir DIR] [--out DIR]

Each trial: start a child that builds the adapter (``--mb`` MB of float32 values, stored dense and
raw, so that writing takes most of a save) and then calls ``compeft_format.save`` in a loop; wait
until it has built the adapter; sleep a random delay of up to four save times; SIGKILL it; look at
the destination and count the other files in its folder; save once more from this process and count
them again. Writes ``DIR/crash_save.json`` (default ``out/robustness``) and exits 1 when a trial
found a truncated or corrupt destination or a temporary file that outlived the next save.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import compeft_format as cf  # noqa: E402
from compeft_format.container import read_safetensors_header  # noqa: E402
from compeft_format.fileio import sha256_of_file  # noqa: E402
from compeft_format.writer import build  # noqa: E402

DEST = "adapter.cpeft.safetensors"
#: raw streams: no zstd, so that the time goes into writing the file
OPTIONS = {"zstd_level": None}


def large_adapter(mb: int) -> cf.CompressedAdapter:
    """``mb`` MB of float32 values in 1 MB tensors, stored dense (the same values every time)."""
    rng = np.random.default_rng(0)
    sd = {f"layers.{i}.weight": torch.from_numpy(rng.standard_normal((256, 1024)).astype(np.float32))
          for i in range(mb)}
    return cf.compress(sd, density=1.0, dense_patterns=("*",), created_at="2026-01-01T00:00:00Z")


def child(dest: Path, mb: int) -> None:
    """Save over ``dest`` until killed, printing ``ready`` once built and ``saved`` after each save."""
    adapter = large_adapter(mb)
    build(adapter, **OPTIONS)  # warm up: the first save is not slower than the others
    print("ready", flush=True)
    while True:
        cf.save(adapter, dest, **OPTIONS)
        print("saved", flush=True)


def content(path: Path) -> tuple[Any, ...]:
    """What a saved file holds: tensor entries, metadata and the sha256 of the data section (the
    order of the metadata keys changes from process to process: safetensors keeps them in a hash
    map)."""
    header, meta, start = read_safetensors_header(path)
    with open(path, "rb") as f:
        f.seek(start)
        return header, meta, sha256_of_file(f)


def file_state(path: Path, reference: tuple[Any, ...]) -> str:
    """``absent``, ``complete`` (``verify`` passes and it holds what the reference holds) or what
    is wrong."""
    if not path.exists():
        return "absent"
    size = path.stat().st_size
    try:
        cf.verify(path)
    except cf.CompeftError as e:
        return f"invalid ({e.code}, {size} bytes)"
    return "complete" if content(path) == reference else f"different ({size} bytes)"


def others(folder: Path) -> list[str]:
    """Every name in ``folder`` but the destination's: what killed writers left."""
    return sorted(p.name for p in folder.iterdir() if p.name != DEST)


def run(trials: int, *, mb: int = 16, seed: int = 1, folder: Path | None = None) -> dict[str, Any]:
    """Run ``trials`` kills; the counts as a JSON-ready dict."""
    rng = random.Random(seed)
    adapter = large_adapter(mb)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        work = Path(tmp)
        ref = work / "reference" / DEST
        ref.parent.mkdir()
        t = time.perf_counter()
        cf.save(adapter, ref, **OPTIONS)
        save_s = time.perf_counter() - t
        reference, ref_size = content(ref), ref.stat().st_size
        box = work / "box"
        box.mkdir()
        dest = box / DEST
        states: Counter[str] = Counter()
        rows: list[dict[str, Any]] = []
        lingering: list[str] = []  # what the previous next save left
        for i in range(trials):
            proc = subprocess.Popen([sys.executable, __file__, "--child", str(dest), "--mb", str(mb)],
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                proc.kill()
                raise RuntimeError(f"the child did not start (exit {proc.wait()})")
            delay = rng.uniform(0.0, 4.0 * save_s)
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            saves = proc.stdout.read().split().count("saved")
            proc.stdout.close()
            state = file_state(dest, reference)
            left = [n for n in others(box) if n not in lingering]
            cf.save(adapter, dest, **OPTIONS)  # the next save
            lingering = others(box)
            states[state.split(" ")[0]] += 1
            rows.append({"trial": i, "delay_s": round(delay, 4), "saves_before_kill": saves, "state": state,
                         "left_by_kill": left, "left_after_next_save": lingering})
        bad = [r for r in rows if r["state"] not in ("absent", "complete") or r["left_after_next_save"]]
        return {
            "trials": trials, "file_bytes": ref_size, "save_s": round(save_s, 4), "seed": seed,
            "states": dict(states),
            "truncated_or_corrupt": sum(r["state"] not in ("absent", "complete") for r in rows),
            "kills_that_left_a_temp_file": sum(bool(r["left_by_kill"]) for r in rows),
            "temp_files_left_after_next_save": len({n for r in rows for n in r["left_after_next_save"]}),
            "saves_completed_by_children": sum(r["saves_before_kill"] for r in rows),
            "failures": len(bad),
            "rows": rows,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--mb", type=int, default=16, help="size of the saved file in MB")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", type=Path, help="folder for the trials' files (default: the system's temporary folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "robustness")
    ap.add_argument("--child", type=Path, metavar="DEST", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        child(a.child, a.mb)
        return 0
    report = run(a.trials, mb=a.mb, seed=a.seed, folder=a.dir)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "crash_save.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['trials']} kills of a writer saving {report['file_bytes']:,} bytes ({report['save_s']:.3f} s a "
          f"save): destination {report['states']}, {report['truncated_or_corrupt']} truncated or corrupt; "
          f"{report['kills_that_left_a_temp_file']} kills left a temporary file, "
          f"{report['temp_files_left_after_next_save']} left after the next save")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
