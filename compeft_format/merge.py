"""Merging adapters into one: task arithmetic, TIES and DARE on the adapters' task vectors.

Each adapter's task vector is taken per module: for LoRA the update ``s B A`` (``s`` its scaling),
for (IA)3 ``l - 1``. The methods combine them element by element:

- ``task-arithmetic``: ``sum_i w_i tau_i``.
- ``ties`` (Yadav et al., 2023): each ``tau_i`` trimmed to its ``density`` largest magnitudes, a
  sign elected per element (the sign of the weighted sum of the trimmed values), and the weighted
  mean of the values that agree with it.
- ``dare`` (Yu et al., 2024): each element of each ``tau_i`` dropped with probability
  ``1 - density`` and the rest divided by ``density`` (seeded), then task arithmetic.

A merged LoRA is factored again: task arithmetic exactly, by stacking the factors (its rank is
the sum of the ranks); TIES and DARE, whose updates are not low-rank, by a truncated SVD to
``rank`` (default: the sum of the ranks, at most the module's smaller side). (IA)3 vectors merge
exactly. The result is a PEFT state dict and config, which ``compress`` then compresses, so that
``compeft merge`` writes a compressed file like any other.

Example:
    >>> sd, config, base = merge(["math.cpeft.safetensors", "code.cpeft.safetensors"], method="ties")
    >>> cf.save(cf.compress(sd, peft_config=config, base=base), "merged.cpeft.safetensors")
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import constants as C
from .binding import BaseBinding
from .container import read_safetensors_header
from .errors import ConfigMismatch, InvalidArgument, UnsupportedAdapter
from .peft_io import read_source
from .peft_layout import PEFT_PREFIX, lora_pairs, lora_scaling, parse_key, peft_type
from .reader import CompeftFile

PathLike = str | os.PathLike[str]
METHODS = ("task-arithmetic", "ties", "dare")
#: default fraction kept by TIES' trim and DARE's drop
DEFAULT_DENSITY = 0.2
#: PEFT config members a merged adapter cannot keep (they describe one adapter's training)
_LORA_UNSUPPORTED = {"use_dora": "DoRA magnitudes", "modules_to_save": "modules_to_save copies",
                     "trainable_token_indices": "trainable tokens"}


@dataclass
class Source:
    """One adapter to merge: its tensors (float32), PEFT config and base binding."""

    name: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    base: BaseBinding
    #: where it was read from, as given
    path: str = ""


def read(path: PathLike) -> Source:
    """An adapter from a compressed file (decoded, every digest checked) or a PEFT folder."""
    p = Path(path)
    if p.is_file() and p.name.endswith(".safetensors"):
        if read_safetensors_header(p)[1].get(C.META_FORMAT) == C.FORMAT_NAME:
            with CompeftFile(p) as f:
                m = f.manifest
                tensors = f.state_dict(dtype=torch.float32, verify=True)
                return Source(p.name, tensors, dict(m.adapter.peft_config or {}), m.base_model, str(p))
    from .batch import is_adapter_folder, several_adapters

    found = several_adapters(p)
    if found is not None and not is_adapter_folder(p):  # an adapter folder is its top adapter, as for peft
        names = ", ".join(list(found)[:6]) + (" ..." if len(found) > 6 else "")
        raise InvalidArgument(f"{p} holds {len(found)} adapters ({names}): give each adapter to merge by its own "
                              "folder", path=str(p))
    tensors, config = read_source(p)
    base = BaseBinding(id=(config or {}).get("base_model_name_or_path"))
    return Source(p.name, {k: v.to(torch.float32) for k, v in tensors.items()}, dict(config or {}), base, str(p))


def _check_sources(sources: Sequence[Source], any_base: bool = False) -> str:
    """The PEFT type all sources share; refuses what cannot be merged."""
    if len(sources) < 2:
        raise InvalidArgument("merging needs two adapters or more")
    types = {str(s.config.get("peft_type", "")).upper() for s in sources}
    if len(types) != 1 or (ptype := types.pop()) not in ("LORA", "IA3"):
        raise UnsupportedAdapter(f"only LoRA adapters, or only (IA)3 adapters, merge; these are "
                                 f"{sorted(str(s.config.get('peft_type')) for s in sources)}")
    for s in sources:
        if peft_type(s.config) is None:
            raise UnsupportedAdapter(f"{s.name} has no PEFT config to merge by")
        for key, what in _LORA_UNSUPPORTED.items():
            if s.config.get(key):
                raise UnsupportedAdapter(f"{s.name} has {what}, which do not merge; merge adapters without them")
        if s.config.get("bias", "none") != "none":
            raise UnsupportedAdapter(f"{s.name} trains biases (bias={s.config['bias']!r}), which do not merge")
        unknown = sorted(k for k in s.tensors if parse_key(k).role.name not in ("lora_A", "lora_B", "ia3"))
        if unknown:
            raise UnsupportedAdapter(f"{s.name}: tensor {unknown[0]!r} is not a LoRA factor or an (IA)3 vector, "
                                     "and only those merge")
    fingerprints = {s.base.fingerprint for s in sources if s.base.fingerprint is not None}
    if len(fingerprints) > 1:
        raise ConfigMismatch("the adapters were made for different base weights (their base fingerprints differ); "
                             "adapters merge only on the base they share")
    named = [s for s in sources if base_name(s.base.id)]
    if not any_base and len({base_name(s.base.id) for s in named}) > 1 and \
            not (len(fingerprints) == 1 and all(s.base.fingerprint is not None for s in sources)):
        shown = ", ".join(f"{s.path} for {s.base.id}" for s in named)
        raise ConfigMismatch(f"the adapters were made for base models of different names ({shown}); adapters merge "
                             "only on the base they share (--any-base, any_base=True, when the names are one model's)")
    return ptype


def base_name(ref: str | None) -> str | None:
    """The name a base model reference ends with, lower-cased: ``HuggingFaceTB/SmolLM2-135M`` and
    ``/models/smollm2-135m/`` name one model."""
    if not ref or not ref.strip("/"):
        return None
    return ref.rstrip("/").rsplit("/", 1)[-1].lower()


def combine(taus: Sequence[torch.Tensor], weights: Sequence[float], method: str, density: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """One merged task vector from ``taus`` (tensors of one shape) by ``method``."""
    if method == "task-arithmetic":
        return sum((w * t for w, t in zip(weights, taus, strict=True)), torch.zeros_like(taus[0]))
    if method == "dare":
        out = torch.zeros_like(taus[0])
        for w, t in zip(weights, taus, strict=True):
            keep = torch.rand(t.shape, generator=generator) < density
            out += w * torch.where(keep, t / density, torch.zeros_like(t))
        return out
    if method == "ties":
        trimmed = []
        for t in taus:
            k = math.ceil(density * t.numel())
            if k >= t.numel():
                trimmed.append(t)
                continue
            if k == 0:
                trimmed.append(torch.zeros_like(t))
                continue
            threshold = t.abs().reshape(-1).kthvalue(t.numel() - k + 1).values
            trimmed.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
        stacked = torch.stack(trimmed)
        wt = torch.tensor(list(weights), dtype=stacked.dtype).reshape(-1, *([1] * taus[0].dim()))
        elected = torch.sign((wt * stacked).sum(0))
        agree = (torch.sign(stacked) == elected) & (stacked != 0)
        total = (wt * agree).sum(0)
        return torch.where(total != 0, (wt * stacked * agree).sum(0) / torch.where(total != 0, total, 1), 0)
    raise InvalidArgument(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def _factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``B @ A`` the best rank-``rank`` approximation of ``delta`` (truncated SVD)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def merge(paths: Sequence[PathLike], *, method: str = "task-arithmetic", weights: Sequence[float] | None = None,
          density: float = DEFAULT_DENSITY, rank: int | None = None,
          seed: int = 0, any_base: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], BaseBinding]:
    """Merge the adapters at ``paths`` (compressed files or PEFT folders, all LoRA or all (IA)3,
    made for the same base) into one.

    Args:
        method: ``task-arithmetic``, ``ties`` or ``dare`` (the module's description).
        weights: one per adapter (default 1 each): task arithmetic and DARE scale each task
            vector by it, TIES weighs each in the sign election and the mean.
        density: the fraction TIES keeps of each task vector, and DARE keeps of each element.
        rank: the rank of a merged LoRA made by TIES or DARE (default the sum of the ranks).
        seed: DARE's random drops.
        any_base: merge adapters whose recorded base models have different names (one model
            saved under two names); different base fingerprints are refused all the same.

    Returns:
        (PEFT state dict, PEFT config, the base binding the adapters share).

    Raises:
        InvalidArgument: bad method, weights, density or rank; fewer than two adapters.
        UnsupportedAdapter: other PEFT types, or parts that do not merge (DoRA, biases, ...).
        ConfigMismatch: adapters for different base weights (fingerprints) or, unless
            ``any_base``, base models of different names; modules whose shapes differ.
    """
    if method not in METHODS:
        raise InvalidArgument(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not (0 < density <= 1):
        raise InvalidArgument(f"density must be in (0, 1], got {density!r}")
    if rank is not None and rank < 1:
        raise InvalidArgument(f"rank must be at least 1, got {rank!r}")
    sources = [read(p) for p in paths]
    ptype = _check_sources(sources, any_base)
    w = [1.0] * len(sources) if weights is None else [float(x) for x in weights]
    if len(w) != len(sources) or not all(math.isfinite(x) for x in w):
        raise InvalidArgument(f"give one finite weight per adapter ({len(sources)}), got {list(weights or [])}")
    generator = torch.Generator().manual_seed(seed)
    base = next((s.base for s in sources if s.base.fingerprint is not None), sources[0].base)
    # the first adapter's settings, less those that choose modules or ranks: the merge names them
    config = {k: v for k, v in sources[0].config.items()
              if k not in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules")}
    if ptype == "IA3":
        return (*_merge_ia3(sources, w, method, density, generator, config), base)
    return (*_merge_lora(sources, w, method, density, rank, generator, config), base)


def _merge_ia3(sources: Sequence[Source], w: Sequence[float], method: str, density: float,
               generator: torch.Generator, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    keys = sorted({k for s in sources for k in s.tensors})
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        shapes = {tuple(s.tensors[key].shape) for s in sources if key in s.tensors}
        if len(shapes) != 1:
            raise ConfigMismatch(f"{key}: the adapters' vectors have different shapes {sorted(shapes)}")
        ones = torch.ones(shapes.pop())
        taus = [s.tensors[key] - 1 if key in s.tensors else torch.zeros_like(ones) for s in sources]
        out[key] = 1 + combine(taus, w, method, density, generator)
    config["target_modules"] = sorted({m for s in sources for m in _as_list(s.config.get("target_modules"))})
    config["feedforward_modules"] = sorted({m for s in sources for m in _as_list(s.config.get("feedforward_modules"))})
    return out, config


def _merge_lora(sources: Sequence[Source], w: Sequence[float], method: str, density: float, rank: int | None,
                generator: torch.Generator, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    modules: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
    for i, s in enumerate(sources):
        for module, a_key, b_key in lora_pairs(s.tensors):
            a, b = s.tensors[a_key], s.tensors[b_key]
            if a.dim() != 2 or b.dim() != 2:
                raise UnsupportedAdapter(f"{s.name}: {module} is not a linear LoRA module; only those merge")
            modules.setdefault(module, []).append((i, a, b, lora_scaling(s.config, module, a.shape[0])))
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, parts in sorted(modules.items()):
        shapes = {(a.shape[1], b.shape[0]) for _, a, b, _ in parts}
        if len(shapes) != 1:
            raise ConfigMismatch(f"{module}: the adapters' updates have different shapes {sorted(shapes)}")
        n_in, n_out = shapes.pop()
        if method == "task-arithmetic":  # exact: the factors stacked, each B carrying its weight and scaling
            a_new = torch.cat([a for _, a, _, _ in parts], 0)
            b_new = torch.cat([w[i] * scaling * b for i, _, b, scaling in parts], 1)
        else:
            taus = [torch.zeros(n_out, n_in) for _ in sources]
            for i, a, b, scaling in parts:
                taus[i] = scaling * (b @ a)
            r = rank or sum(a.shape[0] for _, a, _, _ in parts)
            a_new, b_new = _factor(combine(taus, w, method, density, generator), min(r, n_in, n_out))
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a_new.contiguous()
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b_new.contiguous()
        ranks[module] = a_new.shape[0]
    # every module's scaling is 1: lora_alpha equals its rank (rsLoRA off)
    r0 = max(ranks.values(), default=1)
    config.update({"r": r0, "lora_alpha": r0, "use_rslora": False,
                   "target_modules": sorted(ranks),  # the modules themselves, by their full names
                   "rank_pattern": {m: r for m, r in ranks.items() if r != r0},
                   "alpha_pattern": {m: r for m, r in ranks.items() if r != r0}})
    return out, config


def _as_list(x: Any) -> list[str]:
    if isinstance(x, str):
        return [x]
    return [str(v) for v in x] if isinstance(x, (list, tuple)) else []


__all__ = ["merge", "combine", "read", "METHODS", "DEFAULT_DENSITY", "Source"]
