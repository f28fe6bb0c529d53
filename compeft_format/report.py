"""Sizes of a compeft file against the dense adapter and the information bound (``inspect``)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from . import constants as C
from .binding import AS_STORED, BaseBinding
from .codecs import get_codec
from .codecs.ternary import bound_bits as ternary_bound_bits
from .peft_layout import lora_pairs
from .reader import CompeftFile


def dense_safetensors_size(shapes: dict[str, tuple[int, ...]], itemsize: int) -> int:
    """Bytes of a plain safetensors file holding these tensors at ``itemsize`` bytes per element."""
    header: dict[str, Any] = {}
    off = 0
    dt = {2: "F16", 4: "F32"}[itemsize]
    for name, shape in shapes.items():
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = len(json.dumps(header, separators=(",", ":")).encode())
    h += (-h) % 8
    return 8 + h + off


def report(f: CompeftFile) -> dict[str, Any]:
    """Describe an open compeft file: tensors, groups, streams, sizes and ratios.

    Ratios are (reference size) / (file size); ``vs_bound`` is (file bits) / (bound bits), where
    each member's bound is its encoding's (``log2 C(n,k) + k`` bits for a ternary tensor,
    ``log2 C(n,k)`` plus the value bits for a sparse one, the raw bits of a dense one).
    """
    m = f.manifest
    members = m.group_members()
    file_bytes = f.size
    stream_bytes = sum(s.size for g in m.groups for s in g.streams.values())
    tensors = []
    bound_bits = 0.0
    ternary_bits = 0.0
    for t in m.tensors:
        g = m.groups[t.group]
        b = get_codec(g.encoding).bound_bits(g.params, t)
        bound_bits += b
        if g.encoding == C.ENC_TERNARY:
            ternary_bits += b
        tensors.append({
            "name": t.name, "shape": list(t.shape), "dtype": t.dtype, "encoding": g.encoding,
            "group": t.group, "nnz": t.nnz, "density": (t.nnz / t.numel) if t.numel else 0.0,
            "scale": t.scale, "offset": t.offset, "bound_bits": b,
        })
    groups = []
    ternary_stream_bytes = 0
    for gi, g in enumerate(m.groups):
        n = sum(m.tensors[i].numel for i in members[gi])
        size = sum(s.size for s in g.streams.values())
        if g.encoding == C.ENC_TERNARY:
            ternary_stream_bytes += size
        groups.append({
            "index": gi, "encoding": g.encoding, "params": g.params, "tensors": len(members[gi]),
            "elements": n, "bytes": size, "bits_per_param": (8 * size / n) if n else 0.0,
            "streams": {r: vars(s).copy() for r, s in g.streams.items()},
        })
    params = sum(t.numel for t in m.tensors)
    shapes = {t.name: t.shape for t in m.tensors}
    nnz = {t.name: t.nnz if m.groups[t.group].encoding != C.ENC_DENSE else t.numel for t in m.tensors}
    # a LoRA module with a factor that keeps nothing (and no offset) adds nothing to the model
    inert = [module for module, a, b in lora_pairs(shapes) if nnz[a] == 0 or nnz[b] == 0]
    rec = m.adapter.recovery
    fp16 = dense_safetensors_size(shapes, 2)
    fp32 = dense_safetensors_size(shapes, 4)
    return {
        "path": str(f.path),
        "format_version": f.metadata.get(C.META_VERSION),
        "library_version": m.library_version,
        "adapter": {"kind": m.adapter.kind, "representation": m.adapter.representation,
                    "peft_type": (m.adapter.peft_config or {}).get("peft_type"),
                    "peft_config": m.adapter.peft_config,
                    "recovery": None if rec is None else {**rec.to_json(), "modules": list(rec.target_modules)}},
        "requires": [r.to_json() for r in m.requires],
        "training": m.provenance.training,
        "source_metadata": m.provenance.source_metadata,
        "base_model": m.base_model.to_json(),
        "compression": m.compression.to_dict(),
        "params": params,
        "file_bytes": file_bytes,
        "header_bytes": file_bytes - stream_bytes,
        "stream_bytes": stream_bytes,
        "bits_per_param": (8 * file_bytes / params) if params else 0.0,
        "fp16_safetensors_bytes": fp16,
        "fp32_safetensors_bytes": fp32,
        "ratio_vs_fp16": fp16 / file_bytes,
        "ratio_vs_fp32": fp32 / file_bytes,
        "bound_bits": bound_bits,
        "file_vs_bound": (8 * file_bytes / bound_bits) if bound_bits else None,
        "ternary_bound_bits": ternary_bits,
        "ternary_streams_vs_bound": (8 * ternary_stream_bytes / ternary_bits) if ternary_bits else None,
        "inert_modules": inert,
        "groups": groups,
        "tensors": tensors,
    }


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``report`` of the file at ``path``."""
    with CompeftFile(path) as f:
        return report(f)


def ratio_text(x: float, digits: int = 2) -> str:
    """How a file compares with a dense one, ``x`` being dense bytes / file bytes:
    ``3.20x smaller`` or ``1.70x larger``."""
    if x >= 1:
        return f"{x:.{digits}f}x smaller"
    return f"{1 / x:.{digits}f}x larger" if x > 0 else "larger"


def format_report(r: dict[str, Any], max_tensors: int = 40) -> str:
    """Human-readable text of an ``inspect`` result."""
    c = r["compression"]
    base = BaseBinding.from_json(r["base_model"])
    fp = base.fingerprint
    if base.is_empty:
        base_line = "  base model: not recorded (any base is accepted; see compeft compress --base-weights)"
    else:
        base_line = f"  base model: {base.id or 'no id'}" + (f" @ {base.revision}" if base.revision else "")
    if fp is not None:
        base_line += f", fingerprint {fp.value[:16]}" + ("" if fp.algorithm == AS_STORED else f" ({fp.algorithm})")
    if base.derived_from is not None:
        base_line += f", derived from {base.derived_from.describe()}"
        if base.recipe and isinstance(base.recipe.get("name"), str):
            base_line += f" by {base.recipe['name']}"
    lines = [
        f"{r['path']}",
        f"  format {r['format_version']}, written by compeft {r['library_version']}",
        f"  adapter: {r['adapter']['kind']} ({r['adapter']['peft_type'] or 'no PEFT config'}), "
        f"values are {r['adapter']['representation']}",
        base_line,
        f"  compression: {c['method']} density={c['density']} alpha={c['alpha']} scope={c['scope']} "
        f"mode={c['mode']} reference={c['reference']} kept={c['kept']}/{c['candidates']}",
        f"  params {r['params']:,}  file {r['file_bytes']:,} B (header {r['header_bytes']:,} B, "
        f"streams {r['stream_bytes']:,} B)  {r['bits_per_param']:.4f} bits/param",
        f"  vs fp16 safetensors ({r['fp16_safetensors_bytes']:,} B): {ratio_text(r['ratio_vs_fp16'])}; "
        f"vs fp32 ({r['fp32_safetensors_bytes']:,} B): {ratio_text(r['ratio_vs_fp32'])}",
    ]
    peft = r["adapter"].get("peft_config")
    if isinstance(peft, dict):
        keys = ("peft_type", "r", "lora_alpha", "target_modules", "task_type", "use_dora", "use_rslora", "bias")
        shown = ", ".join(f"{k}={_short(peft[k])}" for k in keys if k in peft and peft[k] not in (None, False))
        lines.insert(3, f"  PEFT config: {shown or '(empty)'} ({len(peft)} keys; --json shows all)")
    kept = r.get("source_metadata")
    if kept:
        lines.append(f"  source metadata (written back by decompress -o FILE.safetensors): {len(kept)} keys, "
                     f"{_short(sorted(kept), 60)}")
    rec = r["adapter"].get("recovery")
    if rec is not None:
        lines.insert(3, f"  recovery modules: {len(rec['modules'])}, r={rec['r']} alpha={rec['alpha']} "
                        f"activation={rec['activation']} (output scaled by alpha/r = {rec['alpha'] / rec['r']:g})")
    for req in r.get("requires", []):
        lines.append(f"  requires: {req['kind']} artifact {req['name'] or '(no name)'}, manifest sha256 "
                     f"{req['manifest_sha256']}")
    if isinstance(r.get("training"), dict):
        shown = ", ".join(f"{k}={_short(v)}" for k, v in list(r["training"].items())[:8])
        lines.append(f"  training: {shown}" + (" ..." if len(r["training"]) > 8 else ""))
    if c.get("options"):
        lines.append("  options: " + " ".join(f"{k}={v}" for k, v in c["options"].items()))
    fid = c.get("fidelity")
    if isinstance(fid, dict) and isinstance(fid.get("relative_error"), (int, float)):
        lines.append(f"  fidelity (measured when written): relative error of the weight update "
                     f"{fid['relative_error']:.3f} over {fid.get('modules', '?')} module(s), {fid.get('emptied', '?')} emptied")
    if r["inert_modules"]:
        shown = ", ".join(r["inert_modules"][:3]) + (" ..." if len(r["inert_modules"]) > 3 else "")
        lines.append(f"  warning: {len(r['inert_modules'])} LoRA module(s) keep no entry in a factor, so they change "
                     f"nothing: {shown}")
    if r["file_vs_bound"] is not None:
        lines.append(f"  information bound {r['bound_bits'] / 8:,.0f} B: file is {r['file_vs_bound']:.3f}x the bound"
                     + (f", ternary streams {r['ternary_streams_vs_bound']:.3f}x" if r["ternary_streams_vs_bound"] else ""))
    lines.append("  groups:")
    for g in r["groups"]:
        streams = ", ".join(f"{role} {s['size']:,} B {s['compression']}" for role, s in g["streams"].items())
        lines.append(f"    g{g['index']} {g['encoding']:<8} {g['tensors']} tensors {g['elements']:,} elements "
                     f"{g['bytes']:,} B {g['bits_per_param']:.4f} bits/param [{streams}]")
    lines.append("  tensors:")
    for t in r["tensors"][:max_tensors]:
        lines.append(f"    {t['name']}  {t['dtype']} {tuple(t['shape'])} {t['encoding']} "
                     f"nnz={t['nnz']:,} ({100 * t['density']:.2f}%)")
    if len(r["tensors"]) > max_tensors:
        lines.append(f"    ... {len(r['tensors']) - max_tensors} more (use --json for all)")
    return "\n".join(lines)


def _short(value: Any, limit: int = 40) -> str:
    """A value of an informative member on one line, cut at ``limit`` characters; a list keeps
    whole items and counts the rest (``[q_proj, v_proj, +5 more]``)."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        shown: list[str] = []
        for i, text in enumerate(value):
            item = text if text.isprintable() else json.dumps(text)[1:-1]  # no terminal control characters
            more = len(value) - i
            if shown and len(", ".join([*shown, item])) + len(f", +{more - 1} more") * (more > 1) > limit:
                return "[" + ", ".join([*shown, f"+{more} more"]) + "]"
            shown.append(item if len(item) <= limit else item[: limit - 3] + "...")
        return "[" + ", ".join(shown) + "]"
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["inspect", "report", "format_report", "ratio_text", "ternary_bound_bits", "dense_safetensors_size"]
