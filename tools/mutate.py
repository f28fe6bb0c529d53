#!/usr/bin/env python3
"""Every single-byte change and every truncation of a small valid file: each must be refused with
a ``CompeftError`` or decode to tensors bit-identical to the original's.

    python tools/mutate.py [--file F | --option NAME=VALUE ...] [--stride K] [--out DIR]

Without ``--file`` a small LoRA-like adapter (about 2 KB) is compressed and saved with the default
writer options, changed by each ``--option`` (a ``WriterOptions`` field, its value as JSON). Each byte is XORed with 0xFF and with 0x01, and the file is cut to every length from
0 to its size - 1; with ``--stride K`` only every K-th position and length. Each mutant is read
with ``load`` under the C decoders and under the torch decoders, and checked with ``verify``.

A mutant fails when a read raises anything but a ``CompeftError``, when ``load`` returns tensors
that differ from the original's in any bit, or when ``verify`` accepts a file ``load`` refuses.
Writes ``DIR/mutate.json`` (default ``out/robustness``) and exits 1 when any mutant failed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import compeft_format as cf  # noqa: E402

#: a fixed creation time, so that a saved adapter has the same bytes every time
CREATED_AT = "2026-01-01T00:00:00Z"
LORA_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj"],
               "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
#: how many failing mutants the report describes
EXAMPLES = 20


def lora_state_dict(*, width: int = 256, rank: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA-like state dict: q/k/v factors in float16, bfloat16 and float32, and a dense bias."""
    rng = np.random.default_rng(seed)

    def randn(shape: tuple[int, ...], dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
        return torch.from_numpy((rng.standard_normal(shape) * std).astype(np.float32)).to(dtype)

    sd = {}
    for module, dtype in (("q_proj", torch.float16), ("k_proj", torch.bfloat16), ("v_proj", torch.float32)):
        stem = f"base_model.model.model.layers.0.self_attn.{module}"
        sd[f"{stem}.lora_A.weight"] = randn((rank, width), dtype)
        sd[f"{stem}.lora_B.weight"] = randn((width, rank), dtype, 0.01)
    sd["base_model.model.score.bias"] = randn((6,), torch.float32)
    return sd


def small_adapter(*, width: int = 256, seed: int = 0, **config: Any) -> cf.CompressedAdapter:
    """``lora_state_dict`` compressed (density 0.1 unless ``config`` says otherwise)."""
    config = {"density": 0.1, **config}
    return cf.compress(lora_state_dict(width=width, seed=seed), peft_config=LORA_CONFIG, created_at=CREATED_AT,
                       **config)


def small_file(path: str | os.PathLike[str], **options: Any) -> Path:
    """Save ``small_adapter()`` to ``path`` with ``WriterOptions`` changed by ``options``."""
    cf.save(small_adapter(), path, **options)
    return Path(path)


@contextlib.contextmanager
def decoders(name: str) -> Iterator[None]:
    """Decode with the C extension (``native``) or with the torch code every other device uses
    (``torch``) inside the block."""
    old = os.environ.get("COMPEFT_NATIVE")
    os.environ["COMPEFT_NATIVE"] = "1" if name == "native" else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["COMPEFT_NATIVE"]
        else:
            os.environ["COMPEFT_NATIVE"] = old


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit pattern (-0 differs from +0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                         b.contiguous().reshape(-1).view(torch.uint8))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(bits_equal(a[k], b[k]) for k in a)


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    """A temporary folder in memory (/dev/shm) where there is one."""
    shm = Path("/dev/shm")
    return tempfile.TemporaryDirectory(prefix="compeft-robust-", dir=shm if shm.is_dir() else None)


def mutants(data: bytes, stride: int = 1) -> Iterator[tuple[str, int, bytes]]:
    """(kind, position or length, bytes): each byte XOR 0xFF, each byte XOR 0x01, each truncation."""
    for kind, mask in (("xor_ff", 0xFF), ("xor_01", 0x01)):
        for i in range(0, len(data), stride):
            b = bytearray(data)
            b[i] ^= mask
            yield kind, i, bytes(b)
    for n in range(0, len(data), stride):
        yield "truncate", n, data[:n]


@dataclass
class Outcome:
    """What reading one mutant gave: for ``load`` under each decoder the error code, ``identical``
    or ``different``; for ``verify`` the error code or ``ok``; the first unexpected exception."""

    native: str
    torch: str
    verify: str
    error: str | None = None

    @property
    def failed(self) -> str | None:
        """Why this mutant breaks the guarantee, or None."""
        if self.error is not None:
            return self.error
        if "different" in (self.native, self.torch):
            return f"decoded tensors differ from the original (native: {self.native}, torch: {self.torch})"
        if self.verify == "ok" and self.native != "identical":
            return f"verify accepted a file load refuses ({self.native})"
        return None


def read_mutant(path: Path, original: dict[str, torch.Tensor]) -> Outcome:
    """Read ``path`` as ``load`` (C and torch decoders) and as ``verify`` would."""
    results: dict[str, str] = {}
    error = None
    for name in ("native", "torch", "verify"):
        try:
            with decoders("native" if name == "verify" else name):
                if name == "verify":
                    cf.verify(path)
                    results[name] = "ok"
                else:
                    results[name] = "identical" if same_tensors(cf.load(path), original) else "different"
        except cf.CompeftError as e:
            results[name] = e.code
        except Exception as e:  # noqa: BLE001 - any other exception is what this tool looks for
            results[name] = type(e).__name__
            if error is None:
                error = f"{name}: {''.join(traceback.format_exception_only(e)).strip()}"
    return Outcome(results["native"], results["torch"], results["verify"], error)


def run(data: bytes, *, stride: int = 1) -> dict[str, Any]:
    """Read every mutant of ``data`` (a valid compeft file); the counts as a JSON-ready dict."""
    started = time.perf_counter()
    by_kind: dict[str, dict[str, Any]] = {}
    codes: Counter[str] = Counter()
    identical = verify_refused_identical = disagreements = failures = 0
    examples: list[dict[str, Any]] = []
    with scratch_dir() as tmp:
        path = Path(tmp) / "m.cpeft.safetensors"
        path.write_bytes(data)
        with decoders("native"):
            original = cf.load(path)
            cf.verify(path)
        for kind, where, mutant in mutants(data, stride):
            path.write_bytes(mutant)
            out = read_mutant(path, original)
            k = by_kind.setdefault(kind, {"mutants": 0, "identical": 0, "rejected": Counter()})
            k["mutants"] += 1
            if out.native == "identical":
                k["identical"] += 1
                identical += 1
                verify_refused_identical += out.verify != "ok"
            else:
                k["rejected"][out.native] += 1
                codes[out.native] += 1
            disagreements += out.native != out.torch
            why = out.failed
            if why is not None:
                failures += 1
                if len(examples) < EXAMPLES:
                    examples.append({"kind": kind, "at": where, "why": why, "native": out.native,
                                     "torch": out.torch, "verify": out.verify})
    return {
        "file_bytes": len(data),
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "stride": stride,
        "mutants": sum(k["mutants"] for k in by_kind.values()),
        "identical": identical,
        "rejected": dict(codes.most_common()),
        "by_kind": {kind: {**k, "rejected": dict(k["rejected"].most_common())} for kind, k in by_kind.items()},
        "verify_refused_identical": verify_refused_identical,
        "decoder_disagreements": disagreements,
        "failures": failures,
        "failure_examples": examples,
        "seconds": round(time.perf_counter() - started, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, help="a valid compeft file (default: a small adapter saved here)")
    ap.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                    help="a writer option of the small file, its value as JSON (manifest_encoding='\"json\"')")
    ap.add_argument("--stride", type=int, default=1, help="mutate every K-th byte and length only")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "robustness")
    a = ap.parse_args(argv)
    if a.stride < 1:
        ap.error("--stride must be at least 1")
    options = {}
    for item in a.option:
        name, _, value = item.partition("=")
        try:
            options[name] = json.loads(value)
        except ValueError:
            ap.error(f"--option {item}: the value is not JSON")
    if a.file is None:
        with scratch_dir() as tmp:
            data = small_file(Path(tmp) / "small.cpeft.safetensors", **options).read_bytes()
    elif options:
        ap.error("--option applies to the small file, not to --file")
    else:
        data = a.file.read_bytes()
    report = run(data, stride=a.stride)
    report["file"] = str(a.file) if a.file else f"small_adapter() saved with writer options {options or 'default'}"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "mutate.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['mutants']} mutants of a {report['file_bytes']}-byte file in {report['seconds']:.1f} s: "
          f"{report['identical']} identical, rejected {report['rejected']}, "
          f"{report['decoder_disagreements']} decoder disagreements, {report['failures']} failures")
    for ex in report["failure_examples"]:
        print(f"  FAIL {ex['kind']} at {ex['at']}: {ex['why']}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
