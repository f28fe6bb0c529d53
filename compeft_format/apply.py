"""Apply a compressed adapter to a transformers model without writing a folder.

``load_adapter`` adds it as a named PEFT adapter (several can sit side by side; peft's
``set_adapter`` switches and ``delete_adapter`` removes them). ``merge_adapter`` adds it into the
base weights (``W += scale * B @ A`` for LoRA, DoRA's renormalisation, ``W *= l`` for (IA)3,
``W += delta`` for a full fine-tuning delta) and returns a handle whose ``unmerge`` restores the
original weights exactly.

Everything is checked before the model is touched: the modules the adapter targets exist, shapes
agree, the PEFT config agrees with the tensors, and, when the file records one, the base model's
fingerprint matches. A failed call leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import constants as C
from .container import CompeftFile
from .errors import BaseMismatch, ConfigMismatch, InvalidArgument, ModelMismatch, UnsupportedAdapter
from .integrity import state_dict_fingerprint
from .manifest import Manifest

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_MAG_KEY = re.compile(r"^(?P<path>.+)\.lora_magnitude_vector$")
_IA3_KEY = re.compile(r"^(?P<path>.+)\.ia3_l$")
APPLICABLE = ("LORA", "IA3")


# --- reading the adapter's layout ---------------------------------------------------------------
@dataclass
class _Layout:
    """What the adapter's tensors touch: per module path, the LoRA factors, DoRA magnitude or
    (IA)3 vector; and full weights (modules_to_save) by parameter name."""

    lora: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    ia3: dict[str, tuple[int, ...]] = field(default_factory=dict)
    full: dict[str, tuple[int, ...]] = field(default_factory=dict)
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # file key -> (role, target)


def _layout(manifest: Manifest) -> _Layout:
    lay = _Layout()
    for t in manifest.tensors:
        key = t.name[len(PEFT_PREFIX):] if t.name.startswith(PEFT_PREFIX) else t.name
        if m := _LORA_KEY.match(key):
            lay.lora.setdefault(m["path"], {})[m["kind"]] = t.shape
            lay.keys[t.name] = (m["kind"], m["path"])
        elif m := _MAG_KEY.match(key):
            lay.lora.setdefault(m["path"], {})["magnitude"] = t.shape
            lay.keys[t.name] = ("magnitude", m["path"])
        elif m := _IA3_KEY.match(key):
            lay.ia3[m["path"]] = t.shape
            lay.keys[t.name] = ("ia3", m["path"])
        elif "lora_" in key or "ia3_" in key:
            raise UnsupportedAdapter(f"tensor {t.name!r} is of a kind this library cannot apply")
        else:
            lay.full[key] = t.shape
            lay.keys[t.name] = ("full", key)
    return lay


def _check_targets(peft_cfg, lay: _Layout) -> None:
    """Every module the file holds factors for must be one the config makes peft wrap."""
    from peft.tuners.tuners_utils import check_target_module_exists

    missed = sorted(p for p in list(lay.lora) + list(lay.ia3) if not check_target_module_exists(peft_cfg, p))
    if missed:
        raise ConfigMismatch(f"the config's target_modules leave out {len(missed)} module(s) the file has "
                             f"tensors for, e.g. {missed[0]}")


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first key matching the module name's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _lora_scaling(config: Mapping[str, Any], module: str, rank: int) -> float:
    r = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
    if r != rank:
        raise ConfigMismatch(f"config gives {module!r} rank {r}, its tensors have rank {rank}")
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _base_of(model: nn.Module) -> nn.Module:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    w = getattr(module, "base_layer", module)
    weight = getattr(w, "weight", None)
    if weight is None or weight.dim() != 2:
        return None
    return int(weight.shape[0]), int(weight.shape[1])  # (out, in)


def _check_model(base: nn.Module, lay: _Layout, config: Mapping[str, Any] | None) -> None:
    """Raise ModelMismatch / ConfigMismatch before anything is changed."""
    modules = dict(base.named_modules())
    params = dict(base.named_parameters())
    missing = sorted({p for p in list(lay.lora) + list(lay.ia3) if p not in modules}
                     | {p for p in lay.full if p not in params})
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelMismatch(f"the model lacks {len(missing)} module(s) the adapter targets: {shown}")
    problems = []
    for path, parts in lay.lora.items():
        dims = _linear_dims(modules[path])
        if dims is None:
            problems.append(f"{path} is not a linear layer")
            continue
        out_f, in_f = dims
        if config and config.get("fan_in_fan_out"):
            out_f, in_f = in_f, out_f
        a, b = parts.get("lora_A"), parts.get("lora_B")
        if a is None or b is None:
            raise ConfigMismatch(f"{path} has only one of lora_A / lora_B")
        if a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            problems.append(f"{path}: lora_A {a} and lora_B {b} do not fit a {out_f}x{in_f} layer")
        elif "magnitude" in parts and parts["magnitude"] != (out_f,):
            problems.append(f"{path}: DoRA magnitude {parts['magnitude']} does not fit {out_f} outputs")
        if config is not None and a is not None:
            _lora_scaling(config, path, a[0])
    for path, shape in lay.ia3.items():
        dims = _linear_dims(modules[path])
        if dims is None or shape not in ((dims[0], 1), (1, dims[1])):
            problems.append(f"{path}: (IA)3 vector {shape} does not fit the layer")
    for name, shape in lay.full.items():
        if tuple(params[name].shape) != shape:
            problems.append(f"{name}: stored {shape}, model has {tuple(params[name].shape)}")
    if problems:
        raise ModelMismatch("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))


_PEFT_ADDED = re.compile(r"\.(lora_[A-Za-z_]+|ia3_l)\b|\.modules_to_save\.")
_PEFT_WRAPPED = re.compile(r"\.(base_layer|original_module)\.")


def base_fingerprint(model: nn.Module) -> dict[str, str]:
    """The fingerprint of a model's base weights. On a model that carries peft layers the adapters'
    own tensors are left out and wrapped base weights keep their original names, so the value is
    the same before and after adapters are loaded."""
    sd = {}
    for name, t in _base_of(model).state_dict().items():
        if _PEFT_ADDED.search(name):
            continue
        sd[_PEFT_WRAPPED.sub(".", name)] = t
    return state_dict_fingerprint(sd)


def _check_base(model: nn.Module, manifest: Manifest) -> None:
    expected = manifest.base_model.fingerprint
    if not expected:
        return
    if expected.get("algorithm") != C.FINGERPRINT_ALGORITHM:
        raise BaseMismatch(f"unknown fingerprint algorithm {expected.get('algorithm')!r}")
    actual = base_fingerprint(model)["value"]
    if actual != expected.get("value"):
        who = manifest.base_model.id or "another base model"
        raise BaseMismatch(f"the adapter was made for {who} (fingerprint {expected.get('value', '')[:16]}...), "
                           f"this model's weights have fingerprint {actual[:16]}...")


def _peft_config(config: Mapping[str, Any], inference_mode: bool):
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in names and k not in ("peft_type", "auto_mapping")}
    kwargs["inference_mode"] = inference_mode
    cfg = PeftConfig.from_peft_type(peft_type=config["peft_type"], **kwargs)
    return cfg


# --- public -------------------------------------------------------------------------------------
def load_adapter(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default",
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 activate: bool = True, is_trainable: bool = False, check_base: bool = True):
    """Load a compressed PEFT adapter into ``model`` as the adapter ``adapter_name``.

    Args:
        model: a transformers model, or a ``peft.PeftModel`` that already holds other adapters.
        path: the compressed file.
        device: where the packed streams are decoded (default: the model's device).
        dtype: dtype of the decoded tensors (default: the file's target dtypes).
        activate: make it the active adapter.
        check_base: compare the file's base fingerprint, when it has one, with the model.

    Returns:
        The ``PeftModel`` (``model`` itself when it already was one).

    Raises:
        UnsupportedAdapter, ModelMismatch, ConfigMismatch, BaseMismatch, InvalidArgument, and the
        file errors of ``open_file``; the model is unchanged when any is raised.
    """
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    with CompeftFile(path) as f:
        m = f.manifest
        config = m.adapter.peft_config
        if config is None or config.get("peft_type") not in APPLICABLE:
            kind = None if config is None else config.get("peft_type")
            raise UnsupportedAdapter(f"cannot load a {kind or 'non-PEFT'} adapter as a PEFT adapter"
                                     + ("; use merge_adapter" if config is None else ""))
        if isinstance(model, PeftModel) and adapter_name in model.peft_config:
            raise InvalidArgument(f"the model already has an adapter named {adapter_name!r}")
        base = _base_of(model)
        lay = _layout(m)
        _check_model(base, lay, config)
        if check_base:
            _check_base(model, m)
        peft_cfg = _peft_config(config, inference_mode=not is_trainable)
        _check_targets(peft_cfg, lay)
        target = device if device is not None else next(base.parameters()).device
        tensors = f.state_dict(dtype=dtype, device=target)
    was_peft = isinstance(model, PeftModel)
    if was_peft:
        model.add_adapter(adapter_name, peft_cfg)
        wrapped = model
    else:
        wrapped = get_peft_model(model, peft_cfg, adapter_name=adapter_name)
    try:
        result = set_peft_model_state_dict(wrapped, tensors, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise ConfigMismatch(f"peft did not place {len(result.unexpected_keys)} tensor(s), "
                                 f"e.g. {result.unexpected_keys[0]}")
    except BaseException:  # take the half-added adapter out again
        if was_peft:
            wrapped.delete_adapter(adapter_name)
        else:
            wrapped.unload()
        raise
    if activate:
        wrapped.set_adapter(adapter_name)
    return wrapped


@dataclass
class MergedAdapter:
    """Handle of a merged adapter: ``unmerge()`` puts the original weights back, bit for bit."""

    model: nn.Module
    originals: dict[str, torch.Tensor]

    def unmerge(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, original in self.originals.items():
                params[name].copy_(original)
        self.originals = {}


def merge_adapter(model: nn.Module, path: str | os.PathLike, *, scale: float = 1.0,
                  check_base: bool = True) -> MergedAdapter:
    """Merge a compressed adapter into the weights of a (non-PEFT) transformers model.

    LoRA: ``W += scale * s * B @ A`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA,
    rank_pattern / alpha_pattern honoured), then DoRA's per-row renormalisation to the stored
    magnitudes; (IA)3: ``W *= l``; a full fine-tuning delta: ``W += scale * delta``;
    ``modules_to_save`` weights replace the model's. All new weights are computed before any is
    written.
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise InvalidArgument(f"scale must be a finite number, got {scale!r}")
    with CompeftFile(path) as f:
        m = f.manifest
        config = m.adapter.peft_config
        params = dict(model.named_parameters())
        if m.adapter.representation == C.REPRESENTATION_DELTA:
            lay = _Layout(full={t.name: t.shape for t in m.tensors},
                          keys={t.name: ("full", t.name) for t in m.tensors})
        elif config is not None and config.get("peft_type") in APPLICABLE:
            lay = _layout(m)
        else:
            raise UnsupportedAdapter("only LoRA, (IA)3 and full fine-tuning deltas can be merged")
        if lay.ia3 and scale != 1.0:
            raise InvalidArgument("an (IA)3 adapter merges with scale 1 only")
        _check_model(model, lay, config)
        if check_base:
            _check_base(model, m)
        device = next(model.parameters()).device
        tensors = f.state_dict(dtype=torch.float32, device=device)

    new: dict[str, torch.Tensor] = {}
    by_target = {}
    for key, (role, target) in lay.keys.items():
        by_target.setdefault(target, {})[role] = tensors[key]
    with torch.no_grad():
        for path in lay.lora:
            name = f"{path}.weight"
            w = params[name].to(torch.float32)
            a, b = by_target[path]["lora_A"], by_target[path]["lora_B"]
            delta = scale * _lora_scaling(config, path, a.shape[0]) * (b @ a)
            if config.get("fan_in_fan_out"):
                delta = delta.T
            merged = w + delta
            if "magnitude" in by_target[path]:
                norm = merged.norm(p=2, dim=1)
                merged = merged * (by_target[path]["magnitude"] / norm).unsqueeze(1)
            new[name] = merged
        for path in lay.ia3:
            name = f"{path}.weight"
            new[name] = params[name].to(torch.float32) * by_target[path]["ia3"]
        for name in lay.full:
            stored = by_target[name]["full"]
            if m.adapter.representation == C.REPRESENTATION_DELTA:
                new[name] = params[name].to(torch.float32) + scale * stored
            else:
                new[name] = stored
        originals = {name: params[name].detach().clone() for name in new}
        for name, value in new.items():
            params[name].copy_(value.to(params[name].dtype))
    return MergedAdapter(model=model, originals=originals)


__all__ = ["load_adapter", "merge_adapter", "MergedAdapter", "base_fingerprint"]
