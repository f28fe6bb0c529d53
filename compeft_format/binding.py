"""The base model an artifact belongs to (spec 3.4, 3.5): its identity, a fingerprint of its
weights and, for a compressed base, the model it was derived from and the recipe that derived it.

``BaseBinding`` is what a manifest's ``base_model`` holds, what a Hub index records for each
artifact, and what ``check`` compares with a model, a checkpoint or a user's claim. Its JSON form
is read and written from the dataclass fields alone, so a new binding field is one field here.

Example:
    >>> binding = compute("./smollm2", id="HuggingFaceTB/SmolLM2-135M")   # a local checkpoint
    >>> check(binding, model)                      # raises BaseMismatch naming both sides
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from torch import nn

from . import constants as C
from .container import read_safetensors_header
from .dtypes import DTYPE_NAMES
from .errors import (
    BaseMismatch,
    FileNotFound,
    InputError,
    InvalidArgument,
    NotSafetensors,
    UnsupportedModel,
)
from .hf_models import is_packed, load_float_model
from .integrity import tensor_bytes
from .jsonfields import as_object, as_str
from .peft_layout import base_model_of, base_state_dict

#: The fingerprint of the weights as stored: names, dtypes, shapes and bytes.
AS_STORED = C.FINGERPRINT_ALGORITHM
#: The fingerprint of the weights' values: every floating tensor as binary32, so that an fp16,
#: bf16 or fp32 copy of the same weights has the same fingerprint.
FLOAT32 = C.FINGERPRINT_ALGORITHM_F32

Weights = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike[str]


# --- JSON (spec 3.5): every field names its parser; ``omit`` fields are written only when set ---
def _parsed(parse: Callable[[Any, str], Any], *, omit: bool = False) -> Any:
    return field(default=None, metadata={"parse": parse, "omit": omit})


_T = TypeVar("_T")


def _from_json(cls: type[_T], obj: Any, where: str) -> _T:
    o = as_object(obj, where)
    kwargs = {}
    for f in fields(cls):  # type: ignore[arg-type]
        raw = o.get(f.name)
        kwargs[f.name] = None if raw is None else f.metadata["parse"](raw, f"{where}.{f.name}")
    return cls(**kwargs)


def _to_json(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.metadata["omit"]:
            continue
        out[f.name] = value.to_json() if hasattr(value, "to_json") else value
    return out


@dataclass(frozen=True)
class Fingerprint:
    """A digest of a model's weights under a named algorithm (spec 3.4)."""

    algorithm: str
    value: str

    def to_json(self) -> dict[str, str]:
        return {"algorithm": self.algorithm, "value": self.value}

    @classmethod
    def from_json(cls, obj: Any, where: str = "fingerprint") -> Fingerprint:
        o = as_object(obj, where)
        return cls(algorithm=as_str(o.get("algorithm"), f"{where}.algorithm"), value=as_str(o.get("value"), f"{where}.value"))

    def short(self) -> str:
        return f"{self.algorithm} {self.value[:16]}"


@dataclass(frozen=True)
class ModelRef:
    """Which model: an identifier (a Hub repository, a path), a revision, and a fingerprint of its
    weights. ``None`` means unknown."""

    id: str | None = _parsed(as_str)
    revision: str | None = _parsed(as_str)
    fingerprint: Fingerprint | None = _parsed(Fingerprint.from_json)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, obj: Any, where: str = "base_model") -> ModelRef:
        return _from_json(cls, obj, where)

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def describe(self) -> str:
        """One line: ``id@revision (algorithm value-prefix)``."""
        text = self.id or "an unnamed model"
        if self.revision:
            text += f"@{self.revision}"
        if self.fingerprint is not None:
            text += f" (fingerprint {self.fingerprint.short()})"
        return text


def _recipe(x: Any, where: str) -> dict[str, Any]:
    return dict(as_object(x, where))


@dataclass(frozen=True)
class BaseBinding(ModelRef):
    """The base model an artifact was made for. For a compressed base (a quantised or pruned
    model), ``derived_from`` names the model it was made from and ``recipe`` how: its members are
    informative (this library writes ``name``, ``library``, ``library_version``, ``params`` and
    ``calibration_sha256``)."""

    derived_from: ModelRef | None = _parsed(ModelRef.from_json, omit=True)
    recipe: dict[str, Any] | None = _parsed(_recipe, omit=True)

    @classmethod
    def from_json(cls, obj: Any, where: str = "base_model") -> BaseBinding:
        return _from_json(cls, obj, where)

    def describe(self) -> str:
        text = super().describe()
        if self.derived_from is not None:
            text += f", derived from {self.derived_from.describe()}"
            if self.recipe and isinstance(self.recipe.get("name"), str):
                text += f" by {self.recipe['name']}"
        return text


# --- fingerprints -----------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype) or str(dtype).removeprefix("torch.")


def _plain(name: str, t: torch.Tensor) -> torch.Tensor:
    data = t.detach()
    if type(data) is not torch.Tensor:
        raise UnsupportedModel(f"tensor {name!r} is a {type(data).__name__}, whose stored bytes are not a plain "
                               "array; fingerprint the checkpoint it was saved as instead", modules=[name])
    if data.device.type == "meta":
        raise UnsupportedModel(f"tensor {name!r} has no data (meta device)", modules=[name])
    return data


#: dtypes ``FLOAT32`` fingerprints as binary32 (spec 3.4)
_TO_FLOAT32 = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)


def _canonical_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as binary32, every NaN as the bits 0x7FC00000 (converters disagree on NaN bits)."""
    out = t.to(torch.float32)
    nan = torch.isnan(out)
    if bool(nan.any()):
        out = torch.where(nan, torch.tensor(0x7FC00000, dtype=torch.int32).view(torch.float32), out)
    return out


def _digest(names: Iterable[str], get: Callable[[str], torch.Tensor], algorithm: str) -> Fingerprint:
    """The byte sequence of spec 3.4 for the named tensors, hashed one tensor at a time."""
    if algorithm not in C.FINGERPRINT_ALGORITHMS:
        raise InvalidArgument(f"unknown fingerprint algorithm {algorithm!r}; use one of {list(C.FINGERPRINT_ALGORITHMS)}")
    h = hashlib.sha256()
    for name in sorted(names):  # code-point order
        t = _plain(name, get(name))
        if algorithm == FLOAT32 and t.dtype in _TO_FLOAT32:
            t = _canonical_float32(t)
        line = json.dumps({"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}, separators=(",", ":"))
        h.update(line.encode() + b"\n")
        if t.numel():
            h.update(tensor_bytes(t))
    return Fingerprint(algorithm, h.hexdigest())


def _storage_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) if ptr and t.numel() else None


def untied(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` without those that share their storage with one earlier in it (tied weights),
    as checkpoint writers store them once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[Any, ...]] = set()
    for name, t in tensors.items():
        key = _storage_key(t)
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        out[name] = t
    return out


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of ``model``'s base weights holds: on a model holding peft
    adapters the base model's own (``peft_layout.base_state_dict``), tied weights once."""
    return untied(base_state_dict(model))


def checkpoint_files(path: str | os.PathLike[str]) -> dict[str, Path]:
    """Which file holds each tensor of a safetensors checkpoint: a ``.safetensors`` file, or a
    folder with one ``*.safetensors.index.json`` (sharded), ``model.safetensors``, or a single
    ``.safetensors`` file. Every file's header is checked; a tensor held twice is refused.

    Raises:
        FileNotFound, InputError, and the container errors of the files.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFound(f"no such file or folder: {p}", path=str(p))
    if p.is_file():
        files = [p]
        weight_map: dict[str, str] | None = None
    else:
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise InputError(f"{p} holds several checkpoint indexes: {[i.name for i in indexes]}", path=str(p))
        if indexes:
            weight_map = _weight_map(indexes[0])
            files = [p / n for n in sorted(set(weight_map.values()))]
        else:
            weight_map = None
            singles = [p / "model.safetensors"] if (p / "model.safetensors").is_file() else sorted(p.glob("*.safetensors"))
            if len(singles) != 1:
                raise InputError(f"{p} holds no safetensors checkpoint (model.safetensors or a sharded index)", path=str(p))
            files = singles
    where: dict[str, Path] = {}
    for f in files:
        header, _, _ = read_safetensors_header(f)
        for name in header:
            if name in where:
                raise InputError(f"tensor {name!r} is stored in both {where[name].name} and {f.name}", path=str(p))
            where[name] = f
    if weight_map is not None:
        wrong = sorted(n for n in set(where) | set(weight_map) if weight_map.get(n) != getattr(where.get(n), "name", None))
        if wrong:
            raise InputError(f"{p}: the index and the shards disagree about {len(wrong)} tensor(s), e.g. {wrong[0]!r}",
                             path=str(p))
    return where


def _weight_map(index: Path) -> dict[str, str]:
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{index} is not a readable JSON index: {e}", path=str(index)) from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise InputError(f"{index} has no weight_map of tensor names to file names", path=str(index))
    for shard in set(wm.values()):
        if Path(shard).name != shard or shard in ("", ".", "..") or not (index.parent / shard).is_file():
            raise InputError(f"{index} names a shard that is not a file beside it: {shard!r}", path=str(index))
    return dict(wm)


class BaseWeights:
    """Weights to fingerprint: a state dict; a torch model (a transformers or peft model: its base
    weights, ``model_state_dict``); or the path of a safetensors checkpoint (``checkpoint_files``,
    whose headers are checked here), read one tensor at a time. Each algorithm is computed once.

    Raises:
        InvalidArgument: neither of these. FileNotFound, InputError, and the container errors of a
        checkpoint that cannot be read.
    """

    def __init__(self, weights: Weights) -> None:
        self._memory: Mapping[str, torch.Tensor] | None = None
        self._files: dict[str, Path] | None = None
        self._backbone: str | None = None
        if isinstance(weights, nn.Module):
            self._memory = base_state_dict(weights)
            self._backbone = _backbone_prefix(weights, self._memory)
        elif isinstance(weights, (str, os.PathLike)) and Path(weights).is_dir() and is_packed(weights):
            # a compressed-tensors checkpoint stands for the weights transformers dequantises it to
            model = load_float_model(weights)
            self._memory = base_state_dict(model)
            self._backbone = _backbone_prefix(model, self._memory)
        elif isinstance(weights, (str, os.PathLike)):
            self._files = checkpoint_files(weights)
        elif isinstance(weights, Mapping):
            self._memory = weights
        else:
            raise InvalidArgument(f"cannot fingerprint a {type(weights).__name__}; pass a model, a state dict or "
                                  "a checkpoint path")
        self._cache: dict[str, list[Fingerprint]] = {}
        self._shard: tuple[Path, Any] | None = None  # the checkpoint file open now

    def backbone_fingerprint(self, algorithm: str = AS_STORED) -> Fingerprint | None:
        """For a model with a task head around a backbone (a transformers model whose
        ``base_model_prefix`` sub-model holds all but the head: ``BertForSequenceClassification``'s
        ``bert``), the fingerprint of the backbone's checkpoint (its tensors named without the
        prefix), which a backbone-only base folder records; None for other weights."""
        if self._backbone is None or self._memory is None:
            return None
        key = f"backbone:{algorithm}"
        if key not in self._cache:
            cut = len(self._backbone) + 1
            once = untied({k[cut:]: v for k, v in self._memory.items() if k.startswith(self._backbone + ".")})
            self._cache[key] = [_digest(once, once.__getitem__, algorithm)]
        return self._cache[key][0]

    def fingerprints(self, algorithm: str = AS_STORED) -> list[Fingerprint]:
        """The values these weights may be recorded as: the spec's first; for weights in memory
        with tied tensors also the value over every tensor of the state dict, which writers before
        format 1.2 recorded."""
        if algorithm not in self._cache:
            if self._memory is not None:
                tensors = self._memory
                once = untied(tensors)
                values = [_digest(once, once.__getitem__, algorithm)]
                if len(once) != len(tensors):
                    values.append(_digest(tensors, tensors.__getitem__, algorithm))
            else:
                assert self._files is not None
                values = [_digest(self._files, self._checkpoint_tensor, algorithm)]
            self._cache[algorithm] = values
        return self._cache[algorithm]

    def _checkpoint_tensor(self, name: str) -> torch.Tensor:
        assert self._files is not None
        f = self._files[name]
        try:  # one file open at a time
            if self._shard is None or self._shard[0] != f:
                self._shard = (f, safe_open(str(f), framework="pt"))
            return self._shard[1].get_tensor(name)
        except Exception as e:  # safetensors raises its own untyped errors
            raise NotSafetensors(f"cannot read tensor {name!r} from {f}: {e}", path=str(f)) from None


def _backbone_prefix(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The ``base_model_prefix`` of a transformers model whose tensors lie partly under it (a
    backbone with a head), else None."""
    inner = base_model_of(model)
    prefix = getattr(inner, "base_model_prefix", None)
    if not isinstance(prefix, str) or not prefix or not isinstance(getattr(inner, prefix, None), nn.Module):
        return None
    under = sum(1 for k in tensors if k.startswith(prefix + "."))
    return prefix if 0 < under < len(tensors) else None


def fingerprint(weights: Weights | BaseWeights, algorithm: str = AS_STORED) -> Fingerprint:
    """Fingerprint of a model's weights (spec 3.4): of a state dict, a torch model or a safetensors
    checkpoint (see ``BaseWeights``).

    Args:
        algorithm: ``AS_STORED`` (``sha256-state-dict-v1``) or ``FLOAT32``
            (``sha256-state-dict-f32-v1``, equal for copies of the weights in other float dtypes).

    Raises:
        InvalidArgument: unknown algorithm. UnsupportedModel: tensors without plain bytes.
        FileNotFound, InputError, NotSafetensors: a checkpoint that cannot be read.
    """
    weights = weights if isinstance(weights, BaseWeights) else BaseWeights(weights)
    return weights.fingerprints(algorithm)[0]


def compute(weights: Weights | BaseWeights, *, id: str | None = None, revision: str | None = None, algorithm: str = AS_STORED,
            derived_from: ModelRef | None = None, recipe: Mapping[str, Any] | None = None) -> BaseBinding:
    """A binding to these weights: their fingerprint plus the identity given."""
    return BaseBinding(id=id, revision=revision, fingerprint=fingerprint(weights, algorithm),
                       derived_from=derived_from, recipe=None if recipe is None else dict(recipe))


def check(recorded: ModelRef, candidate: ModelRef | BaseWeights | Weights, *, require: bool = False,
          subject: str = "the artifact") -> None:
    """Check that ``candidate`` is the base ``recorded`` names.

    ``candidate`` is a binding (a user's claim: an id, a fingerprint, ...) or the weights themselves
    (a model, a state dict, a checkpoint path, ``BaseWeights``), whose fingerprint is then computed
    with the algorithm of the recorded one. Every field both sides give must agree. With
    ``require``, every field the candidate gives must also be recorded (a download that must belong
    to a given base); without, fields the artifact does not record are not checked (applying a
    file that records no fingerprint).

    Raises:
        BaseMismatch: naming both sides (``expected``: ``recorded``; ``actual``: the candidate's
        binding, its fingerprint computed where weights were given).
    """
    problems: list[str] = []
    if isinstance(candidate, ModelRef):
        given = candidate
        shown = given.describe()
    else:
        weights = candidate if isinstance(candidate, BaseWeights) else BaseWeights(candidate)
        fp = recorded.fingerprint
        given = ModelRef()
        if fp is None:
            if require:
                problems.append("it records no fingerprint")
        elif fp.algorithm not in C.FINGERPRINT_ALGORITHMS:
            problems.append(f"its fingerprint algorithm {fp.algorithm!r} is unknown to this library")
        else:
            values = weights.fingerprints(fp.algorithm)
            if fp not in values:
                backbone = weights.backbone_fingerprint(fp.algorithm)
                values = values + ([backbone] if backbone is not None else [])
            given = ModelRef(fingerprint=fp if fp in values else values[0])
        shown = "the weights given" + (f" (fingerprint {given.fingerprint.short()})" if given.fingerprint else "")
    for f in fields(given):
        have, want = getattr(given, f.name), getattr(recorded, f.name, None)
        if have is None:
            continue
        if want is None:
            if require:
                problems.append(f"it records no {f.name}")
        elif isinstance(want, Fingerprint) and isinstance(have, Fingerprint) and want.algorithm != have.algorithm:
            problems.append(f"its fingerprint is {want.algorithm}, the one given {have.algorithm}")
        elif want != have:
            problems.append(f"{f.name.replace('_', ' ')} differs")
    if problems:
        raise BaseMismatch(f"{subject} was made for {recorded.describe()}, not {shown}: "
                           + "; ".join(problems), expected=recorded, actual=given)


__all__ = ["AS_STORED", "FLOAT32", "Fingerprint", "ModelRef", "BaseBinding", "BaseWeights", "fingerprint", "compute",
           "check", "model_state_dict", "untied", "checkpoint_files"]
