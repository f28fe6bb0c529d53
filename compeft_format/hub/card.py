"""The model card (``README.md``) a compeft repository carries: YAML front matter the Hub reads
(``library_name``, ``base_model``, tags), a table of the artifacts, what each kind of artifact is,
and what each artifact needs before it can be applied: the artifacts it requires and the exact
base model it was made for."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .. import constants as C
from .._version import __version__
from ..binding import BaseBinding
from .index import ARTIFACT_KINDS, IndexEntry


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def base_lines(base: BaseBinding) -> list[str]:
    """The base model an artifact needs, as Markdown list items: id and revision, fingerprint,
    the model it was derived from and the recipe that derived it."""
    lines = [f"- base model: {base.id or 'unnamed'}" + (f" @ {base.revision}" if base.revision else "")]
    if base.fingerprint is not None:
        lines.append(f"- fingerprint ({base.fingerprint.algorithm}): `{base.fingerprint.value}`")
    if base.derived_from is not None:
        lines.append(f"- derived from: {base.derived_from.describe()}")
        if base.derived_from.fingerprint is not None:
            lines.append(f"  (fingerprint `{base.derived_from.fingerprint.value}`)")
    if base.recipe:
        name = base.recipe.get("name")
        params = base.recipe.get("params")
        lines.append(f"- recipe: {name if isinstance(name, str) else '-'}"
                     + (f" `{json.dumps(params, sort_keys=True)}`" if params else ""))
    return lines


def model_card(repo_id: str, entries: Sequence[IndexEntry], reports: Sequence[dict[str, Any]]) -> str:
    """README.md for the artifacts of one push (``reports`` are their ``report.report``)."""
    kinds = sorted({e.adapter_kind for e in entries if e.adapter_kind and e.adapter_kind != C.ADAPTER_KIND_OTHER})
    bases = sorted({e.base_model.id for e in entries if e.base_model.id})
    versions = sorted({e.format_version for e in entries if e.format_version}, key=_version_key)
    tags = ["compeft", *kinds]
    if any(r["compression"].get("mode") == C.MODE_TERNARY for r in reports):
        tags.append("ternary")
    lines = ["---", "library_name: compeft"]
    if len(bases) == 1:
        lines.append(f"base_model: {bases[0]}")
    elif bases:
        lines += ["base_model:"] + [f"- {b}" for b in bases]
    lines += ["tags:"] + [f"- {t}" for t in tags] + ["---", "", f"# {repo_id.split('/')[-1]}", "",
              f"Compressed fine-tuning artifact(s) in the compeft format {', '.join(versions) or C.FORMAT_VERSION} "
              "(ComPEFT: sparse ternary task vectors). Every file is a safetensors file with sha256 digests of all "
              f"its streams; `{C.HUB_INDEX_FILE}` lists each file's sha256 and the base model it belongs to.", "",
              "| file | what | params | bytes | bits/param | smaller than fp16 | density | alpha | base model |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for e, r in zip(entries, reports, strict=True):
        c = r["compression"]
        lines.append(f"| {e.path} | {e.kind} | {r['params']:,} | {r['file_bytes']:,} "
                     f"| {r['bits_per_param']:.3f} | {r['ratio_vs_fp16']:.1f}x | {c.get('density')} | {c.get('alpha')} "
                     f"| {e.base_model.describe() if not e.base_model.is_empty else '-'} |")
    lines += [""] + [f"- **{k}**: {ARTIFACT_KINDS.get(k, k)}" for k in sorted({e.kind for e in entries})]
    needing = [e for e in entries if e.requires]
    for e in needing:
        lines += ["", f"## {e.path} needs", "",
                  f"`{e.path}` works only with {', '.join(f'`{p}`' for p in e.requires)} applied first "
                  "(`cf.load_adapter` finds and applies it from the same folder), on the exact base model both "
                  "were made for, not on the model it was derived from:", "", *base_lines(e.base_model)]
    first = needing[0].path if needing else None
    lines += ["", "```python", "import compeft_format as cf", "",
              f'files = cf.pull("{repo_id}")           # downloads, checks every byte',
              (f'model = cf.load_adapter(base_model, files.paths[0].parent / "{first}")  # its requirements first'
               if first else "model = cf.load_adapter(base_model, files.paths[0])"), "```", "",
              f"Written by compeft {__version__}.", ""]
    return "\n".join(lines)


__all__ = ["model_card", "base_lines"]
