"""Decode on an accelerator: time ``cf.load(path, device=...)`` (streams checked on the host, packed
bytes copied to the device, decoded there by torch operations) against a device-to-device copy of
the decoded fp16 output and against moving the fp16 tensor from the host.

    python tools/bench_device.py [--device cuda] [--out out/bench]

Prints a Markdown table and writes ``bench_device.json``; without an accelerator it says so and
exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compeft_format as cf  # noqa: E402
from bench import timed  # noqa: E402

DENSITIES = (0.01, 0.05, 0.1, 0.2, 0.5)


def synced(fn, device: torch.device):
    """``fn`` followed by waiting for the device, so that ``timed`` measures the work itself (the
    previous call has already waited, so each timing starts with the device idle)."""
    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return call


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    a = ap.parse_args()
    if not a.device.startswith("cuda") or not torch.cuda.is_available():
        print(f"no {a.device} device here", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    n = 1 << 22
    g = torch.Generator().manual_seed(0)
    tensor = {"w": torch.randn(n // 1024, 1024, generator=g).half()}
    host = tensor["w"].pin_memory()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for density in DENSITIES:
            ca = cf.compress(tensor, density=density, dense_patterns=())
            for coding in ("golomb", "bitmap"):
                path = Path(tmp) / f"{coding}-{density}.cpeft.safetensors"
                cf.save(ca, path, positions=coding, zstd_level=None if coding == "bitmap" else 19)
                out = cf.load(path, device=dev, dtype=torch.float16)
                assert torch.equal(out["w"].cpu().view(torch.int16),
                                   ca.state_dict(dtype=torch.float16)["w"].view(torch.int16)), "decode mismatch"
                load_s = timed(synced(lambda p=path: cf.load(p, device=dev, dtype=torch.float16), dev), 21)[0]
                copy_s = timed(synced(lambda o=out: o["w"].clone(), dev), 21)[0]
                h2d_s = timed(synced(lambda: host.to(dev, non_blocking=True), dev), 21)[0]
                rows.append({"density": density, "positions": coding, "file_bytes": path.stat().st_size,
                             "load_s": load_s, "device_copy_s": copy_s, "host_to_device_fp16_s": h2d_s})
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "params": n, "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_device.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"{res['device']}, torch {res['torch']}: {n:,}-entry fp16 tensor, best of 21; load = `cf.load(path, "
          f"device=...)` from a file (digests on the host, packed bytes to the device, decoded there)\n")
    print("| density | positions | file bytes | load | device copy of the output | fp16 host to device |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['density']:.0%} | {r['positions']} | {r['file_bytes']:,} | {r['load_s'] * 1e3:.2f} ms "
              f"| {r['device_copy_s'] * 1e3:.3f} ms | {r['host_to_device_fp16_s'] * 1e3:.3f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
