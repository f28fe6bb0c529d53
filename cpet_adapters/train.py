"""CPET / CA-LoRA training on a compressed base model.

The student is the compressed base with a task LoRA (optionally inherited from a LoRA trained on
the original model, ``inherit``) and, optionally, recovery modules beside its linear layers
(``compeft_format.recovery``). The teacher is the original model with the inherited LoRA, frozen.
The loss of one optimizer step is

    CE(student) + distill * MSE(student hidden states, teacher hidden states)
                + distill_kl * T^2 * KL(teacher logits / T || student logits / T)

with the cross-entropy normalised by the number of learned tokens of the whole accumulation
window, and the hidden-state and logit terms averaged over the window's real positions (over its
examples for class logits), counted over every process: accumulating k micro-batches, or k
processes of a batch each, equals one batch k times larger.

The step is plain torch wrapped by ``accelerate``, so one command runs unchanged on a CPU, one GPU
or several (``accelerate launch`` / ``torchrun``). A run folder holds its config, a JSON Lines log,
checkpoints (safetensors and JSON only: trainable weights, optimizer moments, scheduler and RNG
state, data position) from which a run resumes bit-identically, and the final adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from compeft_format.errors import CompeftError, ConfigMismatch, FileNotFound, InputError, InvalidArgument, ModelMismatch
from compeft_format.fileio import atomic_folder, atomic_write_bytes

from .config import TrainConfig
from .data import IGNORE, Example, collate, label_names, micro_batches, read_jsonl, tokenize, tokenize_classes
from .inherit import Inheritance, inherit_lora, read_lora

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
FINAL = "final"
#: the final folder's PEFT adapter (``save_pretrained``) and recovery weights
ADAPTER_DIR = "adapter"
RECOVERY_WEIGHTS = "recovery.safetensors"
RECOVERY_CONFIG = "recovery.json"




@dataclass
class TrainResult:
    """What ``train`` did."""

    output: Path
    #: optimizer steps done in all (including those of earlier calls, when resumed)
    steps: int
    #: the step this call started from (0, or the checkpoint it resumed)
    resumed_from: int
    #: the last evaluation: ``loss`` (mean cross-entropy per learned token, or per example of a
    #: classifier) and ``accuracy`` (share of those predicted exactly); empty without evaluation data
    eval: dict[str, float]
    #: whether the run reached ``max_steps`` (False: stopped by ``stop_after``)
    finished: bool
    #: trainable parameters of the student
    trainable: int


# --- models -------------------------------------------------------------------------------------
def load_causal_lm(path: str | os.PathLike[str]) -> nn.Module:
    """A transformers causal LM from a local folder, float32, in eval mode; nothing is downloaded."""
    return load_model(path)


def load_model(path: str | os.PathLike[str], task: str = "causal-lm", labels: tuple[str, ...] = ()) -> nn.Module:
    """The model a ``task`` trains, from a local folder, float32, in eval mode; nothing is
    downloaded. ``classify`` gives a sequence-classification model over ``labels`` whose head (absent
    from the folder) is initialised from torch's global generator."""
    from compeft_format.hf_models import dequantising_kwargs

    from .quantize import quiet_imports

    with quiet_imports():
        import peft  # noqa: F401 - imported once, quietly: it imports torchao and bitsandbytes
        from transformers import AutoModelForCausalLM

    p = Path(path)
    if not p.is_dir():
        raise FileNotFound(f"no such model folder: {p}", path=str(p))
    try:
        if task == "classify":
            return _load_classifier(p, labels)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, local_files_only=True,
                                                         use_safetensors=True,
                                                         **dequantising_kwargs(p))
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, CompeftError):
            raise
        what = "sequence classifier" if task == "classify" else "causal language model"
        raise InputError(f"cannot load {p} as a {what}: {' '.join(str(e).split())[:300]}", path=str(p)) from None
    model.eval()
    return model


#: the attribute of a classifier from ``load_model`` naming the modules its checkpoint lacked (its
#: new head), which the task LoRA trains and its artifact carries (``modules_to_save``)
NEW_MODULES = "compeft_new_modules"


def _load_classifier(p: Path, labels: tuple[str, ...]) -> nn.Module:
    """A sequence classifier over ``labels`` from the encoder checkpoint in ``p``; refused when the
    checkpoint is a causal LM (its artifacts could not be bound to it, and a decoder pools the last
    token, which padding moves) or holds tensors the classifier does not use (a RoBERTa-family
    pooler: the classifier's backbone would not be the checkpoint)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from compeft_format.hf_models import declares_causal_lm, dequantising_kwargs

    config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    if declares_causal_lm(config):
        raise InvalidArgument(f"{p} is a causal language model ({config.architectures[0]}); task classify trains a "
                              "head on an encoder checkpoint (such as BERT's)")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is new by design: no "newly initialized" report
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(p), dtype=torch.float32, local_files_only=True, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
            output_loading_info=True, use_safetensors=True, **dequantising_kwargs(p))
    finally:
        hf_logging.set_verbosity(level)
    unused = sorted(info.get("unexpected_keys") or [])
    if unused:
        raise InvalidArgument(f"{type(model).__name__} does not use {len(unused)} tensor(s) of {p} (e.g. "
                              f"{unused[0]!r}): an adapter trained on it could not be bound to that checkpoint")
    new = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys") or []})
    setattr(model, NEW_MODULES, tuple(new))
    model.eval()
    return model


def linear_layers(model: nn.Module) -> list[str]:
    """Names of the linear layers of ``model`` except its output head."""
    get_head = getattr(model, "get_output_embeddings", None)
    out_head = get_head() if callable(get_head) else None
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not out_head]


def recovery_layers(model: nn.Module, patterns: tuple[str, ...] = ()) -> list[str]:
    """The linear layers that get recovery modules: those whose name is one of ``patterns`` or ends
    with ``.`` and one; without patterns every linear layer of the transformer blocks (the layers a
    compressed base compresses; not embeddings, output heads or classifiers).

    Raises:
        InvalidArgument: no linear layer matches. UnsupportedModel: no patterns, and the model has no
        list of transformer blocks.
    """
    if not patterns:
        from .base import resolve_targets

        return list(resolve_targets(model, None))
    names = linear_layers(model)
    chosen = [n for n in names if any(n == p or n.endswith("." + p) for p in patterns)]
    if not chosen:
        raise InvalidArgument(f"no linear layer matches recovery_targets {list(patterns)}")
    return chosen


def _peft(get_peft_model: Callable[..., Any], base: nn.Module, config: Any) -> Any:
    """``get_peft_model``, its refusals (no default target modules for an architecture, a target
    that is not a layer peft wraps) as ``InvalidArgument``."""
    try:
        return get_peft_model(base, config)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"peft cannot add the LoRA: {' '.join(str(e).split())[:300]} (name the layers with "
                              "target_modules)") from None


@dataclass
class Student:
    """The model being trained and what was added to it."""

    model: nn.Module
    #: the recovery modules trained here
    recovery: Any | None
    inheritance: Inheritance | None
    lora_config: dict[str, Any] | None
    #: the recovery artifact applied frozen (``recovery_from``): ``requirement`` of its file
    shared_recovery: Any | None = None


def build_student(cfg: TrainConfig, base: nn.Module) -> Student:
    """Wrap ``base`` (frozen) with the task LoRA (inherited or fresh) and recovery modules."""
    from peft import LoraConfig, get_peft_model

    from compeft_format.peft_layout import peft_config

    for p in base.parameters():
        p.requires_grad_(False)
    # the linear layers of the base itself, before peft wraps some of them
    recovery_targets = recovery_layers(base, cfg.recovery_targets) if cfg.recovery else []
    torch.manual_seed(cfg.seed)
    model: nn.Module = base
    inheritance = None
    lora_json = None
    new_modules = list(getattr(base, NEW_MODULES, ()))
    if cfg.task_lora:
        if cfg.inherit:
            tensors, lora_json, inheritance = read_lora(cfg.inherit)
            saved = list(lora_json.get("modules_to_save") or [])
            lacking = [m for m in new_modules if not any(m == s or m.endswith("." + s) for s in saved)]
            if lacking:
                raise ModelMismatch(f"the inherited LoRA does not carry the classifier's new module(s) {lacking} "
                                    "(modules_to_save): train the source with task classify")
            model = _peft(get_peft_model, base, peft_config(lora_json, inference_mode=False))
            inherit_lora(model, tensors)
        else:
            lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            target_modules=list(cfg.target_modules) or None, modules_to_save=new_modules or None,
                            task_type="SEQ_CLS" if cfg.task == "classify" else "CAUSAL_LM")
            pm = _peft(get_peft_model, base, lc)
            lora_json = pm.peft_config["default"].to_dict()
            model = pm
    handle = None
    if cfg.recovery:
        from compeft_format.recovery import RecoveryConfig, add_recovery

        handle = add_recovery(model, RecoveryConfig(r=cfg.recovery_r, alpha=cfg.recovery_alpha,
                                                    target_modules=tuple(recovery_targets)), seed=cfg.seed)
        for p in handle.modules.parameters():
            p.requires_grad_(True)
    shared = None
    if cfg.recovery_from:
        import compeft_format as cf
        from compeft_format import constants as C
        from compeft_format.requirements import requirement

        shared = requirement(cfg.recovery_from)
        if shared.kind != C.ADAPTER_KIND_RECOVERY:
            raise InvalidArgument(f"recovery_from: {cfg.recovery_from} is a {shared.kind} artifact, not recovery "
                                  "modules")
        cf.load_adapter(model, cfg.recovery_from, dtype="float32")  # frozen; refused for another base
    return Student(model, handle, inheritance, lora_json, shared)


def build_teacher(cfg: TrainConfig, labels: tuple[str, ...] = ()) -> nn.Module | None:
    """The original model with the inherited LoRA (when there is one), frozen; None without
    distillation."""
    if not (cfg.distill or cfg.distill_kl):
        return None
    assert cfg.teacher is not None
    teacher = load_model(cfg.teacher, cfg.task, labels)
    if cfg.inherit:
        from peft import get_peft_model

        from compeft_format.peft_layout import peft_config

        tensors, lora_json, _ = read_lora(cfg.inherit)
        teacher = get_peft_model(teacher, peft_config(lora_json, inference_mode=True))
        inherit_lora(teacher, tensors)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    return teacher


#: the largest teacher cache, in bytes; above it the teacher runs at every step
TEACHER_CACHE_BYTES = 1 << 30


class TeacherCache:
    """The frozen teacher's chosen hidden states for every training example, computed once (the
    teacher is deterministic in eval mode, and each example's real positions do not depend on the
    padding beside them), so that a step runs the student only. Batches of ``batch_size`` examples
    in data order, so a resumed run rebuilds the same cache."""

    def __init__(self, teacher: nn.Module, examples: list[Example], layers: tuple[int, ...], *, pad_id: int,
                 batch_size: int, device: torch.device) -> None:
        self.layers = layers
        self.rows: list[dict[int, torch.Tensor]] = []
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                chunk = examples[i:i + batch_size]
                batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
                hidden = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 output_hidden_states=True).hidden_states
                for r, e in enumerate(chunk):
                    self.rows.append({layer: hidden[layer][r, :len(e.input_ids)].cpu().clone() for layer in layers})

    @staticmethod
    def size(examples: list[Example], hidden: int, layers: tuple[int, ...]) -> int:
        """Bytes a cache of float32 hidden states of ``examples`` takes."""
        return sum(len(e.input_ids) for e in examples) * hidden * len(layers) * 4

    def batch(self, indices: list[int], width: int, device: torch.device) -> dict[int, torch.Tensor]:
        """The hidden states of examples ``indices`` right-padded to ``width`` positions, by layer."""
        out = {}
        for layer in self.layers:
            first = self.rows[indices[0]][layer]
            t = first.new_zeros((len(indices), width, first.shape[-1]))
            for r, i in enumerate(indices):
                h = self.rows[i][layer]
                t[r, :h.shape[0]] = h
            out[layer] = t.to(device)
        return out


# --- the loss -----------------------------------------------------------------------------------
def task_cross_entropy(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of a batch and the number of predictions it sums: per learned token of
    a language model, per example of a classifier (``class_labels`` in the batch)."""
    if "class_labels" in batch:
        labels = batch["class_labels"]
        return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())
    return token_cross_entropy(logits, batch["labels"])


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the learned tokens, and their number."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
    return loss, int((shift_labels != IGNORE).sum())


def hidden_mse(student: Any, teacher: Any, layers: tuple[int, ...],
               mask: torch.Tensor, positions: int | None = None) -> torch.Tensor:
    """Mean squared difference of the chosen hidden states (``student[layer]``, ``teacher[layer]``:
    tuples of every layer's, or a mapping of the chosen ones) over real (non-padding) positions,
    averaged over the layers; with ``positions``, the sum over this batch's real positions divided
    by ``positions`` (the real positions of a whole accumulation window, of every process)."""
    m = mask.unsqueeze(-1).to(student[0].dtype)
    total = student[0].new_zeros(())
    for layer in layers:
        s, t = student[layer], teacher[layer].to(student[layer].dtype)
        count = m.sum() if positions is None else torch.tensor(float(positions), dtype=m.dtype)
        total = total + (((s - t) ** 2) * m).sum() / (count * s.shape[-1]).clamp_min(1)
    return total / len(layers)


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float,
             count: int | None = None) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` of the softened distributions, mean over real positions of
    next-token logits (batch, positions, vocabulary), or over the examples of class logits (batch,
    classes); with ``count``, the sum divided by ``count`` (the positions or examples of a whole
    accumulation window, of every process)."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    per_pos = (log_t.exp() * (log_t - log_s)).sum(-1)
    m = mask.to(per_pos.dtype) if per_pos.dim() == mask.dim() else torch.ones_like(per_pos)
    denominator = m.sum().clamp_min(1) if count is None else max(count, 1)
    return (per_pos * m).sum() / denominator * t * t


# --- checkpoints --------------------------------------------------------------------------------
def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def save_checkpoint(folder: Path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, config: TrainConfig, frozen: str | None = None) -> None:
    """Everything a run needs to go on from ``step``, as safetensors and JSON (no pickle)."""
    params = _trainable(model)
    opt = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(params.values())}
    by_index = {i: n for n, i in ((n, index[id(p)]) for n, p in params.items())}
    moments: dict[str, torch.Tensor] = {}
    for i, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                moments[f"{by_index[i]}::{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{d}"] = s

    def fill(tmp: Path) -> None:
        save_file(_contiguous(dict(params)), str(tmp / "trainable.safetensors"))
        save_file(_contiguous(moments), str(tmp / "optimizer.safetensors"))
        save_file(_contiguous(rng), str(tmp / "rng.safetensors"))
        state = {"step": step, "config": config.to_json(), "param_groups": groups, "frozen_recovery": frozen,
                 "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
                 "param_order": list(params)}
        (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")

    folder.parent.mkdir(parents=True, exist_ok=True)
    atomic_folder(folder, fill)


def latest_checkpoint(output: Path) -> Path | None:
    """The checkpoint of the highest step that is complete, or None."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def load_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    frozen: str | None = None) -> int:
    """Restore what ``save_checkpoint`` wrote; returns its step. ``frozen`` is the manifest digest
    of the recovery artifact applied frozen now (``recovery_from``), which must be the one the
    checkpoint was trained under."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        weights = load_file(str(folder / "trainable.safetensors"))
        moments = load_file(str(folder / "optimizer.safetensors"))
        rng = load_file(str(folder / "rng.safetensors"))
    except (OSError, ValueError) as e:
        raise InputError(f"checkpoint {folder} cannot be read: {e}", path=str(folder)) from None
    if state.get("frozen_recovery") != frozen:
        raise ConfigMismatch(f"checkpoint {folder} was trained under recovery artifact "
                             f"{state.get('frozen_recovery')}, and recovery_from is now {frozen}")
    params = _trainable(model)
    if list(params) != state["param_order"]:
        raise ConfigMismatch(f"checkpoint {folder} holds other trainable parameters than this model")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for i, n in enumerate(params):
        entry = {key.split("::", 1)[1]: v for key, v in moments.items() if key.split("::", 1)[0] == n}
        if entry:
            opt_state[i] = entry
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(groups)})
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            if f"cuda{d}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda{d}"], d)
    return int(state["step"])


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    now = cfg.to_json()
    # settings added since the run was saved take their defaults (what the run did without them)
    defaults = {f.name: (list(f.default) if isinstance(f.default, tuple) else f.default)
                for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    diff = [k for k in now if k not in TrainConfig.RESUMABLE and saved.get(k) != now[k]]
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} then, {now[k]!r} now" for k in diff[:4])
        raise InvalidArgument(f"{where} holds a run with other settings ({shown}); use another output folder")


# --- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], *, pad_id: int, batch_size: int,
             device: torch.device) -> dict[str, float]:
    """Mean cross-entropy per prediction and the share of predictions that are exactly right:
    of learned tokens for a language model, of examples for a classifier."""
    was_training = model.training
    model.eval()
    total, count, right = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, n = task_cross_entropy(logits, batch)
        if "class_labels" in batch:
            right += int((logits.argmax(-1) == batch["class_labels"]).sum())
        else:
            labels = batch["labels"][:, 1:]
            pred = logits[:, :-1].argmax(-1)
            right += int(((pred == labels) & (labels != IGNORE)).sum())
        total += float(loss)
        count += n
    model.train(was_training)
    return {"loss": total / max(count, 1), "accuracy": right / max(count, 1), "tokens": float(count)}


# --- the loop -----------------------------------------------------------------------------------
def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        return max(0.0, 1.0 - (step - cfg.warmup_steps) / span)
    return factor


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig, *, stop_after: int | None = None, progress: bool = False,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) the run of ``cfg`` in ``cfg.output``.

    Args:
        cfg: the run's settings.
        stop_after: stop after this many optimizer steps of this call, with a checkpoint written,
            as an interrupted run would (resume by calling ``train`` again with the same ``cfg``).
        progress: show a progress bar (main process only).
        log: receives one line per logged step and per evaluation.

    Returns:
        A ``TrainResult``; the final adapter is in ``<output>/final`` once ``max_steps`` is reached.

    Raises:
        InvalidArgument: settings that do not fit the data or the models, or an output folder
            holding a run with other settings.
        FileNotFound, InputError: missing or malformed models, data or checkpoints.
        ModelMismatch, ConfigMismatch, UnsupportedAdapter: an inherited LoRA that does not fit.
    """
    from .quantize import quiet_imports

    with quiet_imports():
        from accelerate import Accelerator  # type: ignore[import-untyped]
        from transformers import AutoTokenizer

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    acc = Accelerator()
    say = log if (log is not None and acc.is_main_process) else (lambda _line: None)

    tokenizer = AutoTokenizer.from_pretrained(cfg.base, local_files_only=True)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0)
    records = read_jsonl(cfg.data)
    labels: tuple[str, ...] = ()
    if cfg.task == "classify":
        labels = cfg.labels or label_names(records)
        train_ex = tokenize_classes(records, tokenizer, cfg.max_len, labels)
        eval_ex = tokenize_classes(read_jsonl(cfg.eval), tokenizer, cfg.max_len, labels) if cfg.eval else []
    else:
        train_ex = tokenize(records, tokenizer, cfg.max_len)
        eval_ex = tokenize(read_jsonl(cfg.eval), tokenizer, cfg.max_len) if cfg.eval else []

    torch.manual_seed(cfg.seed)  # a classifier's new head
    base = load_model(cfg.base, cfg.task, labels)
    student = build_student(cfg, base)
    teacher = build_teacher(cfg, labels)
    model = student.model
    frozen = None if student.shared_recovery is None else student.shared_recovery.manifest_sha256
    params = list(_trainable(model).values())
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))

    start = 0
    ckpt = latest_checkpoint(out)
    saved_cfg = out / CONFIG_FILE
    if saved_cfg.is_file():
        _check_resumable(json.loads(saved_cfg.read_text(encoding="utf-8")), cfg, out)
    if ckpt is not None:
        start = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, frozen=frozen)
        say(f"resumed from {ckpt} (step {start})")
    elif acc.is_main_process:
        saved_cfg.write_text(json.dumps(cfg.to_json(), indent=1) + "\n", encoding="utf-8")
        (out / LOG_FILE).unlink(missing_ok=True)

    model.train()
    model, optimizer = acc.prepare(model, optimizer)
    if teacher is not None:
        teacher.to(acc.device)
    world, rank = acc.num_processes, acc.process_index
    if len(train_ex) < world:
        raise InvalidArgument(f"{len(train_ex)} training example(s) for {world} processes: each needs one")
    batches: Iterator[list[int]] = micro_batches(len(train_ex), cfg.batch_size * world, seed=cfg.seed,
                                                 start=start * cfg.grad_accum)
    need_hidden = cfg.distill > 0
    cache = None
    if teacher is not None and cfg.distill and not cfg.distill_kl:
        hidden_size = int(getattr(getattr(teacher, "config", None), "hidden_size", 0) or 0)
        if hidden_size and TeacherCache.size(train_ex, hidden_size, cfg.distill_layers) <= TEACHER_CACHE_BYTES:
            cache = TeacherCache(teacher, train_ex, cfg.distill_layers, pad_id=pad_id,
                                 batch_size=cfg.eval_batch_size, device=acc.device)
            teacher = None  # the student runs alone from here
            say(f"teacher hidden states cached for {len(train_ex)} examples")
    bar = None
    if progress and acc.is_main_process:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        bar = tqdm(total=cfg.max_steps, initial=start, desc="cpet train", unit="step")

    step = start
    last_eval: dict[str, float] = {}
    metric = "accuracy" if cfg.task == "classify" else "token accuracy"
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, start + stop_after)
    while step < end:
        t0 = time.perf_counter()
        picked = [idx for idx in (next(batches)[rank::world] for _ in range(cfg.grad_accum)) if idx]
        window = [[train_ex[i] for i in idx] for idx in picked]
        # every term is normalised by the window's counts over every process (learned tokens; real
        # positions; examples), and multiplied by the number of processes: DDP's mean of the
        # processes' gradients is then the gradient of one process holding the whole window
        counts = [sum(e.tokens for w in window for e in w), sum(len(e.input_ids) for w in window for e in w),
                  sum(len(w) for w in window)]
        if world > 1:
            counts = [int(x) for x in acc.reduce(torch.tensor(counts, device=acc.device), reduction="sum").tolist()]
        tokens, positions, n_examples = counts
        kl_count = n_examples if cfg.task == "classify" else positions
        parts = {"ce": 0.0, "mse": 0.0, "kl": 0.0}
        for j, examples in enumerate(window):
            batch = {k: v.to(acc.device) for k, v in collate(examples, pad_id).items()}
            sync = acc.no_sync(model) if j < len(window) - 1 and world > 1 else contextlib.nullcontext()
            with sync:
                out_s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=need_hidden)
                ce, _ = task_cross_entropy(out_s.logits, batch)
                loss = ce * world / max(tokens, 1)
                parts["ce"] += float(ce.detach()) / max(tokens, 1)
                out_t: Any = None
                if teacher is not None:
                    with torch.no_grad():
                        out_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        output_hidden_states=need_hidden)
                if cfg.distill:  # the teacher's hidden states: cached, or just computed
                    taught = (cache.batch(picked[j], batch["input_ids"].shape[1], acc.device) if cache is not None
                              else out_t.hidden_states)
                    mse = hidden_mse(out_s.hidden_states, taught, cfg.distill_layers, batch["attention_mask"],
                                     positions)
                    loss = loss + cfg.distill * mse * world
                    parts["mse"] += float(mse.detach())
                if cfg.distill_kl:  # never cached: the teacher ran
                    kl = logit_kl(out_s.logits, out_t.logits, batch["attention_mask"], cfg.temperature, kl_count)
                    loss = loss + cfg.distill_kl * kl * world
                    parts["kl"] += float(kl.detach())
                acc.backward(loss)
        if world > 1:  # the log shows the whole step: each process holds its share of every term
            summed = acc.reduce(torch.tensor([parts["ce"], parts["mse"], parts["kl"]], device=acc.device),
                                reduction="sum").tolist()
            parts = {"ce": summed[0], "mse": summed[1], "kl": summed[2]}
        grad_norm = None
        if cfg.max_grad_norm:
            grad_norm = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record: dict[str, Any] = {"step": step, **{k: round(v, 6) for k, v in parts.items()},
                                  "lr": scheduler.get_last_lr()[0], "tokens": tokens,
                                  "grad_norm": grad_norm, "seconds": round(time.perf_counter() - t0, 3)}
        if eval_ex and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            last_eval = evaluate(model, eval_ex, pad_id=pad_id, batch_size=cfg.eval_batch_size, device=acc.device)
            record["eval"] = last_eval
            say(f"step {step}: eval loss {last_eval['loss']:.4f}, {metric} {last_eval['accuracy']:.3f}")
        if acc.is_main_process:
            _log(out / LOG_FILE, record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ce=f"{parts['ce']:.3f}", mse=f"{parts['mse']:.4f}")
        if acc.is_main_process and ((cfg.save_every and step % cfg.save_every == 0) or step == end):
            save_checkpoint(out / CHECKPOINTS / f"step-{step:07d}", step=step, model=acc.unwrap_model(model),
                            optimizer=optimizer, scheduler=scheduler, config=cfg, frozen=frozen)
            _prune_checkpoints(out, cfg.keep_checkpoints)
        acc.wait_for_everyone()
    if bar is not None:
        bar.close()
    finished = step >= cfg.max_steps
    if finished:
        if eval_ex:
            last_eval = evaluate(model, eval_ex, pad_id=pad_id, batch_size=cfg.eval_batch_size, device=acc.device)
            say(f"final eval loss {last_eval['loss']:.4f}, {metric} {last_eval['accuracy']:.3f}")
        if acc.is_main_process:
            _write_final(out, cfg, acc.unwrap_model(model), student, step, last_eval, n_trainable, labels)
    acc.wait_for_everyone()
    return TrainResult(output=out, steps=step, resumed_from=start, eval=last_eval, finished=finished,
                       trainable=n_trainable)


def _prune_checkpoints(out: Path, keep: int) -> None:
    root = out / CHECKPOINTS
    done = sorted((p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _write_final(out: Path, cfg: TrainConfig, model: nn.Module, student: Student, step: int,
                 last_eval: dict[str, float], n_trainable: int, labels: tuple[str, ...]) -> None:
    def fill(tmp: Path) -> None:
        if cfg.task_lora:
            model.save_pretrained(str(tmp / ADAPTER_DIR))  # type: ignore[operator]
        if student.recovery is not None:
            save_file(_contiguous(student.recovery.state_dict()), str(tmp / RECOVERY_WEIGHTS))
            rc = student.recovery.config
            (tmp / RECOVERY_CONFIG).write_text(json.dumps(
                {"r": rc.r, "alpha": rc.alpha, "activation": rc.activation,
                 "target_modules": list(rc.target_modules)}, indent=1) + "\n", encoding="utf-8")

    atomic_folder(out / FINAL, fill)
    run = {"format": "cpet-run", "version": 1, "steps": step, "config": cfg.to_json(),
           "inheritance": student.inheritance.to_json() if student.inheritance else None,
           "eval": last_eval, "trainable_parameters": n_trainable, "labels": list(labels),
           "recovery_from": None if student.shared_recovery is None else {
               "path": str(Path(str(cfg.recovery_from)).resolve()), "manifest_sha256": student.shared_recovery.manifest_sha256}}
    atomic_write_bytes(out / RUN_FILE, (json.dumps(run, indent=1) + "\n").encode("utf-8"))
