"""Training and evaluation text for CPET: JSON Lines files read as hostile input, tokenised once,
batched in an order fixed by the seed and the epoch (so a resumed run sees the same batches).

Each line of a file is one JSON object. For a language model (``causal-lm``): ``text`` (the model
learns every token) or ``prompt`` and ``completion`` (the model learns the completion's tokens
only; the prompt is context). For sequence classification (``classify``): ``text`` and ``label``
(a string, or an integer taken as its decimal text). Blank lines are skipped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compeft_format.errors import FileNotFound, InputError, InvalidArgument, IOFailure

#: The label of a token the loss ignores (transformers' convention).
IGNORE = -100
#: Largest data file read, in bytes.
MAX_FILE_BYTES = 1 << 30


@dataclass(frozen=True)
class Example:
    """One tokenised example: ``labels[i]`` is ``input_ids[i]`` where the loss counts it, else
    ``IGNORE``; a classification example has ``label``, its class index, instead."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    label: int | None = None

    @property
    def tokens(self) -> int:
        """Predictions the loss counts: learned tokens (the first token is never predicted), or 1
        for a classification example."""
        if self.label is not None:
            return 1
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The records of a JSON Lines file: each ``{"text": str}`` (with ``"label"`` when the line has
    one) or ``{"prompt": str, "completion": str}``.

    Raises:
        FileNotFound: no such file.
        InputError: a line that is not such an object (the message gives the line number), an
            empty file, or a file over ``MAX_FILE_BYTES``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFound(f"no such data file: {p}", path=str(p))
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise InputError(f"{p}: larger than {MAX_FILE_BYTES} bytes", path=str(p))
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{p} is not UTF-8 text", path=str(p)) from None
    except OSError as e:
        raise IOFailure(f"cannot read {p}: {e.strerror or e}", path=str(p)) from None
    records: list[dict[str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line)
        except (ValueError, RecursionError):
            raise InputError(f"{p}:{n}: not a JSON object", path=str(p)) from None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            label = obj.get("label")
            if label is None:
                records.append({"text": obj["text"]})
            elif isinstance(label, str) or (isinstance(label, int) and not isinstance(label, bool)):
                records.append({"text": obj["text"], "label": str(label)})
            else:
                raise InputError(f"{p}:{n}: \"label\" must be a string or an integer", path=str(p))
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            records.append({"prompt": obj["prompt"], "completion": obj["completion"]})
        else:
            raise InputError(f"{p}:{n}: each line must be an object with a string \"text\", or strings "
                             "\"prompt\" and \"completion\"", path=str(p))
    if not records:
        raise InputError(f"{p}: no examples", path=str(p))
    return records


def tokenize(records: Sequence[dict[str, str]], tokenizer: Any, max_len: int) -> list[Example]:
    """Tokenise ``records``; a completion ends with the tokenizer's end-of-sequence token. Examples
    longer than ``max_len`` tokens are cut from the right; those left with nothing to learn are
    dropped.

    Raises:
        InvalidArgument: ``max_len`` under 2, or no example has a token to learn.
    """
    if max_len < 2:
        raise InvalidArgument(f"max_len must be at least 2, got {max_len}")
    eos = tokenizer.eos_token_id
    out: list[Example] = []
    for r in records:
        if "text" in r:
            ids = list(tokenizer(r["text"], add_special_tokens=False)["input_ids"])
            labels = list(ids)
        else:
            prompt = list(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
            completion = list(tokenizer(r["completion"], add_special_tokens=False)["input_ids"])
            if eos is not None:
                completion.append(int(eos))
            ids = prompt + completion
            labels = [IGNORE] * len(prompt) + completion
        ex = Example(tuple(ids[:max_len]), tuple(labels[:max_len]))
        if ex.tokens > 0:
            out.append(ex)
    if not out:
        raise InvalidArgument("no example has a token to learn")
    return out


def label_names(records: Sequence[dict[str, str]]) -> tuple[str, ...]:
    """The labels of classification records, sorted (numerically when all are integers).

    Raises:
        InvalidArgument: a record without a label, or fewer than two labels.
    """
    if any("label" not in r for r in records):
        raise InvalidArgument("classification data needs a \"label\" on every line")
    names = {r["label"] for r in records}
    if len(names) < 2:
        raise InvalidArgument(f"classification needs at least two labels, the data has {sorted(names)}")
    numeric = all(re.fullmatch(r"-?[0-9]{1,18}", x, re.ASCII) for x in names)
    return tuple(sorted(names, key=(lambda x: (int(x), x)) if numeric else None))


def tokenize_classes(records: Sequence[dict[str, str]], tokenizer: Any, max_len: int,
                     labels: Sequence[str]) -> list[Example]:
    """Tokenise classification records with the tokenizer's special tokens (``[CLS] ... [SEP]``),
    cut to ``max_len`` tokens; ``label`` is the index of the record's label in ``labels``.

    Raises:
        InvalidArgument: ``max_len`` under 2, a record without a label or with one not in ``labels``.
    """
    if max_len < 2:
        raise InvalidArgument(f"max_len must be at least 2, got {max_len}")
    index = {name: i for i, name in enumerate(labels)}
    out: list[Example] = []
    for n, r in enumerate(records, 1):
        if r.get("label") not in index:
            raise InvalidArgument(f"example {n}: label {r.get('label')!r} is not one of {list(labels)}")
        ids = list(tokenizer(r["text"], truncation=True, max_length=max_len)["input_ids"])[:max_len]
        out.append(Example(tuple(ids), (IGNORE,) * len(ids), index[r["label"]]))
    return out


def order(n: int, *, seed: int, epoch: int) -> list[int]:
    """The order of ``n`` examples in ``epoch``: a permutation fixed by ``seed`` and ``epoch``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [int(i) for i in torch.randperm(n, generator=g)]


def micro_batches(n_examples: int, batch_size: int, *, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Endless micro-batches of example indices, epoch after epoch, from micro-batch ``start``
    (counted from the first epoch): the same sequence whether a run starts at 0 or resumes."""
    if batch_size < 1:
        raise InvalidArgument(f"batch size must be at least 1, got {batch_size}")
    per_epoch = max(1, n_examples // batch_size)  # a last partial batch is dropped: equal-sized batches
    k = start
    while True:
        epoch, i = divmod(k, per_epoch)
        perm = order(n_examples, seed=seed, epoch=epoch)
        yield perm[i * batch_size:(i + 1) * batch_size] if n_examples >= batch_size else perm
        k += 1


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE`` on padding), and
    ``class_labels`` when the examples are classification examples."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if examples[0].label is not None:
        out["class_labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return out
