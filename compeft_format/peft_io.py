"""PEFT adapter folders and plain safetensors state dicts: reading sources, writing results."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import constants as C
from .binding import BaseBinding
from .compress import CompeftConfig, compress
from .compressed import CompressedAdapter
from .container import read_safetensors_header
from .errors import FileNotFound, InputError, IOFailure
from .fileio import atomic_write
from .peft_layout import check_config_patterns
from .reader import CompeftFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"

PathLike = str | os.PathLike[str]


def load_safetensors_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """A plain safetensors state dict, refusing files that are already compeft files."""
    _, meta, _ = read_safetensors_header(path)
    if meta.get(C.META_FORMAT) == C.FORMAT_NAME:
        raise InputError(f"{path} is already a compeft file", path=str(path))
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises untyped errors
        raise InputError(f"cannot read {path}: {e}", path=str(path)) from None


def read_source(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read an adapter from a PEFT folder or a ``.safetensors`` file.

    Returns (state dict, PEFT config or None).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFound(f"no such file or folder: {p}", path=str(p))
    if p.is_file():
        return load_safetensors_state_dict(p), None
    config = None
    cfg_path = p / ADAPTER_CONFIG
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise InputError(f"{cfg_path} is not valid JSON: {e}", path=str(cfg_path)) from None
        except OSError as e:
            raise IOFailure(f"cannot read {cfg_path}: {e.strerror or e}", path=str(cfg_path)) from None
        if not isinstance(config, dict):
            raise InputError(f"{cfg_path} must hold a JSON object", path=str(cfg_path))
    weights = p / ADAPTER_WEIGHTS
    if weights.is_file():
        return load_safetensors_state_dict(weights), config
    legacy = p / ADAPTER_WEIGHTS_BIN
    if legacy.is_file():
        try:
            sd = torch.load(legacy, weights_only=True, map_location="cpu")
        except Exception as e:  # the weights-only unpickler refuses anything but tensors
            raise InputError(f"cannot read {legacy} as a weights-only checkpoint: {e}", path=str(legacy)) from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise InputError(f"{legacy} does not hold a state dict of tensors", path=str(legacy))
        return dict(sd), config
    raise InputError(f"{p} holds neither {ADAPTER_WEIGHTS} nor {ADAPTER_WEIGHTS_BIN}", path=str(p))


def write_peft_folder(out_dir: PathLike, state_dict: Mapping[str, torch.Tensor],
                      config: Mapping[str, Any] | None) -> list[Path]:
    """Write ``adapter_model.safetensors`` (and ``adapter_config.json``) into ``out_dir``, each
    file atomically. Returns the paths written.

    Raises:
        ConfigMismatch: the config holds a regular expression peft could not run safely
            (``peft_layout.check_config_patterns``); nothing is written.
    """
    if config is not None:
        check_config_patterns(config)
    d = Path(out_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IOFailure(f"cannot create {d}: {e.strerror or e}", path=str(d)) from None
    tensors = {k: v.contiguous() for k, v in state_dict.items()}

    def write_weights(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata={"format": "pt"})
        except SafetensorError as e:
            raise IOFailure(f"cannot write into {d}: {e}", path=str(d)) from None

    atomic_write(d / ADAPTER_WEIGHTS, write_weights)
    written = [d / ADAPTER_WEIGHTS]
    if config is not None:
        text = json.dumps(config, indent=2, sort_keys=True)
        atomic_write(d / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        written.append(d / ADAPTER_CONFIG)
    return written


def compress_peft(src: PathLike, method: CompeftConfig | None = None, /, *,
                  tensors: tuple[Mapping[str, torch.Tensor], dict[str, Any] | None] | None = None,
                  **kwargs: Any) -> CompressedAdapter:
    """Compress a PEFT adapter folder (or a ``.safetensors`` state dict).

    The folder's ``adapter_config.json`` is recorded and decides, by its ``peft_type``, which
    tensors are sparsified and the default reference (``compress`` documents both). The base model
    is recorded as ``base=`` says; the id and revision it leaves out are taken from the config
    (``base_model_name_or_path``, ``revision``) unless it binds the weights themselves (a
    fingerprint, or the model a compressed base was derived from): the config names the model
    training started from, which is not the base of an adapter trained on a quantised one. Other
    keyword arguments go to ``compress``; ``tensors`` is the source as ``read_source`` already
    read it.

    Raises:
        FileNotFound, InputError: the source cannot be read.
        InvalidArgument: a PEFT type without a known reference and no ``reference`` given.
    """
    sd, config = read_source(src) if tensors is None else tensors
    base = kwargs.get("base") or BaseBinding()
    if config is not None and base.fingerprint is None and base.derived_from is None:
        named = {k: v for k, v in (("id", config.get("base_model_name_or_path")), ("revision", config.get("revision")))
                 if isinstance(v, str) and getattr(base, k) is None}
        kwargs["base"] = dataclasses.replace(base, **named)
    kwargs.setdefault("source", Path(src).name)
    kwargs.setdefault("peft_config", config)
    return compress(sd, method, **kwargs)


def decompress_to_peft(src: PathLike, out_dir: PathLike, *, dtype: str | torch.dtype | None = None) -> list[Path]:
    """Verify a compeft file fully, then write it out as a PEFT adapter folder (each file
    atomically). Returns the paths written."""
    with CompeftFile(src) as f:
        sd = f.state_dict(dtype=dtype, verify=True)
        config = f.manifest.adapter.peft_config
    return write_peft_folder(out_dir, sd, config)


__all__ = ["read_source", "write_peft_folder", "compress_peft", "decompress_to_peft", "load_safetensors_state_dict",
           "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_WEIGHTS_BIN"]
