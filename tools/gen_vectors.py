#!/usr/bin/env python3
"""Regenerate the conformance vectors in spec/vectors/.

Valid files come with the sha256 of every decoded tensor, computed from the in-memory compressed
adapter (not from decoding the file). Invalid files are valid files with one defect each, with the
error code a reader must return (spec section 9).

    python tools/gen_vectors.py [--out spec/vectors]
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compeft_format as cf  # noqa: E402
from compeft_format import constants as C  # noqa: E402
from compeft_format.integrity import sha256_hex, tensor_sha256  # noqa: E402
from compeft_format.manifest import decode_manifest_text, encode_manifest_text  # noqa: E402
from compeft_format.writer import build, write_safetensors  # noqa: E402

CREATED_AT = "2026-01-01T00:00:00Z"


def _randn(rng: np.random.Generator, shape, dtype) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)


def valid_adapters() -> dict[str, cf.CompressedAdapter]:
    rng = np.random.default_rng(20260101)
    lora = {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": _randn(rng, (4, 37), torch.float16),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": _randn(rng, (37, 4), torch.float16) * 0.01,
        "base_model.model.layers.0.self_attn.v_proj.lora_A.weight": _randn(rng, (4, 37), torch.bfloat16),
        "base_model.model.layers.0.self_attn.v_proj.lora_B.weight": _randn(rng, (21, 4), torch.bfloat16) * 0.01,
        "base_model.model.layers.1.mlp.lora_A.weight": _randn(rng, (3, 5, 7), torch.float32),
        "base_model.model.score.bias": _randn(rng, (5,), torch.float32),
        "extra.scalar": torch.tensor(-0.75, dtype=torch.float32),
        "extra.empty": torch.zeros((0, 3), dtype=torch.float16),
    }
    lora["base_model.model.layers.1.mlp.lora_A.weight"][0, 0, :3] = 0.0  # zeros are never stored
    ia3 = {
        "base_model.model.layers.0.mlp.down_proj.ia3_l": 1 + _randn(rng, (1, 50), torch.float16) * 0.1,
        "base_model.model.layers.0.self_attn.k_proj.ia3_l": 1 + _randn(rng, (33, 1), torch.float32) * 0.1,
    }
    full_base = {"w": _randn(rng, (9, 11), torch.float32), "b": _randn(rng, (11,), torch.float32)}
    full_ft = {k: v + _randn(rng, tuple(v.shape), torch.float32) * 0.02 for k, v in full_base.items()}
    common = dict(min_sparse_numel=0, created_at=CREATED_AT)
    out = {
        "v1_ternary_global": cf.compress(lora, method="paper", density=0.3, alpha=1.5, adapter_kind="lora",
                                         base=cf.BaseBinding(id="example/tiny-llama", revision="main"), **common),
        "v1_ternary_tensor": cf.compress(lora, method="paper", density=0.5, alpha=1.0, scope="tensor", dtype="float32", **common),
        "v1_ternary_golomb": cf.compress(lora, method="paper", density=0.05, alpha=1.0, **common),
        "v1_ternary_bitmap": cf.compress(lora, method="paper", density=0.3, alpha=1.5, **common),
        "v1_ternary_ones": cf.compress(ia3, method="paper", density=0.2, alpha=2.0, reference="ones", adapter_kind="ia3", **common),
        "v1_sparse_prune": cf.compress(lora, method="paper", density=0.25, mode="prune", **common),
        "v1_sparse_ones_prune": cf.compress(ia3, method="paper", density=0.4, mode="prune", reference="ones", **common),
        "v1_delta_base": cf.compress(full_ft, method="paper", density=0.1, reference=full_base, adapter_kind="full",
                                     dense_patterns=("b",), **common),
        "v1_dense_only": cf.compress(lora, method="paper", density=1.0, dense_patterns=("*",), **common),
        "v1_2_compressed_base": cf.compress(lora, method="paper", density=0.1, alpha=1.0, adapter_kind="lora",
                                            base=compressed_base_binding(rng), **common),
        # 1.3: the fit method, which records compression.options and compression.fidelity
        "v1_3_fit": cf.compress(lora, method="fit", density=0.3, adapter_kind="lora", **common),
    }
    out.update(cpet_adapters(rng, lora, common))
    # 1.5: a single-file source's safetensors metadata (kohya ss_* keys, modelspec.*)
    out["v1_5_source_metadata"] = cf.compress(
        lora, method="paper", density=0.2, alpha=1.0,
        source_metadata={"ss_network_dim": "8", "ss_network_alpha": "16", "modelspec.title": "example LoRA",
                         "ss_tag_frequency": '{"a": {"cat": 3}}'}, **common)
    return out


def cpet_adapters(rng: np.random.Generator, lora: dict[str, torch.Tensor],
                  common: dict[str, Any]) -> dict[str, cf.CompressedAdapter]:
    """1.4: recovery artifacts (dense and ternary) for a compressed base, and a task LoRA bound to
    the same base that requires the dense one (spec 3.6)."""
    base = compressed_base_binding(rng)
    config = cf.recovery.RecoveryConfig(r=3, alpha=6.0)
    recovery = {}
    for module, (n_in, n_out) in {"model.layers.0.self_attn.q_proj": (37, 37),
                                  "model.layers.0.mlp.down_proj": (50, 21)}.items():
        a1, a2 = cf.recovery.tensor_names(module)
        recovery[a1] = _randn(rng, (3, n_in), torch.float32) / np.sqrt(n_in)
        recovery[a2] = _randn(rng, (n_out, 3), torch.float16) * 0.01
    training = {"method": "cpet", "steps": 200, "lr": 0.0002, "distill": {"lambda": 1.0, "layer": "last"},
                "data_sha256": "ab" * 32}
    dense = cf.compress(recovery, method="paper", density=1.0, dense_patterns=("*",), recovery=config, base=base,
                        training=training, **common)
    ternary = cf.compress(recovery, method="paper", density=0.25, alpha=1.0, recovery=config, base=base, **common)
    digest = sha256_hex(build(dense)[0].to_json().encode("utf-8"))
    required = cf.Requirement(kind=C.ADAPTER_KIND_RECOVERY, manifest_sha256=digest,
                              name="v1_4_recovery_dense.cpeft.safetensors")
    task = cf.compress(lora, method="paper", density=0.3, alpha=1.0, adapter_kind="lora", base=base,
                       requires=[required], training=training, **common)
    return {"v1_4_recovery_dense": dense, "v1_4_recovery_ternary": ternary, "v1_4_task_requires": task}


def compressed_base_binding(rng: np.random.Generator) -> cf.BaseBinding:
    """A binding to a compressed base (1.2): a small model rounded to a 4-bit grid in groups of 8,
    fingerprinted by value, derived from its float16 original, fingerprinted as stored."""
    original = {"model.layers.0.mlp.down_proj.weight": _randn(rng, (8, 16), torch.float16),
                "model.norm.weight": torch.ones(8, dtype=torch.float16)}
    w = original["model.layers.0.mlp.down_proj.weight"].float().reshape(-1, 8)
    step = w.abs().amax(dim=1, keepdim=True) / 7
    quantised = dict(original, **{"model.layers.0.mlp.down_proj.weight": ((w / step).round().clamp(-8, 7) * step)
                                  .reshape(8, 16)})
    source = cf.ModelRef(id="example/tiny-llama", revision="main", fingerprint=cf.fingerprint(original))
    return cf.binding.compute(quantised, id="example/tiny-llama-int4", algorithm=cf.binding.FLOAT32,
                              derived_from=source,
                              recipe={"name": "int4:g8", "library": "example", "library_version": "1.0",
                                      "params": {"bits": 4, "group_size": 8, "symmetric": True},
                                      "calibration_sha256": None})


VALID_OPTIONS: dict[str, dict[str, Any]] = {
    "v1_ternary_global": {"positions": "auto", "tensor_digests": True},
    "v1_ternary_tensor": {"max_group_elements": 64, "manifest_encoding": C.MANIFEST_JSON, "positions": "bitmap"},
    "v1_ternary_golomb": {"positions": "golomb"},
    "v1_ternary_bitmap": {"positions": "bitmap", "tensor_digests": True, "group_digests": False},
    "v1_sparse_prune": {"manifest_encoding": C.MANIFEST_ZSTD_BASE64, "tensor_digests": False, "positions": "golomb"},
}


# --- defects ----------------------------------------------------------------------------------
class Parts:
    """A compeft file taken apart: streams and metadata, editable, written back as safetensors."""

    def __init__(self, manifest, streams, meta):
        self.streams = {k: v.copy() for k, v in streams.items()}
        self.meta = dict(meta)
        self.encoding = meta[C.META_MANIFEST_ENCODING]
        self.manifest = json.loads(decode_manifest_text(meta[C.META_MANIFEST], self.encoding))

    def stream(self, gi: int, role: str) -> dict[str, Any]:
        return self.manifest["groups"][gi]["streams"][role]

    def set_stream(self, gi: int, role: str, data: bytes, raw_size: int | None = None) -> None:
        s = self.stream(gi, role)
        self.streams[s["name"]] = np.frombuffer(data, dtype=np.uint8).copy()
        s["size"] = len(data)
        s["sha256"] = sha256_hex(data)
        if raw_size is not None:
            s["raw_size"] = raw_size

    def seal(self) -> None:
        text = json.dumps(self.manifest, separators=(",", ":"))
        self.meta[C.META_MANIFEST] = encode_manifest_text(text, self.encoding)
        self.meta[C.META_MANIFEST_SHA256] = sha256_hex(text.encode())

    def write(self, path: Path) -> None:
        write_safetensors(str(path), self.streams, self.meta)  # one byte order, run after run
        path.chmod(0o644)


def _group_of(parts: Parts, encoding: str, positions: str | None = None) -> int:
    return next(i for i, g in enumerate(parts.manifest["groups"]) if g["encoding"] == encoding
                and (positions is None or g["params"].get("positions") == positions))


def d_unknown_major(p: Parts):
    p.meta[C.META_VERSION] = "2.0"


def d_unknown_feature(p: Parts):
    p.manifest["required_features"] = ["positions-from-the-future"]
    p.seal()


def d_manifest_digest(p: Parts):
    p.meta[C.META_MANIFEST_SHA256] = "0" * 64


def d_derived_from_type(p: Parts):
    p.manifest["base_model"]["derived_from"] = "example/tiny-llama"
    p.seal()


def d_derived_fingerprint_type(p: Parts):
    p.manifest["base_model"]["derived_from"]["fingerprint"]["value"] = 7
    p.seal()


def d_recipe_type(p: Parts):
    p.manifest["base_model"]["recipe"] = ["int4:g8"]
    p.seal()


def d_manifest_invalid(p: Parts):
    del p.manifest["tensors"][0]["shape"]
    p.seal()


def d_manifest_raw_size(p: Parts):
    gi = _group_of(p, C.ENC_TERNARY)
    p.stream(gi, C.ROLE_SIGNS)["raw_size"] += 1
    p.seal()


def d_manifest_mismatch(p: Parts):
    p.streams["stray"] = np.zeros(3, dtype=np.uint8)


def d_stream_size_mismatch(p: Parts):
    # the file's tensor grows by a byte; the manifest still declares the old size
    name = p.stream(0, C.ROLE_SIGNS)["name"]
    p.streams[name] = np.concatenate([p.streams[name], np.zeros(1, dtype=np.uint8)])


def d_unknown_encoding(p: Parts):
    p.manifest["groups"][_group_of(p, C.ENC_TERNARY)]["encoding"] = "quaternary"
    p.seal()


def d_unknown_compression(p: Parts):
    gi = _group_of(p, C.ENC_TERNARY, C.POSITIONS_BITMAP)
    p.stream(gi, C.ROLE_POSITIONS)["compression"] = "lzma"
    p.seal()


def d_limit_elements(p: Parts):
    p.manifest["tensors"][0]["shape"] = [1 << 20, 1 << 20]
    p.seal()


def d_limit_rank(p: Parts):
    p.manifest["tensors"][0]["shape"] = [1] * 9 + p.manifest["tensors"][0]["shape"]
    p.seal()


def d_stream_digest(p: Parts):
    gi = _group_of(p, C.ENC_TERNARY)
    name = p.stream(gi, C.ROLE_SIGNS)["name"]
    p.streams[name][-1] ^= 0x01


def d_zstd_bomb(p: Parts):
    # A frame that declares far more content than the manifest's raw_size.
    gi = _group_of(p, C.ENC_TERNARY, C.POSITIONS_BITMAP)
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\xff" * (1 << 20))
    p.set_stream(gi, C.ROLE_POSITIONS, bomb)
    p.stream(gi, C.ROLE_POSITIONS)["compression"] = C.COMP_ZSTD
    p.seal()


def d_padding_bits(p: Parts):
    gi = _group_of(p, C.ENC_TERNARY, C.POSITIONS_BITMAP)
    s = p.stream(gi, C.ROLE_POSITIONS)
    raw = bytearray(_raw_stream(p, gi, C.ROLE_POSITIONS))
    raw[-1] |= 0x80
    p.set_stream(gi, C.ROLE_POSITIONS, bytes(raw))
    s["compression"] = C.COMP_NONE
    p.seal()


def d_popcount(p: Parts):
    gi = _group_of(p, C.ENC_TERNARY, C.POSITIONS_BITMAP)
    raw = bytearray(_raw_stream(p, gi, C.ROLE_POSITIONS))
    i = next(j for j, b in enumerate(raw) if b != 0xFF)
    raw[i] |= (~raw[i] & -(~raw[i])) & 0xFF  # set the lowest clear bit: one entry too many
    p.set_stream(gi, C.ROLE_POSITIONS, bytes(raw))
    p.stream(gi, C.ROLE_POSITIONS)["compression"] = C.COMP_NONE
    p.seal()


def d_tensor_digest(p: Parts):
    t = next(t for t in p.manifest["tensors"] if "sha256" in t)
    t["sha256"] = "f" * 64
    p.seal()


def d_group_digest(p: Parts):
    p.manifest["groups"][-1]["decoded_sha256"] = "0" * 64
    p.seal()


def d_scale_not_binary32(p: Parts):
    t = next(t for t in p.manifest["tensors"] if "scale" in t)
    t["scale"] = 0.1
    p.seal()


def d_manifest_encoding(p: Parts):
    p.meta[C.META_MANIFEST_ENCODING] = "brotli+base64"


def d_manifest_base64(p: Parts):
    p.meta[C.META_MANIFEST_ENCODING] = C.MANIFEST_ZSTD_BASE64
    p.meta[C.META_MANIFEST] = "%%%not base64%%%"


def d_manifest_bomb(p: Parts):
    p.encoding = C.MANIFEST_ZSTD_BASE64
    p.meta[C.META_MANIFEST_ENCODING] = C.MANIFEST_ZSTD_BASE64
    bomb = zstandard.ZstdCompressor(level=19).compress(b" " * (C.MAX_MANIFEST_BYTES + 1))
    p.meta[C.META_MANIFEST] = base64.b64encode(bomb).decode()


def d_manifest_dict_mislabelled(p: Parts):
    # a frame made with the manifest dictionary, labelled as the encoding without one
    p.encoding = C.MANIFEST_ZSTD_DICT1_BASE64
    p.seal()
    p.meta[C.META_MANIFEST_ENCODING] = C.MANIFEST_ZSTD_BASE64


def d_manifest_dict_id(p: Parts):
    # the dictionary encoding, but the frame names a dictionary (Dictionary_ID 7)
    p.encoding = C.MANIFEST_ZSTD_DICT1_BASE64
    p.seal()
    frame = bytearray(base64.b64decode(p.meta[C.META_MANIFEST]))
    assert frame[4] & 3 == 0
    at = 5 + (1 - ((frame[4] >> 5) & 1))  # after the window descriptor, if any
    frame[4] |= 1
    frame[at:at] = b"\x07"
    p.meta[C.META_MANIFEST] = base64.b64encode(bytes(frame)).decode()
    p.meta[C.META_MANIFEST_ENCODING] = C.MANIFEST_ZSTD_DICT1_BASE64


def d_recovery_rank(p: Parts):
    # adapter.recovery.r no longer the tensors' rank
    p.manifest["adapter"]["recovery"]["r"] += 1
    p.seal()


def d_recovery_r_type(p: Parts):
    p.manifest["adapter"]["recovery"]["r"] = "3"
    p.seal()


def d_recovery_missing_config(p: Parts):
    del p.manifest["adapter"]["recovery"]
    p.seal()


def d_recovery_tensor_name(p: Parts):
    t = next(t for t in p.manifest["tensors"] if t["name"].endswith(".recovery_A1.weight"))
    t["name"] = t["name"].replace(".recovery_A1.", ".recovery_A3.")
    p.seal()


def d_requires_digest(p: Parts):
    p.manifest["requires"][0]["manifest_sha256"] = p.manifest["requires"][0]["manifest_sha256"].upper()
    p.seal()


def d_requires_type(p: Parts):
    p.manifest["requires"] = p.manifest["requires"][0]
    p.seal()


def _golomb_stream(p: Parts, role: str, edit: Callable[[bytearray], bytes | bytearray]) -> None:
    gi = _group_of(p, C.ENC_TERNARY, C.POSITIONS_GOLOMB)
    raw = edit(bytearray(_raw_stream(p, gi, role)))
    p.set_stream(gi, role, bytes(raw), raw_size=len(raw))
    p.stream(gi, role)["compression"] = C.COMP_NONE
    p.seal()


def d_golomb_missing_code(p: Parts):
    # clear the last terminator: one code fewer than the manifest's nnz declares
    def edit(raw):
        last = max(i for i, b in enumerate(raw) if b)
        raw[last] &= ~(1 << (raw[last].bit_length() - 1)) & 0xFF
        return raw if raw[-1] else raw[:-1]
    _golomb_stream(p, C.ROLE_UNARY, edit)


def d_golomb_trailing(p: Parts):
    _golomb_stream(p, C.ROLE_UNARY, lambda raw: raw + b"\0")


def d_golomb_overrun(p: Parts):
    # a long run of zero bits before the last code pushes a position past its tensor's end
    def edit(raw):
        last = max(i for i, b in enumerate(raw) if b)
        return raw[:last] + b"\0" * 40 + raw[last:]
    _golomb_stream(p, C.ROLE_UNARY, edit)


def _raw_stream(p: Parts, gi: int, role: str) -> bytes:
    s = p.stream(gi, role)
    data = p.streams[s["name"]].tobytes()
    return zstandard.ZstdDecompressor().decompress(data) if s["compression"] == C.COMP_ZSTD else data


BITMAP_DEFECTS = {"zstd_bomb", "padding_bits", "popcount", "unknown_compression"}
GOLOMB_DEFECTS = {"golomb_missing_code", "golomb_trailing_byte", "golomb_overrun"}
BINDING_DEFECTS = {"derived_from_type", "derived_fingerprint_type", "recipe_type"}
RECOVERY_DEFECTS = {"recovery_rank", "recovery_r_type", "recovery_missing_config", "recovery_tensor_name"}
REQUIRES_DEFECTS = {"requires_digest", "requires_type"}

DEFECTS: dict[str, tuple[Callable[[Parts], None], str]] = {
    "unknown_major": (d_unknown_major, C.E_UNSUPPORTED_VERSION),
    "unknown_feature": (d_unknown_feature, C.E_UNSUPPORTED_FEATURE),
    "manifest_digest": (d_manifest_digest, C.E_MANIFEST_DIGEST_MISMATCH),
    "manifest_invalid": (d_manifest_invalid, C.E_MANIFEST_INVALID),
    "manifest_raw_size": (d_manifest_raw_size, C.E_MANIFEST_INVALID),
    "scale_not_binary32": (d_scale_not_binary32, C.E_MANIFEST_INVALID),
    "extra_tensor": (d_manifest_mismatch, C.E_MANIFEST_MISMATCH),
    "stream_size_mismatch": (d_stream_size_mismatch, C.E_MANIFEST_MISMATCH),
    "unknown_encoding": (d_unknown_encoding, C.E_UNKNOWN_ENCODING),
    "unknown_manifest_encoding": (d_manifest_encoding, C.E_UNKNOWN_ENCODING),
    "manifest_base64": (d_manifest_base64, C.E_MANIFEST_INVALID),
    "manifest_bomb": (d_manifest_bomb, C.E_LIMIT_EXCEEDED),
    "manifest_dict_mislabelled": (d_manifest_dict_mislabelled, C.E_MANIFEST_INVALID),
    "manifest_dict_id": (d_manifest_dict_id, C.E_MANIFEST_INVALID),
    "unknown_compression": (d_unknown_compression, C.E_UNKNOWN_ENCODING),
    "limit_elements": (d_limit_elements, C.E_LIMIT_EXCEEDED),
    "limit_rank": (d_limit_rank, C.E_LIMIT_EXCEEDED),
    "stream_digest": (d_stream_digest, C.E_STREAM_DIGEST_MISMATCH),
    "zstd_bomb": (d_zstd_bomb, C.E_STREAM_CORRUPT),
    "padding_bits": (d_padding_bits, C.E_STREAM_CORRUPT),
    "popcount": (d_popcount, C.E_STREAM_CORRUPT),
    "tensor_digest": (d_tensor_digest, C.E_TENSOR_DIGEST_MISMATCH),
    "group_digest": (d_group_digest, C.E_TENSOR_DIGEST_MISMATCH),
    "golomb_missing_code": (d_golomb_missing_code, C.E_STREAM_CORRUPT),
    "golomb_trailing_byte": (d_golomb_trailing, C.E_STREAM_CORRUPT),
    "golomb_overrun": (d_golomb_overrun, C.E_STREAM_CORRUPT),
    "derived_from_type": (d_derived_from_type, C.E_MANIFEST_INVALID),
    "derived_fingerprint_type": (d_derived_fingerprint_type, C.E_MANIFEST_INVALID),
    "recipe_type": (d_recipe_type, C.E_MANIFEST_INVALID),
    "recovery_rank": (d_recovery_rank, C.E_MANIFEST_INVALID),
    "recovery_r_type": (d_recovery_r_type, C.E_MANIFEST_INVALID),
    "recovery_missing_config": (d_recovery_missing_config, C.E_MANIFEST_INVALID),
    "recovery_tensor_name": (d_recovery_tensor_name, C.E_MANIFEST_INVALID),
    "requires_digest": (d_requires_digest, C.E_MANIFEST_INVALID),
    "requires_type": (d_requires_type, C.E_MANIFEST_INVALID),
}


def generate(out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.safetensors")) + list(out.glob("*.bin")):
        old.unlink()
    index: dict[str, Any] = {"format_version": C.FORMAT_VERSION, "valid": [], "invalid": []}
    built = {}
    for name, adapter in valid_adapters().items():
        path = out / f"{name}.cpeft.safetensors"
        cf.save(adapter, path, **VALID_OPTIONS.get(name, {}))
        built[name] = build(adapter, **VALID_OPTIONS.get(name, {}))
        index["valid"].append({
            "file": path.name,
            "tensors": {n: {"dtype": t.dtype, "shape": list(t.shape), "sha256": tensor_sha256(t.to_dense())}
                        for n, t in adapter.tensors.items()},
        })
    # Files as earlier writers wrote them: 1.0 (no manifest dictionary), 1.1 and 1.2 (no later fields).
    golomb = valid_adapters()["v1_ternary_golomb"]
    for version, encoding in (("1.0", C.MANIFEST_ZSTD_BASE64), ("1.1", C.MANIFEST_ZSTD_DICT1_BASE64),
                              ("1.2", C.MANIFEST_ZSTD_DICT1_BASE64)):
        parts = Parts(*build(golomb, manifest_encoding=encoding, **VALID_OPTIONS["v1_ternary_golomb"]))
        parts.meta[C.META_VERSION] = version
        name = f"v{version.replace('.', '_')}_ternary_golomb.cpeft.safetensors"
        parts.write(out / name)
        index["valid"].append({
            "file": name,
            "tensors": {n: {"dtype": t.dtype, "shape": list(t.shape), "sha256": tensor_sha256(t.to_dense())}
                        for n, t in golomb.tensors.items()},
        })
    for name, (mutate, code) in DEFECTS.items():
        base = ("v1_ternary_bitmap" if name in BITMAP_DEFECTS else
                "v1_ternary_golomb" if name in GOLOMB_DEFECTS else
                "v1_2_compressed_base" if name in BINDING_DEFECTS else
                "v1_4_recovery_dense" if name in RECOVERY_DEFECTS else
                "v1_4_task_requires" if name in REQUIRES_DEFECTS else "v1_ternary_global")
        parts = Parts(*built[base])
        mutate(parts)
        path = out / f"bad_{name}.cpeft.safetensors"
        parts.write(path)
        index["invalid"].append({"file": path.name, "code": code})
    # Defects of the container itself.
    good = (out / "v1_ternary_global.cpeft.safetensors").read_bytes()
    (out / "bad_truncated.cpeft.safetensors").write_bytes(good[: len(good) - 7])
    index["invalid"].append({"file": "bad_truncated.cpeft.safetensors", "code": C.E_TRUNCATED})
    (out / "bad_trailing_bytes.cpeft.safetensors").write_bytes(good + b"\0")
    index["invalid"].append({"file": "bad_trailing_bytes.cpeft.safetensors", "code": C.E_NOT_SAFETENSORS})
    junk = struct.pack("<Q", 12) + b"not json!!!!"
    (out / "bad_not_safetensors.bin").write_bytes(junk)
    index["invalid"].append({"file": "bad_not_safetensors.bin", "code": C.E_NOT_SAFETENSORS})
    save_file({"w": np.ones((2, 2), dtype=np.float32)}, str(out / "bad_plain.safetensors"), metadata={"format": "pt"})
    (out / "bad_plain.safetensors").chmod(0o644)
    index["invalid"].append({"file": "bad_plain.safetensors", "code": C.E_NOT_COMPEFT})
    (out / "vectors.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "spec" / "vectors")
    a = ap.parse_args()
    idx = generate(a.out)
    print(f"{a.out}: {len(idx['valid'])} valid, {len(idx['invalid'])} invalid vectors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
