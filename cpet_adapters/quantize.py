"""Weight quantisation of a linear layer, returned as the effective (dequantised) weight: what the
quantised layer computes with, as a plain float32 tensor that any checkpoint and any PEFT layer take.

Each quantiser is the maintained library's own code, run on the CPU:

- ``rtn`` (round to nearest, 2 to 8 bits, per output channel or per group, symmetric or with a zero
  point): torchao's ``IntxWeightOnlyConfig`` with ``PerAxis(0)`` / ``PerGroup`` granularity and
  ``MappingType.SYMMETRIC`` / ``ASYMMETRIC``, then the quantised tensor's ``dequantize()``.
- ``nf4`` (QLoRA's NormalFloat4 with one absmax per block, optionally double quantisation):
  ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")`` and ``dequantize_4bit``.

Both are element-wise given their per-group statistics (absolute maxima, minima), so the result is
the same bits on every run and thread count.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from compeft_format.errors import InvalidArgument, UnsupportedModel

#: the library that quantises each kind of step (its distribution name)
LIBRARIES: dict[str, str] = {"rtn": "torchao", "nf4": "bitsandbytes"}


@dataclass(frozen=True)
class Quantised:
    """A quantised weight.

    Attributes:
        weight: the effective weight, float32, of the input's shape.
        bits_per_weight: storage of the quantised form per weight: the code bits plus the per-group
            statistics (scales, zero points, absmax) at the width the library stores them.
        scale, zero_point: round-to-nearest's scales ``[out, groups]`` (float32) and integer zero
            points (None when symmetric): ``weight == (codes - zero_point) * scale`` per group.
    """

    weight: torch.Tensor
    bits_per_weight: float
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None


#: loggers of the quantisation libraries that warn at import about CUDA extensions a CPU run does not use
IMPORT_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_imports(*loggers: str) -> Iterator[None]:
    """Raise the named loggers (default ``IMPORT_LOGGERS``) to ERROR for the duration: torchao and
    bitsandbytes log warnings when imported (also by transformers, when it loads a model) about
    optional CUDA extensions and kernels that a CPU run does not use."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers or IMPORT_LOGGERS]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _import(module: str) -> ModuleType:
    """Import a quantisation library.

    Raises:
        UnsupportedModel: it is not installed (the ``train`` extra installs both).
    """
    try:
        with quiet_imports():
            return importlib.import_module(module)
    except ImportError as e:
        dist = module.split(".")[0]
        raise UnsupportedModel(f"this recipe needs {dist}, which cannot be imported here ({e}); "
                               "pip install 'compeft[train]'") from None


def library_version(kind: str) -> tuple[str, str | None]:
    """The library (distribution name) that quantises steps of ``kind`` and its installed version."""
    dist = LIBRARIES[kind]
    try:
        return dist, importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return dist, None


def _matrix(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise InvalidArgument(f"a weight to quantise is a float matrix, not {weight.dtype} of shape {tuple(weight.shape)}")


def check_rtn(in_features: int, params: Mapping[str, Any], where: str) -> None:
    """Whether a round-to-nearest step fits a layer with ``in_features`` inputs.

    Raises:
        InvalidArgument: the group size does not divide ``in_features``.
    """
    group = params.get("group")
    if group is not None and in_features % group:
        raise InvalidArgument(f"group size {group} does not divide in_features {in_features} of {where}; "
                              f"use a group that divides it (e.g. one of {_divisors(in_features)})")


def _divisors(n: int) -> list[int]:
    return [d for d in (16, 32, 64, 128, 256) if n % d == 0] or [n]


def rtn(weight: torch.Tensor, *, bits: int, group: int | None, symmetric: bool) -> Quantised:
    """Round-to-nearest weight-only quantisation with torchao's ``IntxWeightOnlyConfig``.

    Args:
        weight: ``[out_features, in_features]``.
        bits: 2 to 8.
        group: input weights per scale; None for one scale per output channel.
        symmetric: a scale per group (zero maps to zero); else a scale and a zero point.

    Returns:
        The effective weight, each group holding at most ``2**bits`` distinct values, within half a
        quantisation step of ``weight``.

    Raises:
        InvalidArgument: the group does not divide ``in_features``, or bits out of range.
        UnsupportedModel: torchao is not installed.
    """
    _matrix(weight)
    if not 2 <= bits <= 8:
        raise InvalidArgument(f"round-to-nearest takes 2 to 8 bits, not {bits}")
    check_rtn(int(weight.shape[1]), {"group": group}, "this weight")
    quant = _import("torchao.quantization")
    granularity = _import("torchao.quantization.granularity")
    primitives = _import("torchao.quantization.quant_primitives")
    config = quant.IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{bits}"),
        granularity=granularity.PerAxis(0) if group is None else granularity.PerGroup(group),
        mapping_type=primitives.MappingType.SYMMETRIC if symmetric else primitives.MappingType.ASYMMETRIC,
    )
    with torch.no_grad():
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(weight.detach().to(torch.float32, copy=True), requires_grad=False)
        quant.quantize_(layer, config)
        q: Any = layer.weight  # torchao's IntxUnpackedToInt8Tensor
        effective = q.dequantize().to(torch.float32)
        stats_bits = q.scale.numel() * q.scale.element_size() * 8
        zero_point = None
        if not symmetric and q.zero_point is not None:
            stats_bits += q.zero_point.numel() * q.zero_point.element_size() * 8
            zero_point = q.zero_point.detach().clone()
        scale = q.scale.detach().to(torch.float32).clone()
    return Quantised(effective, bits + stats_bits / weight.numel(), scale, zero_point)


def nf4(weight: torch.Tensor, *, block: int, double_quant: bool) -> Quantised:
    """QLoRA NF4 quantisation with bitsandbytes: each block of ``block`` consecutive weights (row
    major, a block may span rows) becomes NF4 code-book values times the block's absolute maximum.

    Args:
        weight: ``[out_features, in_features]``.
        block: weights per absmax (bitsandbytes' ``blocksize``).
        double_quant: quantise the absmax values too (bitsandbytes' ``compress_statistics``).

    Raises:
        UnsupportedModel: bitsandbytes is not installed.
    """
    _matrix(weight)
    functional = _import("bitsandbytes.functional")
    with torch.no_grad():
        # Flattened: bitsandbytes 0.50's CPU dequantisation kernel treats each row of a matrix as
        # starting a block, which is wrong when ``block`` does not divide in_features.
        w = weight.detach().to(torch.float32).reshape(-1).contiguous()
        packed, state = functional.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=double_quant)
        effective = functional.dequantize_4bit(packed, state).to(torch.float32).reshape(weight.shape)
    stats_bits = state.absmax.numel() * state.absmax.element_size() * 8
    if state.nested:
        stats_bits += state.state2.absmax.numel() * state.state2.absmax.element_size() * 8 + 32  # + the offset
    return Quantised(effective, 4 + stats_bits / weight.numel())


def nf4_code() -> torch.Tensor:
    """The 16 values of the NF4 code book, as bitsandbytes defines them."""
    functional = _import("bitsandbytes.functional")
    code: torch.Tensor = functional.get_4bit_type("nf4", device="cpu")
    return code


QUANTISERS: dict[str, Callable[..., Quantised]] = {"rtn": rtn, "nf4": nf4}


def quantise(kind: str, params: Mapping[str, Any], weight: torch.Tensor) -> Quantised:
    """Quantise ``weight`` by one quantisation step of a recipe (``recipe.Step``).

    Raises:
        InvalidArgument: an unknown kind, or parameters that do not fit the weight.
        UnsupportedModel: the library is not installed.
    """
    if kind not in QUANTISERS:
        raise InvalidArgument(f"{kind!r} is not a quantisation step; use one of {sorted(QUANTISERS)}")
    return QUANTISERS[kind](weight, **params)


__all__ = ["Quantised", "rtn", "nf4", "nf4_code", "quantise", "check_rtn", "library_version", "quiet_imports",
           "LIBRARIES"]
