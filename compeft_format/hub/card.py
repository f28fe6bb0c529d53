"""The model card (``README.md``) a compeft repository carries: YAML front matter the Hub reads
(``library_name``, ``base_model``, tags) and a table of the artifacts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import constants as C
from .._version import __version__
from .index import ARTIFACT_KINDS, IndexEntry


def model_card(repo_id: str, entries: Sequence[IndexEntry], reports: Sequence[dict[str, Any]]) -> str:
    """README.md for the artifacts of one push (``reports`` are their ``report.report``)."""
    kinds = sorted({e.adapter_kind for e in entries if e.adapter_kind and e.adapter_kind != "other"})
    bases = sorted({e.base_model.id for e in entries if e.base_model.id})
    tags = ["compeft", *kinds]
    if any(r["compression"].get("mode") == C.MODE_TERNARY for r in reports):
        tags.append("ternary")
    lines = ["---", "library_name: compeft"]
    if len(bases) == 1:
        lines.append(f"base_model: {bases[0]}")
    elif bases:
        lines += ["base_model:"] + [f"- {b}" for b in bases]
    lines += ["tags:"] + [f"- {t}" for t in tags] + ["---", "", f"# {repo_id.split('/')[-1]}", "",
              f"Compressed fine-tuning artifact(s) in the compeft format {C.FORMAT_VERSION} "
              "(ComPEFT: sparse ternary task vectors). Every file is a safetensors file with sha256 digests of all "
              f"its streams; `{C.HUB_INDEX_FILE}` lists each file's sha256 and the base model it belongs to.", "",
              "| file | what | params | bytes | bits/param | smaller than fp16 | density | alpha | base model |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for e, r in zip(entries, reports, strict=True):
        c = r["compression"]
        lines.append(f"| {e.path} | {ARTIFACT_KINDS.get(e.kind, e.kind)} | {r['params']:,} | {r['file_bytes']:,} "
                     f"| {r['bits_per_param']:.3f} | {r['ratio_vs_fp16']:.1f}x | {c.get('density')} | {c.get('alpha')} "
                     f"| {e.base_model.describe() if not e.base_model.is_empty else '-'} |")
    lines += ["", "```python", "import compeft_format as cf", "",
              f'files = cf.pull("{repo_id}")           # downloads, checks every byte',
              "model = cf.load_adapter(base_model, files.paths[0])", "```", "",
              f"Written by compeft {__version__}.", ""]
    return "\n".join(lines)


__all__ = ["model_card"]
