#!/usr/bin/env python3
"""End-to-end run on the embedded defaults (the README's first command).

Fine-tunes a LoRA adapter with peft on a small Llama built from a config (nothing downloaded),
compresses it with the ``compeft`` CLI at its defaults, validates and inspects the file, decompresses it to a PEFT folder and reloads that with ``PeftModel.from_pretrained``;
then starts a local Hub-compatible server on 127.0.0.1, pushes the file with ``compeft push``,
pulls it into a fresh cache with ``compeft pull`` (every byte checked) and applies the pulled file
with ``load_adapter``. Reports sizes, timings, validation losses and the share of the fine-tuning
gain the compressed adapter keeps, then sweeps densities for the paper's method and this
project's; exits non-zero if any check fails.

    python tools/demo.py [--out out/demo] [--steps 150] [--density D]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import compeft_format as cf  # noqa: E402

MODEL = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(MODEL).eval()


def batches(seed: int, n: int, batch: int = 16, length: int = 32):
    """A task the random base cannot do: arithmetic sequences x[t+1] = x[t] + 7 (mod 256)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        start = torch.randint(0, 256, (batch, 1), generator=g)
        yield (start + 7 * torch.arange(length)) % 256


def val_loss(model, data) -> float:
    model.eval()
    with torch.no_grad():
        return sum(float(model(input_ids=x, labels=x).loss) for x in data) / len(data)


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    print("$ " + " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    sys.stdout.write(p.stdout)
    if p.returncode not in (0,):
        sys.stderr.write(p.stderr)
        raise SystemExit(f"command failed with exit code {p.returncode}")
    return p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--density", type=float, default=None, help="default: the CLI's")
    a = ap.parse_args()
    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    val = list(batches(seed=99, n=8))

    # 1. fine-tune a LoRA adapter
    t0 = time.perf_counter()
    model = get_peft_model(base_model(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    with model.disable_adapter():
        loss_base = val_loss(model, val)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for x in batches(seed=1, n=a.steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    loss_lora = val_loss(model, val)
    train_s = time.perf_counter() - t0
    lora_dir = a.out / "lora"
    model.save_pretrained(lora_dir)
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    fp16_file = a.out / "adapter_fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in sd.items()}, str(fp16_file))
    n_params = sum(v.numel() for v in sd.values())
    print(f"trained LoRA r=8 on {len(TARGETS)} projections: {n_params:,} params, {a.steps} steps in {train_s:.1f}s")

    def evaluate(tensors):
        set_peft_model_state_dict(model, tensors)
        return -val_loss(model, val)

    # 3. the CLI: compress, validate, inspect, decompress
    packed = a.out / "lora.cpeft.safetensors"
    cli = [sys.executable, "-m", "compeft_format.cli"]
    density = ["--density", str(a.density)] if a.density is not None else []
    run(cli + ["compress", str(lora_dir), "-o", str(packed), "--force", *density])
    run(cli + ["validate", str(packed)])
    run(cli + ["inspect", str(packed)])
    restored = a.out / "restored"
    run(cli + ["decompress", str(packed), "-o", str(restored), "--force"])

    # 4. reload with peft and evaluate
    reloaded = PeftModel.from_pretrained(base_model(), restored).eval()
    loss_ternary = val_loss(reloaded, val)
    ca = cf.compress_peft(lora_dir, cf.CompeftConfig() if a.density is None else cf.CompeftConfig(density=a.density))
    set_peft_model_state_dict(model, ca.state_dict(dtype=torch.float32))
    loss_memory = val_loss(model, val)
    set_peft_model_state_dict(model, sd)

    # 5. share it through a Hub: a local server, the real huggingface_hub client underneath
    from compeft_format.hub.server import make_server

    token = secrets.token_hex(16)
    server = make_server(a.out / "hub", token=token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    hub_env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        t = time.perf_counter()
        run(cli + ["push", str(packed), "demo/tiny-llama-lora"], env=hub_env)
        push_s = time.perf_counter() - t
        t = time.perf_counter()
        run(cli + ["pull", "demo/tiny-llama-lora", "-o", str(a.out / "pulled"), "--cache-dir",
                   str(a.out / "hf-cache")], env=hub_env)
        pull_s = time.perf_counter() - t
    finally:
        server.shutdown()
        server.server_close()
    t = time.perf_counter()
    from_hub = cf.load_adapter(base_model(), a.out / "pulled" / packed.name).eval()
    apply_s = time.perf_counter() - t
    loss_hub = val_loss(from_hub, val)

    # 6. the size / quality trade-off: the paper's method (alpha picked on validation) against this
    # project's default method, data-free and with alpha picked on validation
    sweep = []
    for density in (0.05, 0.1, 0.2, 0.5):
        for method, search in (("paper", True), ("fit", False), ("fit", True)):
            c = cf.compress_peft(lora_dir, cf.CompeftConfig.method(method, density=density))
            best_alpha = 1.0
            if search:
                grid = cf.calibrate.PAPER_ALPHAS if method == "paper" else cf.calibrate.FIT_ALPHAS
                best_alpha, _, c = cf.alpha_search(evaluate, c, grid=grid)
            f = a.out / f"sweep_{method}_{density}.cpeft.safetensors"
            cf.save(c, f)
            reloaded_sweep = cf.load_adapter(base_model(), f).eval()
            loss = val_loss(reloaded_sweep, val)
            sweep.append({"density": density, "method": method + (" (alpha on val)" if search else ""),
                          "alpha": best_alpha, "bytes": f.stat().st_size,
                          "ratio_vs_fp16": fp16_file.stat().st_size / f.stat().st_size, "val_loss": loss,
                          "gain_kept": (loss_base - loss) / (loss_base - loss_lora)})
            f.unlink()
    set_peft_model_state_dict(model, sd)

    r = cf.inspect(packed)
    summary = {
        "adapter_params": n_params,
        "density": r["compression"]["density"],
        "alpha": r["compression"]["alpha"],
        "method": "fit" if r["compression"].get("options") else "paper",
        "gain_kept": (loss_base - loss_ternary) / (loss_base - loss_lora),
        "bytes": {
            "peft_fp32_safetensors": (lora_dir / "adapter_model.safetensors").stat().st_size,
            "fp16_safetensors": fp16_file.stat().st_size,
            "compeft": r["file_bytes"],
            "compeft_header": r["header_bytes"],
            "information_bound": round(r["bound_bits"] / 8),
        },
        "bits_per_param": r["bits_per_param"],
        "ratio_vs_fp16": fp16_file.stat().st_size / r["file_bytes"],
        "ratio_vs_fp32": (lora_dir / "adapter_model.safetensors").stat().st_size / r["file_bytes"],
        "file_vs_bound": r["file_vs_bound"],
        "val_loss": {"base": loss_base, "lora": loss_lora, "compeft_reloaded": loss_ternary,
                     "compeft_pulled_from_hub": loss_hub},
        "hub_seconds": {"push": push_s, "pull": pull_s, "load_adapter": apply_s},
        "sweep": sweep,
    }
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    b = summary["bytes"]
    print()
    print(f"{'':28}{'bytes':>10}")
    print(f"{'LoRA, peft fp32':28}{b['peft_fp32_safetensors']:>10,}")
    print(f"{'LoRA, fp16 safetensors':28}{b['fp16_safetensors']:>10,}")
    print(f"{'compeft file':28}{b['compeft']:>10,}   ({r['bits_per_param']:.3f} bits/param, "
          f"{summary['ratio_vs_fp16']:.1f}x smaller than fp16, {summary['ratio_vs_fp32']:.1f}x than fp32, "
          f"{r['file_vs_bound']:.2f}x the information bound)")
    print(f"validation loss: base {loss_base:.4f}, LoRA {loss_lora:.4f}, compeft (reloaded via peft) {loss_ternary:.4f}, "
          f"pulled from the Hub {loss_hub:.4f}")
    print(f"the compressed adapter (CLI defaults: density {summary['density']:g}, method {summary['method']}) keeps "
          f"{summary['gain_kept']:.0%} of the LoRA's validation-loss gain over the base model")
    print(f"hub round trip: push {push_s:.2f}s, pull with verification {pull_s:.2f}s (both CLI processes), "
          f"load_adapter {1000 * apply_s:.0f} ms; {r['file_bytes']:,} bytes moved instead of "
          f"{fp16_file.stat().st_size:,} (fp16)")
    print()
    print("density  method                alpha   bytes  x fp16  val loss  gain kept")
    for row in sweep:
        print(f"{row['density']:>7}  {row['method']:<20}  {row['alpha']:>5g}  {row['bytes']:>6,}  "
              f"{row['ratio_vs_fp16']:>6.1f}  {row['val_loss']:.4f}  {row['gain_kept']:>8.0%}")
    print(f"summary written to {a.out / 'summary.json'}")

    problems = []
    if abs(loss_ternary - loss_memory) > 1e-5:
        problems.append(f"reloaded adapter loss {loss_ternary} != in-memory compressed adapter loss {loss_memory}")
    if abs(loss_hub - loss_memory) > 1e-5:
        problems.append(f"adapter pulled from the Hub: loss {loss_hub} != in-memory compressed adapter loss {loss_memory}")
    if (a.out / "pulled" / packed.name).read_bytes() != packed.read_bytes():
        problems.append("the pulled file differs from the pushed one")
    if not loss_lora < loss_base:
        problems.append("fine-tuning did not lower the validation loss")
    if not loss_ternary < loss_base:
        problems.append("the compressed adapter lost all of the fine-tuning gain")
    if summary["ratio_vs_fp16"] < 10:
        problems.append(f"compressed file is only {summary['ratio_vs_fp16']:.1f}x smaller than fp16")
    for p in problems:
        print(f"CHECK FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
