"""The settings of a CPET run (``TrainConfig``), apart from the training code so that the command
line can build its flags without importing torch."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compeft_format.errors import FileNotFound, InputError, InvalidArgument

#: what a run trains the model for
TASKS = ("causal-lm", "classify")


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if default is dataclasses.MISSING and "default_factory" not in kw:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """Everything a run depends on; ``compeft cpet train`` has one flag per field, and a config
    file (``--config``, JSON) holds the same names."""

    base: str = _help("the compressed base model: a transformers folder (``compeft cpet compress-base``)")
    data: str = _help("training data, JSON Lines: {\"text\"} or {\"prompt\", \"completion\"} per line; "
                      "{\"text\", \"label\"} to classify")
    output: str = _help("the run folder: config, log, checkpoints, final adapter")
    teacher: str | None = _help("the original (uncompressed) model folder; needed for distillation", None)
    inherit: str | None = _help("a LoRA trained on the original model (compeft file or PEFT folder) to start from",
                                None)
    eval: str | None = _help("evaluation data, same format as data", None)
    task: str = _help("causal-lm (learn the text's tokens) or classify (a new sequence-classification head "
                      "trained with the LoRA, e.g. on an encoder such as BERT)", "causal-lm")
    labels: tuple[str, ...] = _help("classify: the label names in the head's order (default: the labels of "
                                    "the training data, sorted)", ())
    task_lora: bool = _help("train a task LoRA (off: recovery modules only, the task-agnostic recovery)", True)
    lora_r: int = _help("LoRA rank (ignored when inheriting: the source's config is used)", 8)
    lora_alpha: int = _help("LoRA alpha (ignored when inheriting)", 16)
    lora_dropout: float = _help("LoRA dropout", 0.0)
    target_modules: tuple[str, ...] = _help("LoRA target modules (ignored when inheriting; default: peft's for the "
                                            "architecture, e.g. q_proj,v_proj for Llama, query,value for BERT)", ())
    recovery: bool = _help("add recovery modules beside the linear layers", False)
    recovery_from: str | None = _help("a recovery artifact made for this base (the task-agnostic recovery of a "
                                      "run without the task LoRA, exported), applied frozen; the task "
                                      "artifact then requires it", None)
    recovery_r: int = _help("recovery module rank", 16)
    recovery_alpha: float = _help("recovery module alpha (output scaled by alpha / r)", 16.0)
    recovery_targets: tuple[str, ...] = _help("module names or name suffixes for recovery modules (default: "
                                              "every linear layer of the transformer blocks)", ())
    distill: float = _help("weight of the hidden-state MSE against the teacher (0: none)", 0.0)
    distill_layers: tuple[int, ...] = _help("hidden states compared (indices into hidden_states; -1 the last)", (-1,))
    distill_kl: float = _help("weight of the logit KL divergence against the teacher (0: none)", 0.0)
    temperature: float = _help("temperature of the logit KL", 1.0)
    lr: float = _help("peak learning rate", 1e-4)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    warmup_steps: int = _help("linear warmup steps, then linear decay to 0 at max_steps", 0)
    max_steps: int = _help("optimizer steps", 100)
    batch_size: int = _help("examples per micro-batch (per process)", 4)
    grad_accum: int = _help("micro-batches per optimizer step", 1)
    max_grad_norm: float = _help("gradient clipping norm (0: none)", 1.0)
    max_len: int = _help("tokens per example, longer ones are cut", 256)
    seed: int = _help("seed of initialisation, data order and dropout", 0)
    eval_every: int = _help("evaluate every N steps (0: at the end only)", 0)
    save_every: int = _help("checkpoint every N steps (0: at the end only)", 50)
    keep_checkpoints: int = _help("checkpoints kept", 2)
    eval_batch_size: int = _help("examples per evaluation batch", 8)

    #: fields that may change between a run and its resumption
    RESUMABLE = frozenset({"eval", "eval_every", "save_every", "keep_checkpoints", "eval_batch_size", "output"})

    #: integer settings and their least value; number settings that must be finite and >= 0
    _AT_LEAST = {"max_steps": 1, "batch_size": 1, "grad_accum": 1, "max_len": 1, "eval_batch_size": 1, "lora_r": 1,
                 "recovery_r": 1, "keep_checkpoints": 1, "warmup_steps": 0, "eval_every": 0, "save_every": 0,
                 "seed": 0}
    _NON_NEGATIVE = ("lr", "weight_decay", "distill", "distill_kl", "max_grad_norm", "lora_dropout", "lora_alpha",
                     "recovery_alpha")

    def __post_init__(self) -> None:
        for name in ("target_modules", "recovery_targets", "distill_layers", "labels"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = [x.strip() for x in v.split(",") if x.strip()]
            setattr(self, name, tuple(int(x) for x in v) if name == "distill_layers" else tuple(str(x) for x in v))
        for name, least in self._AT_LEAST.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise InvalidArgument(f"{name} must be an integer >= {least}, got {v!r}")
        for name in self._NON_NEGATIVE:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise InvalidArgument(f"{name} must be a finite number >= 0, got {v!r}")
        if self.task not in TASKS:
            raise InvalidArgument(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if self.labels and (self.task != "classify" or len(set(self.labels)) != len(self.labels)
                            or len(self.labels) < 2):
            raise InvalidArgument("labels are two or more distinct names, and only for task classify")
        if self.task == "classify" and not self.task_lora:
            raise InvalidArgument("task classify trains a head with the task LoRA; train task-agnostic recovery "
                                  "modules as task causal-lm (on a causal LM) instead")
        if self.task == "classify" and self.distill_kl and not self.inherit:
            raise InvalidArgument("the logit KL of a classifier needs the inherited head (inherit): a new "
                                  "teacher head is random")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise InvalidArgument(f"temperature must be positive, got {self.temperature!r}")
        if not self.task_lora and not self.recovery:
            raise InvalidArgument("nothing to train: enable the task LoRA or recovery modules")
        if not self.task_lora and self.inherit:
            raise InvalidArgument("inherit needs the task LoRA")
        if self.recovery_from and (self.recovery or not self.task_lora):
            raise InvalidArgument("recovery_from applies recovery modules made before: train the task LoRA with "
                                  "them, not new recovery modules")
        if (self.distill or self.distill_kl) and not self.teacher:
            raise InvalidArgument("distillation needs the teacher (the original model folder)")
        if not self.distill_layers:
            raise InvalidArgument("distill_layers must name at least one hidden state")

    def to_json(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, obj: Any, where: str = "config") -> TrainConfig:
        """A config from its JSON form; unknown names are refused (a misspelt setting would be lost).

        Raises:
            InvalidArgument: not an object, unknown names, missing required names, bad values.
        """
        if not isinstance(obj, dict):
            raise InvalidArgument(f"{where}: a training config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise InvalidArgument(f"{where}: unknown setting(s) {unknown}")
        try:
            return cls(**obj)
        except TypeError as e:
            raise InvalidArgument(f"{where}: {e}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
        """A config read from a JSON file, with ``overrides`` (None values ignored) on top."""
        p = Path(path)
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFound(f"no such config file: {p}", path=str(p)) from None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InputError(f"{p} is not a JSON object", path=str(p)) from None
        if not isinstance(obj, dict):
            raise InputError(f"{p} is not a JSON object", path=str(p))
        obj.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_json(obj, str(p))
