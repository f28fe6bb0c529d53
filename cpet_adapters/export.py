"""Export a CPET run as compeft artifacts bound to the exact compressed base it was trained on.

A run with recovery modules gives ``recovery.cpeft.safetensors`` (``adapter.kind`` ``recovery``;
stored dense by default, or ComPEFT-compressed), and a run with a task LoRA gives
``task.cpeft.safetensors`` (ComPEFT-compressed), which ``requires`` the recovery artifact by its
manifest digest. Both carry the compressed base's binding: the fingerprint of its weights, the
model it was derived from and the recipe (``cpet_adapters.base``), and ``provenance.training``:
the inheritance source, the settings and the final evaluation. ``compeft_format.load_adapter`` on
the task artifact brings the recovery artifact from the same folder and refuses any other base.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

import compeft_format as cf
from compeft_format import binding as B
from compeft_format.errors import FileNotFound, InputError, InvalidArgument
from compeft_format.fileio import atomic_write_bytes, file_sha256
from compeft_format.manifest import Requirement
from compeft_format.recovery import RecoveryConfig
from compeft_format.requirements import requirement

from .base import DESCRIPTOR, load_compressed_base
from .train import ADAPTER_DIR, FINAL, RECOVERY_CONFIG, RECOVERY_WEIGHTS, RUN_FILE, TrainConfig

RECOVERY_FILE = "recovery.cpeft.safetensors"
TASK_FILE = "task.cpeft.safetensors"
#: the training settings an artifact records (the rest are paths and bookkeeping)
RECORDED = ("task", "task_lora", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "recovery", "recovery_r",
            "recovery_alpha", "distill", "distill_layers", "distill_kl", "temperature", "lr", "weight_decay",
            "warmup_steps", "max_steps", "batch_size", "grad_accum", "max_grad_norm", "max_len", "seed")


@dataclass(frozen=True)
class Artifact:
    """One exported file."""

    path: Path
    #: ``recovery`` or the task adapter's kind (``lora``)
    kind: str
    size: int
    sha256: str
    manifest_sha256: str
    #: the fingerprint value of the compressed base it is bound to
    base_fingerprint: str

    @property
    def requirement(self) -> Requirement:
        """What an artifact that requires this one records of it."""
        return Requirement(kind=self.kind, manifest_sha256=self.manifest_sha256, name=self.path.name)


def base_binding(base: str | os.PathLike[str]) -> B.BaseBinding:
    """The binding of the base folder a run trained on: from its descriptor when it is a
    compressed base (the fingerprint is checked against the weights), else the fingerprint of
    its weights as float32 values."""
    folder = Path(base)
    if (folder / DESCRIPTOR).is_file():
        return load_compressed_base(folder, verify=True).binding
    if not folder.is_dir():
        raise FileNotFound(f"no such base model folder: {folder}", path=str(folder))
    return B.BaseBinding(fingerprint=cf.fingerprint(folder, B.FLOAT32))


def _read_run(run: Path) -> dict[str, Any]:
    path = run / RUN_FILE
    if not path.is_file():
        raise FileNotFound(f"{run} holds no finished run ({RUN_FILE} is missing; train until max_steps first)",
                           path=str(path))
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InputError(f"{path} is not JSON", path=str(path)) from None
    if not isinstance(info, dict) or info.get("format") != "cpet-run" or not isinstance(info.get("config"), dict):
        raise InputError(f"{path} is not a cpet run description", path=str(path))
    return info


def _adapter_targets(folder: Path) -> list[str] | None:
    """The ``target_modules`` a PEFT adapter folder's config names (sorted), or None."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    targets = config.get("target_modules") if isinstance(config, dict) else None
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        return sorted(targets)
    return None


def _copy_shared_recovery(shared: dict[str, Any], out: Path) -> Path:
    """Copy the recovery artifact a run applied frozen (``recovery_from``) into ``out``, checking
    that it is still the file the run used."""
    src = Path(str(shared.get("path")))
    if not src.is_file():
        raise FileNotFound(f"the recovery artifact the run applied is gone: {src}", path=str(src))
    if requirement(src).manifest_sha256 != shared.get("manifest_sha256"):
        raise InputError(f"{src} is no longer the recovery artifact the run applied (its manifest digest differs)",
                         path=str(src))
    dest = out / src.name
    if dest.resolve() != src.resolve():
        atomic_write_bytes(dest, src.read_bytes())
    return dest


def _artifact(path: Path, binding: B.BaseBinding) -> Artifact:
    req = requirement(path)
    fp = binding.fingerprint.value if binding.fingerprint else ""
    return Artifact(path=path, kind=req.kind, size=path.stat().st_size, sha256=file_sha256(path),
                    manifest_sha256=req.manifest_sha256, base_fingerprint=fp)


def export(run: str | os.PathLike[str], output: str | os.PathLike[str], *, density: float = 0.1,
           recovery_density: float | None = None) -> list[Artifact]:
    """Write the artifacts of the finished run in ``run`` to the folder ``output``.

    Args:
        run: a run folder of ``train`` that reached ``max_steps``.
        output: where the files go (created; files of the same names are replaced atomically).
        density: ComPEFT density of the task LoRA (method ``fit``); 1 keeps every entry.
        recovery_density: ComPEFT density of the recovery modules; None stores them dense.

    Returns:
        The recovery artifact (the one the run trained, or a copy of the one it applied frozen,
        ``recovery_from``), when there is one, and then the task artifact.

    Raises:
        FileNotFound, InputError: no finished run, or its base folder is missing.
        BaseMismatch: the base folder's weights no longer match its descriptor.
        InvalidArgument: a density out of (0, 1].
    """
    run_dir, out = Path(run), Path(output)
    for name, d in (("density", density), ("recovery_density", recovery_density)):
        if d is not None and not 0 < d <= 1:
            raise InvalidArgument(f"{name} must be in (0, 1], got {d}")
    info = _read_run(run_dir)
    cfg = TrainConfig.from_json(info["config"], str(run_dir / RUN_FILE))
    binding = base_binding(cfg.base)
    settings = {k: info["config"].get(k) for k in RECORDED}
    final = run_dir / FINAL
    if not settings.get("target_modules"):  # peft chose them: record the layers it chose
        settings["target_modules"] = _adapter_targets(final / ADAPTER_DIR)
    training: dict[str, Any] = {"method": "cpet", "settings": settings, "steps": info.get("steps"),
                                "inheritance": info.get("inheritance"), "eval": info.get("eval")}
    if info.get("labels"):
        training["labels"] = info["labels"]
    out.mkdir(parents=True, exist_ok=True)
    arts: list[Artifact] = []
    if (final / RECOVERY_WEIGHTS).is_file():
        rc_json = json.loads((final / RECOVERY_CONFIG).read_text(encoding="utf-8"))
        rc = RecoveryConfig(r=int(rc_json["r"]), alpha=float(rc_json["alpha"]), activation=rc_json["activation"],
                            target_modules=tuple(rc_json["target_modules"]))
        tensors = load_file(str(final / RECOVERY_WEIGHTS))
        kw: dict[str, Any] = ({"density": 1.0, "dense_patterns": ("*",)} if recovery_density is None
                              else {"density": recovery_density})
        ca = cf.compress(tensors, recovery=rc, base=binding, training=training, source=run_dir.name, **kw)
        path = out / RECOVERY_FILE
        cf.save(ca, path)
        arts.append(_artifact(path, binding))
    shared = info.get("recovery_from")
    if isinstance(shared, dict):
        arts.append(_artifact(_copy_shared_recovery(shared, out), binding))
    requires = [a.requirement for a in arts]  # the recovery artifact, trained here or applied frozen
    if (final / ADAPTER_DIR).is_dir():
        ca = cf.compress_peft(final / ADAPTER_DIR, density=density, base=binding, requires=requires,
                              training=training, source=run_dir.name)
        path = out / TASK_FILE
        cf.save(ca, path)
        arts.append(_artifact(path, binding))
    if not arts:
        raise InputError(f"{final} holds neither a task adapter nor recovery modules", path=str(final))
    return arts


def trained_for(artifact: str | os.PathLike[str]) -> tuple[str, tuple[str, ...]]:
    """The task (``causal-lm`` or ``classify``) and the labels an exported artifact was trained
    for, from its ``provenance.training``; ``causal-lm`` when it records none.

    Raises:
        InputError: recorded labels that are not a list of two or more distinct strings.
        and the file errors of ``compeft_format.open_file``.
    """
    with cf.open_file(artifact) as f:
        training = f.manifest.provenance.training or {}
    settings = training.get("settings")
    task = settings.get("task", "causal-lm") if isinstance(settings, dict) else "causal-lm"
    if task != "classify":
        return "causal-lm", ()
    labels = training.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels) \
            or len(set(labels)) != len(labels):
        raise InputError(f"{artifact} is a classifier but records no list of labels", path=str(artifact))
    return task, tuple(labels)


def load_into(model: Any, artifact: str | os.PathLike[str], *, adapter_name: str = "default",
              check_base: bool = True, requires: Any = None) -> Any:
    """Load an exported artifact into ``model`` (a model folder or a loaded model): a task
    artifact brings the recovery artifact it requires, from ``requires`` or the same folder. A
    folder is loaded as the model the artifact was trained for: a causal LM, or for a classifier
    a sequence-classification model over the labels the artifact records (its head comes from the
    artifact).

    Returns:
        The model with the adapter (a ``peft.PeftModel`` for a task artifact).

    Raises:
        BaseMismatch: the model is not the compressed base the artifact is bound to (unless
            ``check_base=False``, which warns).
        and the errors of ``compeft_format.load_adapter``.
    """
    if isinstance(model, (str, os.PathLike)):
        from .train import load_model

        task, labels = trained_for(artifact)
        model = load_model(model, task, labels)
    kwargs: dict[str, Any] = {"adapter_name": adapter_name, "check_base": check_base}
    if requires is not None:
        kwargs["requires"] = requires
    return cf.load_adapter(model, artifact, **kwargs)
