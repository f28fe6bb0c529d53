#!/usr/bin/env python3
"""Coverage-guided fuzzing of the reader: every input is written to a file and read the ways a
user reads one; any exception that is not a ``CompeftError`` is a finding.

    python tools/fuzz.py --target raw|manifest [--runs N] [--seconds S] [--seed N] [--out DIR]
                         [--engine atheris|random] [--memory-limit-mb M] [--validate-every K]

Targets:
  raw       the file's bytes, changed by libFuzzer's mutators (bit flips, inserted, erased and
            copied bytes, tokens of the format and the values the code compared against).
  manifest  structure-aware: the file is taken apart, its manifest JSON gets values replaced,
            keys dropped or added, elements duplicated or swapped, numbers nudged, strings
            edited, or a stream's bytes changed (inside its zstd frame when it has one); then the
            file is put back together with every digest the change touched recomputed (stream
            sha256, sizes, the manifest's digest), so that it passes the digest checks and reaches
            the manifest rules and the decoders.

Seeds: the files of spec/vectors and small adapters saved here with several writer options. Each
input is read with ``verify`` (which opens it), and when it opens, with ``load`` under the C
decoders and under the torch decoders and with ``read``; every ``--validate-every``-th input also
goes through ``compeft validate --json``. Besides exceptions, disagreements are counted: the two
decoders accepting different inputs or decoding different tensors, ``validate`` answering otherwise
than ``verify``.

Engine ``atheris`` (the default when it is installed) runs libFuzzer with branch coverage of
``compeft_format``; ``random`` is a seeded mutation fuzzer without coverage, with the same
mutators, for machines without atheris. ``--memory-limit-mb`` caps this process's address space,
so that a file declaring more output than that gets a failed allocation (which the reader must
report as a typed error) instead of the machine's memory.

Writes ``DIR/summary-<target>.json`` (default DIR: ``out/robustness``), also every 10 s while it
runs: inputs, exec/s, slowest input, inputs over 1 s, peak RSS, rejection codes, findings. Inputs
that raised are saved under ``DIR/findings/`` with their traceback, inputs over 1 s under
``DIR/slow/``; the coverage corpus grows in ``DIR/corpus-<target>/``. Exits 1 when there were
findings or disagreements.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import hashlib
import io
import json
import os
import random
import resource
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

try:
    import atheris
except ImportError:  # the random engine needs no coverage
    atheris = None

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def _coverage() -> contextlib.AbstractContextManager[Any]:
    """Modules imported inside report their branches to atheris (compeft_format only, and only
    when nothing imported it before)."""
    if atheris is None or "compeft_format" in sys.modules:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["compeft_format"])


with _coverage():
    import compeft_format as cf
    from compeft_format import cli
    from compeft_format import constants as C
    from compeft_format.framing import frame
    from compeft_format.manifest import decode_manifest_text, manifest_dictionary

from mutate import CREATED_AT, bits_equal, decoders, lora_state_dict, scratch_dir, small_adapter  # noqa: E402

TARGETS = ("raw", "manifest")
#: an input slower than this is flagged and saved
SLOW_S = 1.0
#: at most this many saved inputs per kind of finding
SAVED_PER_KIND = 5
#: the summary is rewritten this often while the run goes on
SUMMARY_EVERY_S = 10.0


# ---------------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------------
def fresh_files(folder: Path) -> list[Path]:
    """Small files saved with this library: each position coding, encoding, manifest encoding,
    zstd-framed streams, per-tensor digests."""
    # values on a coarse grid: their streams shrink under zstd, so the file holds zstd frames
    tied = {k: (v.float() * 4).round().to(v.dtype) / 4 for k, v in lora_state_dict(width=32).items()}
    variants: list[tuple[str, cf.CompressedAdapter, dict[str, Any]]] = [
        ("golomb", small_adapter(width=32), {"positions": "golomb"}),
        ("bitmap", small_adapter(width=32), {"positions": "bitmap", "manifest_encoding": "json",
                                             "tensor_digests": True}),
        ("prune", small_adapter(width=32, mode="prune", scope="tensor"),
         {"manifest_encoding": C.MANIFEST_ZSTD_BASE64}),
        ("paper", small_adapter(width=32, method="paper", density=0.5), {"positions": "bitmap"}),
        ("zstd", cf.compress(tied, mode="prune", density=0.6, dense_patterns=("*bias",), created_at=CREATED_AT),
         {"positions": "bitmap", "zstd_level": 19}),
    ]
    out = []
    for name, adapter, options in variants:
        path = folder / f"fresh_{name}.cpeft.safetensors"
        cf.save(adapter, path, **options)
        out.append(path)
    return out


def seed_inputs(folder: Path) -> list[bytes]:
    """The conformance vectors (valid and invalid) and ``fresh_files``."""
    vectors = sorted((ROOT / "spec" / "vectors").glob("*.safetensors")) + [ROOT / "spec/vectors/bad_not_safetensors.bin"]
    return [p.read_bytes() for p in vectors + fresh_files(folder)]


def format_tokens() -> list[str]:
    """Every short text constant of the format (key names, encodings, roles, dtypes, codes)."""
    return sorted({v for k, v in vars(C).items() if k.isupper() and isinstance(v, str) and 0 < len(v) <= 40})


# ---------------------------------------------------------------------------------------------
# taking a file apart and putting it back together
# ---------------------------------------------------------------------------------------------
@dataclass
class Parts:
    """A safetensors file: tensor entries (dtype and shape; offsets are recomputed), their bytes in
    file order, ``__metadata__``, and the manifest parsed from it."""

    entries: dict[str, dict[str, Any]]
    data: dict[str, bytes]
    meta: dict[str, str]
    manifest: Any
    encoding: str


def split(raw: bytes) -> Parts | None:
    """Take a compeft file apart; None when it is not one that can be put back together."""
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        meta = header.pop("__metadata__")
        encoding = meta.get(C.META_MANIFEST_ENCODING, C.MANIFEST_JSON)
        manifest = json.loads(decode_manifest_text(meta[C.META_MANIFEST], encoding))
        start = 8 + n
        order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
        data = {k: raw[start + header[k]["data_offsets"][0]:start + header[k]["data_offsets"][1]] for k in order}
        entries = {k: {"dtype": header[k]["dtype"], "shape": header[k]["shape"]} for k in order}
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, struct.error, RecursionError,
            cf.CompeftError):
        return None
    return Parts(entries, data, dict(meta), manifest, encoding)


def encode_manifest(text: str, encoding: str) -> str:
    """``manifest.encode_manifest_text`` at zstd level 1 (the writer's level 19 would take most of
    the fuzzer's time)."""
    if encoding == C.MANIFEST_JSON:
        return text
    dictionary = manifest_dictionary() if encoding == C.MANIFEST_ZSTD_DICT1_BASE64 else None
    return base64.b64encode(frame(text.encode("utf-8"), C.COMP_ZSTD, 1, dictionary=dictionary)).decode("ascii")


def join(p: Parts) -> bytes:
    """The file of ``p``: the manifest stored with its encoding and its digest, offsets laid out
    one after another, the header padded to 8 bytes as safetensors pads it."""
    text = json.dumps(p.manifest, separators=(",", ":"), ensure_ascii=False)
    meta = dict(p.meta)
    try:
        meta[C.META_MANIFEST] = encode_manifest(text, p.encoding)
    except (UnicodeEncodeError, cf.CompeftError):  # lone surrogates cannot be compressed; stored as JSON
        meta[C.META_MANIFEST] = text
        meta[C.META_MANIFEST_ENCODING] = C.MANIFEST_JSON
    meta[C.META_MANIFEST_SHA256] = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name, entry in p.entries.items():
        size = len(p.data.get(name, b""))
        header[name] = {**entry, "data_offsets": [offset, offset + size]}
        offset += size
    h = json.dumps(header, separators=(",", ":")).encode("utf-8", "surrogatepass")
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(p.data.get(name, b"") for name in p.entries)


# ---------------------------------------------------------------------------------------------
# mutators
# ---------------------------------------------------------------------------------------------
INTS = [0, 1, -1, 2, 3, 7, 8, 9, 63, 64, 255, 256, 1023, 1024, 65535, 65536, 2**31 - 1, 2**31, 2**32, 2**36,
        2**36 + 1, 2**53 + 1, 2**63, 2**64, 10**30]
FLOATS = [0.0, -0.0, 0.5, 1.0, -1.0, 1e-45, 1.4e-45, 1e-39, 3.4028235e38, 3.5e38, 1e308, 5e-324, 0.1,
          float("nan"), float("inf"), float("-inf")]
TEXT = ["", "\u0000", "\ud800", "\u00e9", "x" * 1100, "g0.signs", "g0.values", "1.3", "1.4", "2.0", "01.3", "LORA"]


class Mutator:
    """Structure-aware changes to a compeft file (target ``manifest``) and byte-level changes
    (target ``raw``, for the engine without libFuzzer); every choice comes from ``rng``."""

    def __init__(self, seeds: list[bytes]) -> None:
        self.seeds = seeds
        self.parsed = [s for s in seeds if split(s) is not None]
        self.tokens = format_tokens()
        self.ops: list[Callable[[Parts, random.Random], None]] = [
            self.replace_value, self.replace_value, self.drop, self.duplicate, self.add_key, self.swap,
            self.nudge, self.nudge, self.edit_text, self.metadata, self.stream_bytes, self.stream_bytes,
            self.stream_bytes, self.reencode,
        ]

    # -- values ------------------------------------------------------------------------------
    def value(self, rng: random.Random, old: Any = None) -> Any:
        """A value likely to matter: a boundary, a token of the format, a container, a part of
        the manifest."""
        kind = rng.randrange(8)
        if kind == 0 or (kind == 1 and isinstance(old, int)):
            v = rng.choice(INTS)
            return -v if rng.random() < 0.2 else v
        if kind == 1 or (kind == 2 and isinstance(old, float)):
            return rng.choice(FLOATS)
        if kind == 2:
            return rng.choice(self.tokens)
        if kind == 3:
            return rng.choice(TEXT)
        if kind == 4:
            return rng.choice([None, True, False, [], {}, [0], [1, -1], {"": None}])
        if kind == 5:
            depth = rng.choice([2, 100, 500, 900])
            nested: Any = 0
            for _ in range(depth):
                nested = [nested]
            return nested
        if kind == 6 and isinstance(old, list | dict):
            return copy.deepcopy(old) if rng.random() < 0.5 else []
        return rng.choice([old, str(old), [old]]) if old is not None else rng.choice(self.tokens)

    @staticmethod
    def slots(node: Any) -> list[tuple[Any, Any]]:
        """(container, key) of every value below ``node``."""
        out: list[tuple[Any, Any]] = []
        stack = [node]
        while stack:
            n = stack.pop()
            items = n.items() if isinstance(n, dict) else enumerate(n) if isinstance(n, list) else ()
            for k, v in items:
                out.append((n, k))
                stack.append(v)
        return out

    def slot(self, p: Parts, rng: random.Random, want: type | tuple[type, ...] = object) -> tuple[Any, Any] | None:
        found = [s for s in self.slots(p.manifest) if isinstance(s[0][s[1]], want)]
        return rng.choice(found) if found else None

    # -- manifest operations -------------------------------------------------------------------
    def replace_value(self, p: Parts, rng: random.Random) -> None:
        s = self.slot(p, rng)
        if s:
            s[0][s[1]] = self.value(rng, s[0][s[1]])

    def drop(self, p: Parts, rng: random.Random) -> None:
        s = self.slot(p, rng)
        if s:
            del s[0][s[1]]

    def duplicate(self, p: Parts, rng: random.Random) -> None:
        s = self.slot(p, rng)
        if s and isinstance(s[0], list):
            s[0].insert(s[1], copy.deepcopy(s[0][s[1]]))

    def add_key(self, p: Parts, rng: random.Random) -> None:
        objects = [p.manifest] + [c[k] for c, k in self.slots(p.manifest) if isinstance(c[k], dict)]
        obj = rng.choice(objects) if isinstance(p.manifest, dict) else None
        if obj is not None:
            obj[rng.choice(self.tokens + ["scale", "offset", "sha256", "decoded_sha256", "x"])] = self.value(rng)

    def swap(self, p: Parts, rng: random.Random) -> None:
        found = self.slots(p.manifest)
        if len(found) >= 2:
            (a, i), (b, j) = rng.sample(found, 2)
            with contextlib.suppress(KeyError, IndexError):  # one may hold the other
                a[i], b[j] = copy.deepcopy(b[j]), copy.deepcopy(a[i])

    def nudge(self, p: Parts, rng: random.Random) -> None:
        s = self.slot(p, rng, (int, float))
        if s is None or isinstance(s[0][s[1]], bool):
            return
        v = s[0][s[1]]
        if isinstance(v, int):
            s[0][s[1]] = rng.choice([v + 1, v - 1, v * 2, v // 2, -v, v + 8, v - 8, v + 2**32])
        else:
            s[0][s[1]] = rng.choice([v * 2, v / 2, -v, v + 1e-7, v * (1 + 2**-24), float(round(v, 1))])

    def edit_text(self, p: Parts, rng: random.Random) -> None:
        s = self.slot(p, rng, str)
        if s is None:
            return
        v: str = s[0][s[1]]
        i = rng.randrange(len(v) + 1)
        c = rng.choice(["", "0", "a", ".", "*", "\u00ff", "\ud800", "\n", "(", "{"])
        s[0][s[1]] = rng.choice([v[:i] + c + v[i:], v[:i] + c + v[i + 1:], v.upper(), v * 2, v[:i]])

    def metadata(self, p: Parts, rng: random.Random) -> None:
        key = rng.choice([C.META_VERSION, C.META_FORMAT, C.META_MANIFEST_ENCODING, "x"])
        p.meta[key] = rng.choice(self.tokens + TEXT)
        if key == C.META_MANIFEST_ENCODING and p.meta[key] in C.MANIFEST_ENCODINGS:
            p.encoding = p.meta[key]

    def reencode(self, p: Parts, rng: random.Random) -> None:
        p.encoding = rng.choice(C.MANIFEST_ENCODINGS)
        p.meta[C.META_MANIFEST_ENCODING] = p.encoding

    # -- stream operations ---------------------------------------------------------------------
    def stream_infos(self, p: Parts) -> list[dict[str, Any]]:
        """The manifest's stream objects whose names are U8 tensors of the file."""
        out = []
        for c, k in self.slots(p.manifest):
            s = c[k]
            if isinstance(s, dict) and isinstance(s.get("name"), str) and s["name"] in p.data:
                out.append(s)
        return out

    def stream_bytes(self, p: Parts, rng: random.Random) -> None:
        """Change a stream's bytes (its raw bytes inside a zstd frame) and record the new sizes
        and sha256, so that the change reaches the decoders."""
        infos = self.stream_infos(p)
        if not infos:
            return
        info = rng.choice(infos)
        name = info["name"]
        stored = p.data[name]
        same_size = rng.random() < 0.8
        if info.get("compression") == C.COMP_ZSTD:
            try:
                raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=1 << 24)
            except zstandard.ZstdError:
                return
            raw = self.bytes_(raw, rng, same_size)
            stored = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(raw)
            info["raw_size"] = len(raw)
        else:
            stored = self.bytes_(stored, rng, same_size)
            info["raw_size"] = len(stored)
        p.data[name] = stored
        p.entries[name] = {"dtype": "U8", "shape": [len(stored)]}
        info["size"] = len(stored)
        info["sha256"] = hashlib.sha256(stored).hexdigest()

    @staticmethod
    def bytes_(data: bytes, rng: random.Random, same_size: bool = False) -> bytes:
        """One to four byte-level changes; ``same_size`` keeps the length."""
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4 if same_size or not b else 8)
            i = rng.randrange(len(b)) if b else 0
            if op == 0 and b:
                b[i] ^= 1 << rng.randrange(8)
            elif op == 1 and b:
                b[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFE, 0xFF])
            elif op == 2 and b:
                n = rng.randint(1, 16)
                b[i:i + n] = bytes([rng.choice([0, 0xFF])]) * len(b[i:i + n])
            elif op == 3 and len(b) > 1:
                j = rng.randrange(len(b))
                b[i], b[j] = b[j], b[i]
            elif op == 4:
                b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif op == 5:
                del b[i:i + rng.randint(1, 8)]
            elif op == 6:
                del b[rng.randrange(len(b) + 1):]
            elif op == 7:
                j = rng.randrange(len(b))
                b[i:i] = b[j:j + rng.randint(1, 64)]
        return bytes(b)

    # -- whole inputs --------------------------------------------------------------------------
    def manifest_input(self, data: bytes, rng: random.Random) -> bytes:
        """One to three structure-aware changes to ``data`` (a seed when it does not parse)."""
        parts = split(data)
        if parts is None:
            parts = split(rng.choice(self.parsed))
        assert parts is not None
        for _ in range(rng.randint(1, 3)):
            # a change that does not apply (a deeply nested value met copy, a key went missing, an
            # infinite number met an integer operation) is skipped
            with contextlib.suppress(RecursionError, ValueError, OverflowError, TypeError, KeyError, IndexError):
                rng.choice(self.ops)(parts, rng)
        try:
            return join(parts)
        except (RecursionError, ValueError):
            return data

    def raw_input(self, data: bytes, rng: random.Random) -> bytes:
        """Byte-level changes, tokens of the format written over bytes, or a splice of two seeds."""
        r = rng.random()
        if r < 0.1:
            other = rng.choice(self.seeds)
            i, j = rng.randrange(len(data) + 1), rng.randrange(len(other) + 1)
            return data[:i] + other[j:]
        if r < 0.3 and data:
            token = json.dumps(rng.choice(self.tokens + [str(v) for v in INTS])).encode()
            i = rng.randrange(len(data))
            return data[:i] + token + data[i + len(token):]
        if r < 0.4 and len(data) >= 8:
            return struct.pack("<Q", rng.choice(INTS) % 2**64) + data[8:]
        return self.bytes_(data, rng)


# ---------------------------------------------------------------------------------------------
# running inputs
# ---------------------------------------------------------------------------------------------
@dataclass
class Stats:
    inputs: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    findings: int = 0
    finding_kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    disagreements: Counter[str] = field(default_factory=Counter)
    validated: int = 0
    slowest_s: float = 0.0
    slowest_sha256: str = ""
    slow_inputs: int = 0
    busy_s: float = 0.0


class Harness:
    """Reads one input the ways a user reads a file and records what happened."""

    def __init__(self, out: Path, target: str, validate_every: int) -> None:
        self.out, self.target, self.validate_every = out, target, validate_every
        self.stats = Stats()
        self._scratch = scratch_dir()
        self.path = Path(self._scratch.name) / "input.cpeft.safetensors"

    def close(self) -> None:
        self._scratch.cleanup()

    def __call__(self, data: bytes) -> None:
        st = self.stats
        t = time.perf_counter()
        self.path.write_bytes(data)
        problems: list[tuple[str, str]] = []
        outcome = self.read(problems)
        st.inputs += 1
        if st.inputs % self.validate_every == 0:
            self.validate(outcome, problems)
        dt = time.perf_counter() - t
        st.busy_s += dt
        if outcome == "ok":
            st.accepted += 1
        else:
            st.rejected[outcome] += 1
        sha = hashlib.sha256(data).hexdigest()
        if dt > st.slowest_s:
            st.slowest_s, st.slowest_sha256 = dt, sha
        if dt > SLOW_S:
            st.slow_inputs += 1
            self.save("slow", f"{self.target}-{sha[:16]}", data, f"{dt:.3f} s, outcome {outcome}\n")
        for kind, detail in problems:
            self.record(kind, detail, data, sha)

    # -- one input -----------------------------------------------------------------------------
    def guarded(self, name: str, fn: Callable[[], Any], problems: list[tuple[str, str]]) -> tuple[bool, Any]:
        """(True, result), (False, error code), or (False, exception name) with a problem noted."""
        try:
            return True, fn()
        except cf.CompeftError as e:
            return False, e.code
        except Exception as e:  # noqa: BLE001 - any other exception is a finding
            tb = traceback.extract_tb(e.__traceback__)
            where = next((f for f in reversed(tb) if "compeft_format" in f.filename), tb[-1] if tb else None)
            place = f"{Path(where.filename).name}:{where.lineno}" if where else "?"
            problems.append((f"exception {type(e).__name__} in {name} at {place}",
                             "".join(traceback.format_exception(e))))
            return False, type(e).__name__

    def read(self, problems: list[tuple[str, str]]) -> str:
        """``open_file`` and ``verify``; when the file opens, also ``state_dict`` (what ``load``
        returns) under both decoders and ``compressed`` (what ``read`` returns), the file closed in
        between so that nothing decoded is reused. The outcome is ``ok`` or the error code of
        ``open_file`` or ``verify``."""
        opened, f = self.guarded("open_file", lambda: cf.open_file(self.path), problems)
        if not opened:
            return str(f)

        def decode(name: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
            f.close()
            with decoders("torch" if name.endswith("[torch]") else "native"):
                return self.guarded(name, fn, problems)

        with f:
            ok, v = decode("verify", f.verify)
            ok_n, a = decode("load[native]", f.state_dict)
            ok_t, b = decode("load[torch]", f.state_dict)
            decode("read", f.compressed)
        if ok_n != ok_t:
            problems.append(("disagreement: native and torch decoders", f"native: {a if not ok_n else 'ok'}, "
                             f"torch: {b if not ok_t else 'ok'}"))
        elif ok_n and not (list(a) == list(b) and all(bits_equal(a[k], b[k]) for k in a)):
            problems.append(("disagreement: native and torch tensors", "decoded tensors differ"))
        elif not ok_n and a != b:
            self.stats.disagreements["error codes (native, torch)"] += 1
        if ok and not ok_n:
            problems.append(("disagreement: verify accepts, load refuses", f"load: {a}"))
        return "ok" if ok else str(v)

    def validate(self, outcome: str, problems: list[tuple[str, str]]) -> None:
        """``compeft validate --json``: the same verdict and code as ``verify``, exit 0 or 1."""
        self.stats.validated += 1
        out, err = io.StringIO(), io.StringIO()

        def run() -> int:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                return cli.main(["validate", "--json", str(self.path)])

        ok, rc = self.guarded("compeft validate", run, problems)
        if not ok:
            return
        try:
            line = json.loads(out.getvalue())
        except ValueError:
            problems.append(("disagreement: validate output", out.getvalue()[:500]))
            return
        expected = {"valid": True} if outcome == "ok" else {"valid": False, "code": outcome}
        got = {k: line.get(k) for k in expected}
        if got != expected or rc != (0 if outcome == "ok" else 1):
            problems.append(("disagreement: validate and verify", f"validate {line} exit {rc}, verify {outcome}"))

    # -- records ---------------------------------------------------------------------------------
    def record(self, kind: str, detail: str, data: bytes, sha: str) -> None:
        st = self.stats
        if kind.startswith("disagreement"):
            st.disagreements[kind.removeprefix("disagreement: ")] += 1
        else:
            st.findings += 1
        entry = st.finding_kinds.setdefault(kind, {"count": 0, "saved": []})
        entry["count"] += 1
        if len(entry["saved"]) < SAVED_PER_KIND:
            name = f"{self.target}-{sha[:16]}-{hashlib.sha256(kind.encode()).hexdigest()[:6]}"
            self.save("findings", name, data, f"{kind}\n\n{detail}\n")
            entry["saved"].append(f"findings/{name}.bin")

    def save(self, folder: str, name: str, data: bytes, note: str) -> None:
        d = self.out / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.bin").write_bytes(data)
        (d / f"{name}.txt").write_text(note)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
class Run:
    """Counts inputs, stops at ``runs`` inputs or ``seconds``, writes the summary."""

    def __init__(self, a: argparse.Namespace, harness: Harness, seeds: int) -> None:
        self.a, self.harness, self.seeds = a, harness, seeds
        self.started = self.last_summary = time.perf_counter()
        self.summary_path = a.out / f"summary-{a.target}.json"

    def done(self) -> bool:
        now = time.perf_counter()
        if now - self.last_summary > SUMMARY_EVERY_S:
            self.last_summary = now
            self.write(complete=False)
            st = self.harness.stats
            print(f"fuzz {self.a.target}: {st.inputs} inputs, {st.inputs / (now - self.started):.0f}/s, "
                  f"{st.findings} findings, {sum(st.disagreements.values())} disagreements", flush=True)
        return (self.a.runs is not None and self.harness.stats.inputs >= self.a.runs) or \
            (self.a.seconds is not None and now - self.started >= self.a.seconds)

    def summary(self, complete: bool) -> dict[str, Any]:
        st, a = self.harness.stats, self.a
        elapsed = time.perf_counter() - self.started
        return {
            "target": a.target, "engine": a.engine, "seed": a.seed, "runs_asked": a.runs, "seconds_asked": a.seconds,
            "complete": complete, "inputs": st.inputs, "seconds": round(elapsed, 3),
            "exec_per_s": round(st.inputs / elapsed, 1) if elapsed else 0.0,
            "mean_input_ms": round(1000 * st.busy_s / st.inputs, 3) if st.inputs else 0.0,
            "slowest_input_s": round(st.slowest_s, 4), "slowest_input_sha256": st.slowest_sha256,
            "slow_inputs_over_1s": st.slow_inputs,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "memory_limit_mib": a.memory_limit_mb, "seeds": self.seeds,
            "accepted": st.accepted, "rejected": dict(st.rejected.most_common()),
            "validated_with_cli": st.validated,
            "findings": st.findings, "disagreements": dict(st.disagreements),
            "finding_kinds": st.finding_kinds,
            "python": sys.version.split()[0], "atheris": _atheris_version() if a.engine == "atheris" else None,
        }

    def write(self, complete: bool) -> dict[str, Any]:
        s = self.summary(complete)
        self.summary_path.write_text(json.dumps(s, indent=2) + "\n")
        return s

    def finish(self) -> int:
        s = self.write(complete=True)
        self.harness.close()
        bad = s["findings"] + sum(v for k, v in s["disagreements"].items() if not k.startswith("error codes"))
        print(f"fuzz {s['target']} ({s['engine']}): {s['inputs']} inputs in {s['seconds']:.1f} s "
              f"({s['exec_per_s']}/s), slowest {s['slowest_input_s']:.3f} s, {s['slow_inputs_over_1s']} over 1 s, "
              f"peak RSS {s['peak_rss_mib']} MiB, {s['findings']} findings, disagreements {s['disagreements']}; "
              f"{self.summary_path}", flush=True)
        return 1 if bad else 0


def _atheris_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atheris")
    except PackageNotFoundError:
        return None


def fuzz_atheris(a: argparse.Namespace, run: Run, mutator: Mutator, seeds: list[bytes]) -> None:
    """libFuzzer with coverage of compeft_format; never returns (the process exits when done)."""
    corpus = a.out / f"corpus-{a.target}"
    corpus.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        (corpus / f"seed-{hashlib.sha256(s).hexdigest()[:16]}").write_bytes(s)
    tokens = a.out / "tokens.dict"
    tokens.write_text("".join(f"{json.dumps(json.dumps(t))}\n" for t in format_tokens()))
    (a.out / "findings").mkdir(exist_ok=True)

    def one_input(data: bytes) -> None:
        run.harness(data)
        if run.done():
            sys.stdout.flush()
            os._exit(run.finish())

    def custom(data: bytes, max_size: int, seed: int) -> bytes:
        out = mutator.manifest_input(data, random.Random(seed))
        return out if len(out) <= max_size else data[:max_size]

    argv = [sys.argv[0], f"-seed={a.seed}", "-rss_limit_mb=0", "-malloc_limit_mb=0", "-timeout=120",
            f"-max_len={1 << 20 if a.target == 'manifest' else 1 << 16}", f"-dict={tokens}",
            f"-artifact_prefix={a.out / 'findings'}/{a.target}-libfuzzer-", str(corpus)]
    extra = {"custom_mutator": custom} if a.target == "manifest" else {}
    atheris.Setup(argv, one_input, **extra)
    atheris.Fuzz()


def fuzz_random(a: argparse.Namespace, run: Run, mutator: Mutator, seeds: list[bytes]) -> int:
    """Seeded mutations of the seeds, without coverage."""
    rng = random.Random(a.seed)
    make = mutator.manifest_input if a.target == "manifest" else mutator.raw_input
    for s in seeds:
        run.harness(s)
        if run.done():
            return run.finish()
    while True:
        run.harness(make(rng.choice(seeds), rng))
        if run.done():
            return run.finish()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=TARGETS, required=True)
    ap.add_argument("--runs", type=int, help="stop after this many inputs")
    ap.add_argument("--seconds", type=float, help="stop after this many seconds")
    ap.add_argument("--seed", type=int, default=1, help="random seed, at least 1")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "robustness")
    ap.add_argument("--engine", choices=("atheris", "random"), default="atheris" if atheris else "random")
    ap.add_argument("--memory-limit-mb", type=int, default=4096, help="address-space cap of this process; 0: none")
    ap.add_argument("--validate-every", type=int, default=50, help="run compeft validate on every K-th input")
    a = ap.parse_args(argv)
    if a.runs is None and a.seconds is None:
        ap.error("give --runs or --seconds")
    if a.seed < 1 or a.validate_every < 1:
        ap.error("--seed and --validate-every must be at least 1")
    if a.engine == "atheris" and atheris is None:
        ap.error("atheris is not installed (pip install atheris), use --engine random")
    a.out.mkdir(parents=True, exist_ok=True)
    with scratch_dir() as tmp:
        seeds = seed_inputs(Path(tmp))
    if a.memory_limit_mb:
        limit = a.memory_limit_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    harness = Harness(a.out, a.target, a.validate_every)
    run = Run(a, harness, len(seeds))
    mutator = Mutator(seeds)
    if a.engine == "atheris":
        fuzz_atheris(a, run, mutator, seeds)
    return fuzz_random(a, run, mutator, seeds)


if __name__ == "__main__":
    sys.exit(main())
