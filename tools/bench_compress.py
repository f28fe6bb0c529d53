#!/usr/bin/env python3
"""Peak memory and time of ``compeft compress`` on a large LoRA adapter.

    python tools/bench_compress.py [--params 160000000] [--rank 64] [--dtype bfloat16] [--out out/bench-compress]

Writes a PEFT folder of random LoRA factors (``--params`` parameters, 2048-wide layers) and runs the
command on it in a fresh process (Linux). The peak is the growth of the resident set from just
before the command (torch and the library already imported) to its highest point: reading,
compressing, writing, verifying the file and measuring its fidelity, as the CLI does. Writes
``compress.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent

_RUN = """
import json, sys, time
import torch
import compeft_format.cli as cli
import compeft_format.compress, compeft_format.fidelity, compeft_format.peft_io, compeft_format.writer

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

torch.set_num_threads(int(sys.argv[3]))
with open("/proc/self/clear_refs", "w") as c:  # the peak resident set starts from here
    c.write("5")
before = kib("VmRSS:")
t = time.perf_counter()
rc = cli.main(["compress", sys.argv[1], "-o", sys.argv[2], "--quiet", "--json"])
seconds = time.perf_counter() - t
print(json.dumps({"rc": rc, "seconds": seconds, "peak_growth_bytes": kib("VmHWM:") - before}), file=sys.stderr)
"""


def write_adapter(folder: Path, params: int, rank: int, dtype: torch.dtype) -> int:
    """A PEFT LoRA folder of about ``params`` parameters (A: rank x 2048, B: 2048 x rank)."""
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    per_module, i = 2 * rank * 2048, 0
    while sum(t.numel() for t in sd.values()) + per_module <= params:
        p = f"base_model.model.model.layers.{i // 7}.mlp.m{i % 7}"
        sd[f"{p}.lora_A.weight"] = (torch.randn(rank, 2048, generator=g) * 0.02).to(dtype)
        sd[f"{p}.lora_B.weight"] = (torch.randn(2048, rank, generator=g) * 0.01).to(dtype)
        i += 1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [f"m{j}" for j in range(7)],
        "task_type": "CAUSAL_LM"}))
    return sum(t.numel() for t in sd.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=160_000_000)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-compress")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "adapter", Path(tmp) / "adapter.cpeft"
        params = write_adapter(src, a.params, a.rank, getattr(torch, a.dtype))
        input_bytes = (src / "adapter_model.safetensors").stat().st_size
        run = subprocess.run([sys.executable, "-c", _RUN, str(src), str(dst), str(a.threads)], cwd=ROOT,
                             capture_output=True, text=True)
        if run.returncode != 0:
            sys.stderr.write(run.stderr)
            return 1
        measured = json.loads(run.stderr.strip().splitlines()[-1])
        summary = json.loads(run.stdout)
    res = {"params": params, "dtype": a.dtype, "rank": a.rank, "threads": a.threads, "input_bytes": input_bytes,
           "file_bytes": summary["file_bytes"], **measured,
           "peak_growth_per_param": measured["peak_growth_bytes"] / params,
           "peak_growth_vs_input": measured["peak_growth_bytes"] / input_bytes}
    (a.out / "compress.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"{params:,} params ({a.dtype}, {input_bytes / 1e6:.0f} MB): compress {res['seconds']:.1f} s, peak growth "
          f"{res['peak_growth_bytes'] / 1e9:.2f} GB ({res['peak_growth_per_param']:.1f} bytes/param, "
          f"{res['peak_growth_vs_input']:.1f}x the input), file {res['file_bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
