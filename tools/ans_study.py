#!/usr/bin/env python3
"""ANS on ternary task vectors, for the position-coding choice of spec section 11.

    pip install constriction && python tools/ans_study.py

Codes each element of a random ternary tensor (4,194,304 entries) as one symbol of {0, +, -} with
the i.i.d. model (1 - p, p/2, p/2) using constriction's ANS coder, and prints its size against the
information bound ``log2 C(n, k) + k`` and its encode/decode times on one thread, next to the
library's Golomb coding of the same tensor.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import compeft_format as cf  # noqa: E402
from bench import timed  # noqa: E402


def main() -> int:
    try:
        import constriction
    except ImportError:
        print("needs constriction: pip install constriction", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    n = 1 << 22
    rng = np.random.default_rng(0)
    for p in (0.01, 0.1):
        k = int(round(p * n))
        positions = np.sort(rng.choice(n, k, replace=False))
        signs = rng.random(k) < 0.5
        symbols = np.zeros(n, dtype=np.int32)
        symbols[positions] = 1 + signs
        bound = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2) + k
        model = constriction.stream.model.Categorical(np.array([1 - p, p / 2, p / 2]), perfect=False)

        def encode(symbols=symbols, model=model):
            coder = constriction.stream.stack.AnsCoder()
            coder.encode_reverse(symbols, model)
            return coder.get_compressed()

        compressed = encode()
        decoded = constriction.stream.stack.AnsCoder(compressed).decode(model, n)
        assert np.array_equal(decoded, symbols)
        t_enc, _ = timed(encode, 5)
        t_dec, _ = timed(lambda c=compressed, m=model: constriction.stream.stack.AnsCoder(c).decode(m, n), 5)

        dense = np.zeros(n, dtype=np.float32)
        dense[positions] = np.where(signs, -1.0, 1.0)
        ca = cf.compress({"w": torch.from_numpy(dense).half()}, density=k / n, dense_patterns=())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "g.cpeft.safetensors"
            cf.save(ca, path, positions="golomb")
            r = cf.inspect(path)
            t_golomb, _ = timed(lambda path=path: cf.load(path, dtype=torch.float16), 5)
        print(f"density {p:.0%}: ANS {8 * compressed.nbytes / bound:.4f}x the bound, encode {t_enc * 1e3:.1f} ms, "
              f"decode {t_dec * 1e3:.1f} ms ({t_dec / n * 1e9:.1f} ns per element); Golomb file streams "
              f"{r['ternary_streams_vs_bound']:.4f}x the bound, load and decode to fp16 {t_golomb * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
