"""Knowledge inheritance (CA-LoRA): the LoRA of the compressed model starts from a LoRA trained
on the original model, its A and B copied verbatim into modules at the same places.

The source is a compeft file (decoded as it would be applied) or a PEFT adapter folder. Only
LoRA sources are inherited; what was inherited is recorded (``Inheritance``) for the exported
artifact's provenance.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import compeft_format as cf
from compeft_format.errors import ConfigMismatch, FileNotFound, ModelMismatch, UnsupportedAdapter
from compeft_format.fileio import file_sha256
from compeft_format.peft_io import read_source


@dataclass(frozen=True)
class Inheritance:
    """Where an inherited LoRA came from."""

    #: the path given
    source: str
    #: ``compeft`` (a compeft file) or ``peft`` (a PEFT folder)
    format: str
    #: sha256 of the file read (the compeft file, or the folder's adapter weights)
    sha256: str
    #: the compeft file's ``compeft.manifest_sha256``; None for a PEFT folder
    manifest_sha256: str | None
    #: the base the source was trained on, as the source records it (compeft files only)
    base_model: dict[str, Any] | None
    #: number of tensors copied
    tensors: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)



def read_lora(source: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any], Inheritance]:
    """The LoRA tensors (PEFT names, float32), the PEFT config and the provenance of ``source``.

    Raises:
        FileNotFound: no such file or folder.
        UnsupportedAdapter: the source is not a LoRA adapter or has no PEFT config.
        and the file errors of ``compeft_format.open_file``.
    """
    p = Path(source)
    if not p.exists():
        raise FileNotFound(f"no such adapter: {p}", path=str(p))
    if p.is_file():
        with cf.open_file(p) as f:
            config = f.manifest.adapter.peft_config
            tensors = {k: f.get_tensor(k, dtype="float32") for k in f.keys()}
            prov = Inheritance(source=str(p), format="compeft", sha256=f.sha256(),
                               manifest_sha256=f.metadata[cf.constants.META_MANIFEST_SHA256],
                               base_model=f.manifest.base_model.to_json(), tensors=len(tensors))
    else:
        raw, config = read_source(p)
        tensors = {k: v.float() for k, v in raw.items()}
        weights = p / "adapter_model.safetensors"
        digest = file_sha256(weights) if weights.is_file() else hashlib.sha256(b"").hexdigest()
        prov = Inheritance(source=str(p), format="peft", sha256=digest, manifest_sha256=None, base_model=None,
                           tensors=len(tensors))
    if config is None or str(config.get("peft_type", "")).upper() != "LORA":
        raise UnsupportedAdapter(f"{p}: only a LoRA adapter with its PEFT config can be inherited")
    return tensors, dict(config), prov


def inherit_lora(peft_model: Any, tensors: dict[str, torch.Tensor], *, adapter_name: str = "default") -> int:
    """Copy ``tensors`` (PEFT names) verbatim into the LoRA modules of ``peft_model``; returns the
    number copied. Every LoRA tensor of the model must be set, with its exact shape.

    Raises:
        ModelMismatch: a tensor names no LoRA parameter of the model, or a LoRA parameter gets none.
        ConfigMismatch: a shape differs (another rank or another layer size).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    wanted = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    missing = sorted(set(wanted) - set(tensors))
    extra = sorted(set(tensors) - set(wanted))
    if missing or extra:
        raise ModelMismatch(f"the inherited LoRA does not fit the model: {len(missing)} tensor(s) missing "
                            f"(e.g. {missing[:2]}), {len(extra)} unknown (e.g. {extra[:2]})")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(wanted[k].shape):
            raise ConfigMismatch(f"inherited tensor {k} has shape {tuple(v.shape)}, the model's has "
                                 f"{tuple(wanted[k].shape)}")
    dtype = next(iter(wanted.values())).dtype
    result = set_peft_model_state_dict(peft_model, {k: v.to(dtype) for k, v in tensors.items()},
                                       adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelMismatch(f"peft did not place {len(unexpected)} inherited tensor(s), e.g. {unexpected[:2]}")
    return len(tensors)
