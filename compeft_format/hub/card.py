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
from .download import is_model_id
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


#: the lines that delimit the part of a model card compeft writes; the rest is the owner's
BEGIN = "<!-- compeft:begin (written by compeft push; edits between these lines are replaced) -->"
END = "<!-- compeft:end -->"


def front_matter(entries: Sequence[IndexEntry], reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The card metadata the Hub reads for the artifacts: ``library_name``, ``base_model``
    (the ids of the bases, when recorded as Hub model ids) and ``tags``."""
    kinds = sorted({e.adapter_kind for e in entries if e.adapter_kind and e.adapter_kind != C.ADAPTER_KIND_OTHER})
    # only Hub model ids: a local path (from a PEFT config's base_model_name_or_path) names nothing
    # there, and the Hub refuses card metadata whose base_model is not a model id
    bases = sorted({e.base_model.id for e in entries if e.base_model.id and is_model_id(e.base_model.id)})
    tags = ["compeft", *kinds]
    if any(r["compression"].get("mode") == C.MODE_TERNARY for r in reports):
        tags.append("ternary")
    data: dict[str, Any] = {"library_name": "compeft"}
    if bases:
        data["base_model"] = bases[0] if len(bases) == 1 else bases
    data["tags"] = tags
    return data


def section(repo_id: str, entries: Sequence[IndexEntry], pushed: dict[str, dict[str, Any]]) -> str:
    """The card's compeft section: every artifact of the index (``entries``), the details of the
    files of this push (``pushed``: their ``report.report`` by path), what each kind of artifact
    is, and what each artifact needs before it can be applied."""
    versions = sorted({e.format_version for e in entries if e.format_version}, key=_version_key)
    lines = [BEGIN, "", "## compeft artifacts", "",
             f"Compressed fine-tuning artifact(s) in the compeft format {', '.join(versions) or C.FORMAT_VERSION} "
             "(ComPEFT: sparse ternary task vectors). Every file is a safetensors file with sha256 digests of all "
             f"its streams; `{C.HUB_INDEX_FILE}` lists each file's sha256 and the base model it belongs to.", "",
             "| file | what | bytes | params | bits/param | smaller than fp16 | density | alpha | base model |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for e in entries:
        r = pushed.get(e.path)
        base = e.base_model.describe() if not e.base_model.is_empty else "-"
        if r is None:  # pushed earlier: the index has what the row needs but the sizes of the method
            lines.append(f"| {e.path} | {e.kind} | {e.size:,} | | | | | | {base} |")
            continue
        c = r["compression"]
        lines.append(f"| {e.path} | {e.kind} | {r['file_bytes']:,} | {r['params']:,} | {r['bits_per_param']:.3f} "
                     f"| {r['ratio_vs_fp16']:.1f}x | {c.get('density')} | {c.get('alpha')} | {base} |")
    lines += [""] + [f"- **{k}**: {ARTIFACT_KINDS.get(k, k)}" for k in sorted({e.kind for e in entries})]
    needing = [e for e in entries if e.requires]
    for e in needing:
        lines += ["", f"### {e.path} needs", "",
                  f"`{e.path}` works only with {', '.join(f'`{p}`' for p in e.requires)} applied first "
                  "(`cf.load_adapter` finds and applies it from the same folder), on the exact base model both "
                  "were made for, not on the model it was derived from:", "", *base_lines(e.base_model)]
    first = needing[0].path if needing else (entries[-1].path if entries else "")
    lines += ["", "```python", "import compeft_format as cf", "",
              f'files = cf.pull("{repo_id}")           # downloads, checks every byte',
              f'model = cf.load_adapter(base_model, files.paths[0].parent / "{first}")'
              + ("  # its requirements first" if needing else ""), "```", "",
              f"Written by compeft {__version__}.", "", END]
    return "\n".join(lines)


def split_card(text: str) -> tuple[dict[str, Any], str] | None:
    """(front matter, body) of a model card; None when its front matter is not a YAML mapping
    (then the card is not touched). A card without front matter has an empty one."""
    import yaml

    if not text.startswith("---"):
        return {}, text
    lines = text.split("\n")
    if lines[0].strip() != "---":
        return {}, text
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        return None
    try:  # the card is a stranger's text: any failure to read it leaves it alone
        data = yaml.safe_load("\n".join(lines[1:end])) or {}
    except (yaml.YAMLError, RecursionError, ValueError, MemoryError):
        return None
    if not isinstance(data, dict):
        return None
    return data, "\n".join(lines[end + 1:])


def merge_card(existing: str | None, repo_id: str, data: dict[str, Any], part: str) -> str | None:
    """The model card after a push: ``existing`` (None: the repository has none) with the compeft
    section ``part`` put in place of its previous one, or appended after the owner's text, and the
    front matter ``data`` merged in: tags are added to the owner's, ``library_name`` and
    ``base_model`` are set only where the owner has none. Every other member, the licence and the
    evaluation results among them, stays. None when the existing card's front matter cannot be
    read: it is left as it is."""
    import yaml

    front: dict[str, Any]
    if existing is None:
        front, body = {}, f"\n# {repo_id.split('/')[-1]}\n"
    else:
        parsed = split_card(existing)
        if parsed is None:
            return None
        front, body = parsed
    merged = dict(front)
    for key in ("library_name", "base_model"):
        if key in data and not merged.get(key):
            merged[key] = data[key]
    old_tags = merged.get("tags")
    tags = list(old_tags) if isinstance(old_tags, list) else ([old_tags] if isinstance(old_tags, str) else [])
    merged["tags"] = tags + [t for t in data.get("tags", []) if t not in tags]
    if BEGIN in body and END in body.split(BEGIN, 1)[1]:
        before, rest = body.split(BEGIN, 1)
        body = before + part + rest.split(END, 1)[1]
    else:
        body = body.rstrip("\n") + "\n\n" + part + "\n"
    head = yaml.safe_dump(merged, sort_keys=False, allow_unicode=True, default_flow_style=False).rstrip("\n")
    return f"---\n{head}\n---\n{body}"


def model_card(repo_id: str, entries: Sequence[IndexEntry], reports: Sequence[dict[str, Any]]) -> str:
    """README.md for a new repository holding ``entries`` (``reports``: their ``report.report``)."""
    card = merge_card(None, repo_id, front_matter(entries, reports),
                      section(repo_id, entries, {e.path: r for e, r in zip(entries, reports, strict=True)}))
    assert card is not None
    return card


__all__ = ["model_card", "merge_card", "split_card", "section", "front_matter", "base_lines", "BEGIN", "END"]
