"""PEFT adapter folders and plain safetensors state dicts: reading sources, writing results."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import constants as C
from .binding import BaseBinding, checkpoint_files
from .compress import CompeftConfig, compress
from .compressed import CompressedAdapter
from .container import read_safetensors_header
from .errors import FileNotFound, InputError, InvalidArgument, IOFailure
from .fileio import atomic_folder, atomic_write
from .peft_layout import PARAMETER, check_config_patterns, parse_key
from .reader import CompeftFile
from .writer import foreign_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"

PathLike = str | os.PathLike[str]


def load_safetensors_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """A plain safetensors state dict, refusing files that are already compeft files."""
    _, meta, _ = read_safetensors_header(path)
    if meta.get(C.META_FORMAT) == C.FORMAT_NAME:
        raise InputError(f"{path} is already a compeft file" + (
            ", under a name peft loads by itself (and cannot read): rename it to NAME.cpeft.safetensors and give "
            "that file" if foreign_name(path) else ""), path=str(path))
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises untyped errors
        raise InputError(f"cannot read {path}: {e}", path=str(path)) from None


def read_checkpoint(path: PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint: a ``.safetensors`` file, a sharded checkpoint's
    ``*.safetensors.index.json``, or a model folder (``model.safetensors`` or a sharded index;
    ``binding.checkpoint_files``)."""
    p = Path(path)
    if p.is_file() and p.name.endswith(".safetensors.index.json"):
        p = p.parent
    files = checkpoint_files(p)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(files.values())):
        out.update(load_safetensors_state_dict(f))
    return out


def is_model_checkpoint(path: PathLike) -> bool:
    """``path`` is a model's checkpoint rather than an adapter: a model folder (no
    ``adapter_config.json``; ``model.safetensors`` or a sharded index) or a sharded index."""
    p = Path(path)
    if p.is_file():
        return p.name.endswith(".safetensors.index.json")
    return p.is_dir() and not (p / ADAPTER_CONFIG).is_file() and not (p / ADAPTER_WEIGHTS).is_file() and (
        (p / "model.safetensors").is_file() or any(p.glob("*.safetensors.index.json")))


#: names of adapter tensors that ``peft_layout`` does not parse (kohya, diffusers and LyCORIS files)
_ADAPTER_NAME = re.compile(r"lora|lokr|loha|hada|ia3|dora", re.IGNORECASE)


def full_weights(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Every tensor is a model weight (no PEFT, kohya, diffusers or LyCORIS adapter tensor name):
    what a full fine-tune's checkpoint holds."""
    return bool(state_dict) and all(parse_key(k).role is PARAMETER and not _ADAPTER_NAME.search(k)
                                    for k in state_dict)


def read_source(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read an adapter from a PEFT folder or a ``.safetensors`` file, or a full fine-tune from a
    model folder or a sharded checkpoint (``read_checkpoint``).

    Returns (state dict, PEFT config or None).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFound(f"no such file or folder: {p}", path=str(p))
    if is_model_checkpoint(p):
        return read_checkpoint(p), None
    if p.is_file():
        if p.name == ADAPTER_WEIGHTS and (p.parent / ADAPTER_CONFIG).is_file():
            raise InvalidArgument(f"{p} is the weights of a PEFT adapter: give its folder ({p.parent}), whose "
                                  f"{ADAPTER_CONFIG} says how to apply them", path=str(p))
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
    if config is None and full_weights(sd) and kwargs.get("base_weights") is None and not _reference_given(method,
                                                                                                          kwargs):
        raise InvalidArgument(
            f"{src} holds a model's weights, not an adapter: give the weights it was fine-tuned from as the reference "
            "(--reference BASE, reference=) to store the fine-tuning delta, or --reference zero (reference='zero') to "
            "compress the weights themselves", path=str(src))
    base = kwargs.get("base") or BaseBinding()
    if config is not None and base.fingerprint is None and base.derived_from is None:
        named = {k: v for k, v in (("id", config.get("base_model_name_or_path")), ("revision", config.get("revision")))
                 if isinstance(v, str) and getattr(base, k) is None}
        kwargs["base"] = dataclasses.replace(base, **named)
    kwargs.setdefault("source", Path(src).name)
    kwargs.setdefault("peft_config", config)
    if Path(src).is_file() and Path(src).name.endswith(".safetensors") and "source_metadata" not in kwargs:
        _, meta, _ = read_safetensors_header(src)  # a single-file adapter's metadata goes with it
        kwargs["source_metadata"] = {k: v for k, v in meta.items() if k != "format"} or None
    return compress(sd, method, **kwargs)


def check_output(path: PathLike, *, overwrite: bool, folder: bool, inputs: Sequence[PathLike] = (),
                 replaceable: Callable[[Path], bool] | None = None) -> Path:
    """``path`` as an output the caller may write: absent (or, for a folder, an empty folder), or
    anything but the other kind when ``overwrite``, in a folder that exists.

    A file must not be one of the command's ``inputs``. A folder is replaced whole, so with
    ``overwrite`` it must also hold none of the command's ``inputs`` and be one the command would have written (``replaceable``, e.g. a PEFT folder for
    ``decompress``; by default one without subfolders): ``--force`` never deletes a user's other
    files.

    Raises:
        FileNotFound: the folder to put it in does not exist.
        InvalidArgument: it exists and ``overwrite`` is false, or it is a folder where a file is
            wanted (or the reverse), or a symbolic link; a folder that ``overwrite`` may not
            replace.
    """
    p = Path(path)
    parent = p.absolute().parent
    if not parent.is_dir():
        raise FileNotFound(f"the folder of the output does not exist: {parent}", path=str(parent))
    if not (p.exists() or p.is_symlink()):
        return p
    here = p.resolve()
    for i in inputs:  # a file written over an input, or a folder replaced with one inside it
        q = Path(i).resolve()
        if q == here or (folder and here in q.parents):
            raise InvalidArgument(f"{p} holds {i}, which this command reads: --force would delete it with the "
                                  "folder; write elsewhere" if folder else f"{p} is also an input of this command: "
                                  "writing it would replace what is being read; write elsewhere", path=str(p))
    if p.is_dir() != folder or p.is_symlink():
        kind = "a symbolic link" if p.is_symlink() else "a folder" if p.is_dir() else "not a folder"
        raise InvalidArgument(f"{p} is {kind}; give the {'folder' if folder else 'file'} to write", path=str(p))
    if folder and not any(p.iterdir()):
        return p
    if not overwrite:
        raise InvalidArgument(f"{p} exists{' and is not empty' if folder else ''}; pass --force (overwrite=True) "
                              f"to replace it", path=str(p))
    if folder and not (replaceable or no_subfolder)(p):
        shown = ", ".join(sorted(e.name for e in p.iterdir())[:3])
        raise InvalidArgument(f"{p} holds files this command did not write ({shown}, ...): --force replaces only "
                              "a folder of its own earlier output; give a new or empty folder", path=str(p))
    return p


def no_subfolder(folder: Path) -> bool:
    """The default ``replaceable`` test of ``check_output``: the folder holds files only."""
    return not any(e.is_dir() for e in folder.iterdir())


def holds_only(*names: str) -> Callable[[Path], bool]:
    """A ``replaceable`` test for ``check_output``: every entry of the folder is one of ``names``."""
    allowed = frozenset(names)
    return lambda folder: all(e.name in allowed for e in folder.iterdir())


def decompress_to_file(src: PathLike, out: PathLike, *, dtype: str | torch.dtype | None = None,
                       overwrite: bool = False) -> Path:
    """Verify a compeft file fully, then write its tensors to one ``.safetensors`` file
    (atomically): the state dict itself, as a single-file LoRA or a full fine-tune's deltas are
    kept, with the source file's metadata (``provenance.source_metadata``: kohya's ``ss_*``,
    ``modelspec.*``) when the file records it. An existing file is replaced only with
    ``overwrite``."""
    dest = check_output(out, overwrite=overwrite, folder=False, inputs=[src])
    with CompeftFile(src) as f:
        sd = {k: v.contiguous() for k, v in f.state_dict(dtype=dtype, verify=True).items()}
        metadata = {"format": "pt", **(f.manifest.provenance.source_metadata or {})}

    def write(tmp: str) -> None:
        try:
            save_file(sd, tmp, metadata=metadata)
        except SafetensorError as e:
            raise IOFailure(f"cannot write {dest}: {e}", path=str(dest)) from None

    atomic_write(dest, write)
    return dest


def _reference_given(method: CompeftConfig | None, kwargs: Mapping[str, Any]) -> bool:
    return kwargs.get("reference") is not None or (method is not None and method.reference is not None)


def decompress_to_peft(src: PathLike, out_dir: PathLike, *, dtype: str | torch.dtype | None = None,
                       overwrite: bool = False) -> list[Path]:
    """Verify a compeft file fully, then write it out as a PEFT adapter folder, published whole
    (``fileio.atomic_folder``): an existing folder that is not empty is refused unless
    ``overwrite``, which replaces it, so that no file of an earlier adapter stays in it; only a
    folder of PEFT adapter files (``adapter_config.json``, ``adapter_model.safetensors`` or
    ``.bin``, ``README.md``) is replaced. Returns the paths written.

    Raises:
        InvalidArgument: ``out_dir`` exists, is not an empty folder, and ``overwrite`` is false
            or it holds other files (or ``src``).
    """
    out = check_output(out_dir, overwrite=overwrite, folder=True, inputs=[src],
                       replaceable=holds_only(ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, "README.md"))
    with CompeftFile(src) as f:
        if f.manifest.adapter.representation == C.REPRESENTATION_DELTA:
            raise InvalidArgument(f"{src} stores the deltas of a full fine-tune, which no PEFT folder holds: rebuild "
                                  f"the fine-tuned model with compeft apply-delta (apply_delta), or write the deltas "
                                  f"to one .safetensors file (decompress_to_file)", path=str(src))
        sd = f.state_dict(dtype=dtype, verify=True)  # a damaged file is named as such first
        config = f.manifest.adapter.peft_config
        if config is None:
            raise InvalidArgument(f"{src} records no PEFT config, and a PEFT folder without adapter_config.json loads "
                                  "nowhere: write its tensors to one file instead (-o NAME.safetensors, "
                                  "decompress_to_file), as single-file LoRAs are kept", path=str(src))
    names: list[str] = []
    atomic_folder(out, lambda tmp: names.extend(p.name for p in write_peft_folder(tmp, sd, config)), replace=overwrite)
    return [out / n for n in names]


__all__ = ["read_source", "write_peft_folder", "compress_peft", "decompress_to_peft", "load_safetensors_state_dict",
           "check_output", "holds_only", "no_subfolder", "decompress_to_file", "read_checkpoint", "is_model_checkpoint", "full_weights",
           "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_WEIGHTS_BIN"]
