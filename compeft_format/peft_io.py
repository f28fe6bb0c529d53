"""PEFT adapter folders and plain safetensors state dicts: reading sources, writing results."""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import constants as C
from .compress import compress
from .compressed import CompressedAdapter
from .container import CompeftFile, atomic_write, read_safetensors_header
from .errors import FileNotFound, InputError, InvalidArgument, IOFailure

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"

#: Tensors of a PEFT adapter that are task-vector factors and may be sparsified; everything else a
#: PEFT folder holds (DoRA magnitudes, modules_to_save copies, biases, trainable tokens) is a full
#: weight and stays dense.
SPARSIFIABLE = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|ia3_l)(\.[^.]+)?(\.weight)?$")

#: peft_type -> (adapter kind, default reference)
PEFT_TYPES: dict[str, tuple[str, str]] = {
    "LORA": ("lora", C.REFERENCE_ZERO),
    "ADALORA": ("lora", C.REFERENCE_ZERO),
    "IA3": ("ia3", C.REFERENCE_ONES),
}


def load_safetensors_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain safetensors state dict, refusing files that are already compeft files."""
    _, meta, _ = read_safetensors_header(path)
    if meta.get(C.META_FORMAT) == C.FORMAT_NAME:
        raise InputError(f"{path} is already a compeft file")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises untyped errors
        raise InputError(f"cannot read {path}: {e}") from None


def read_source(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read an adapter from a PEFT folder or a ``.safetensors`` file.

    Returns (state dict, PEFT config or None).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFound(f"no such file or folder: {p}")
    if p.is_file():
        return load_safetensors_state_dict(p), None
    config = None
    cfg_path = p / ADAPTER_CONFIG
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise InputError(f"{cfg_path} must hold a JSON object")
    weights = p / ADAPTER_WEIGHTS
    if weights.is_file():
        return load_safetensors_state_dict(weights), config
    legacy = p / ADAPTER_WEIGHTS_BIN
    if legacy.is_file():
        try:
            sd = torch.load(legacy, weights_only=True, map_location="cpu")
        except Exception as e:  # the weights-only unpickler refuses anything but tensors
            raise InputError(f"cannot read {legacy} as a weights-only checkpoint: {e}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise InputError(f"{legacy} does not hold a state dict of tensors")
        return dict(sd), config
    raise InputError(f"{p} holds neither {ADAPTER_WEIGHTS} nor {ADAPTER_WEIGHTS_BIN}")


def kind_and_reference(config: Mapping[str, Any] | None) -> tuple[str, str | None]:
    """Adapter kind and default reference from a PEFT config (None reference: must be given)."""
    if config is None:
        return "other", None
    ptype = str(config.get("peft_type", "")).upper()
    if ptype in PEFT_TYPES:
        return PEFT_TYPES[ptype]
    return "other", None


def write_peft_folder(out_dir: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                      config: Mapping[str, Any] | None) -> list[Path]:
    """Write ``adapter_model.safetensors`` (and ``adapter_config.json``) into ``out_dir``, each
    file atomically. Returns the paths written."""
    d = Path(out_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IOFailure(f"cannot create {d}: {e.strerror or e}") from None
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    written = []
    try:
        atomic_write(d / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        written.append(d / ADAPTER_WEIGHTS)
        if config is not None:
            text = json.dumps(config, indent=2, sort_keys=True)
            atomic_write(d / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
            written.append(d / ADAPTER_CONFIG)
    except (OSError, SafetensorError) as e:
        raise IOFailure(f"cannot write into {d}: {getattr(e, 'strerror', None) or e}") from None
    return written


def compress_peft(src: str | os.PathLike, *, density: float = 0.1, alpha: float = 1.0,
                  **kwargs: Any) -> CompressedAdapter:
    """Compress a PEFT adapter folder (or a ``.safetensors`` state dict) with the reference and
    metadata its ``adapter_config.json`` implies.

    The reference defaults from ``peft_type`` (LoRA zero, IA3 ones; a plain file without config:
    zero); a base state dict passed as ``reference`` makes the file a full fine-tuning delta. The
    PEFT config, base model id and revision are recorded in the manifest. Other keyword arguments
    go to ``compress``.

    Raises:
        FileNotFound, InputError: the source cannot be read.
        InvalidArgument: a PEFT type without a known reference and no ``reference`` given.
    """
    sd, config = read_source(src)
    kind, ref = kind_and_reference(config)
    if kwargs.get("reference") is None:
        if config is not None and ref is None:
            raise InvalidArgument(
                f"peft_type {config.get('peft_type')!r} has no default reference; pass --reference (CLI) or reference= (Python)")
        kwargs["reference"] = ref or C.REFERENCE_ZERO
    elif not isinstance(kwargs["reference"], str) and kind == "other":
        kind = "full"
    if config is not None and ref is not None:  # a known PEFT type: only its factors are task vectors
        kwargs["dense_patterns"] = tuple(kwargs.get("dense_patterns", C.DEFAULT_DENSE_PATTERNS)) + tuple(
            sorted(glob.escape(n) for n in sd if not SPARSIFIABLE.search(n)))  # exact names
    kwargs.setdefault("adapter_kind", kind)
    kwargs.setdefault("peft_config", config)
    if kwargs.get("base_model_id") is None:
        kwargs["base_model_id"] = (config or {}).get("base_model_name_or_path")
    if kwargs.get("base_model_revision") is None:
        kwargs["base_model_revision"] = (config or {}).get("revision")
    kwargs.setdefault("source", Path(src).name)
    return compress(sd, density=density, alpha=alpha, **kwargs)


def decompress_to_peft(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                       dtype: str | torch.dtype | None = None) -> list[Path]:
    """Verify a compeft file fully, then write it out as a PEFT adapter folder (each file
    atomically). Returns the paths written."""
    with CompeftFile(src) as f:
        sd = f.state_dict(dtype=dtype, verify=True)
        config = f.manifest.adapter.peft_config
    return write_peft_folder(out_dir, sd, config)
