"""How close a compressed adapter's weight update is to the original's.

For a LoRA module the update is ``delta W = s * B A``; its relative error
``||B A - B' A'||_F / ||B A||_F`` is computed from r x r Gram matrices
(``||B A||^2 = tr((B^T B)(A A^T))``), never forming ``delta W``. Any other sparsified tensor
(an (IA)3 vector, a full fine-tuning delta, a factor without its partner) is compared as it is.
The adapter-wide figure weights modules by the size of their update (with each LoRA module's
scaling ``s``, when the PEFT config is known). A module whose update became zero while the
original's was not is **emptied**: it no longer does anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import constants as C
from .codecs import get_codec
from .compressed import CompressedAdapter
from .errors import InvalidArgument
from .peft_layout import lora_matrices, lora_pairs, lora_scaling


@dataclass(frozen=True)
class ModuleFidelity:
    """One module (or one tensor) of the adapter."""

    name: str
    #: ``"lora"`` (the product of a factor pair) or ``"tensor"``
    kind: str
    #: Frobenius norm of the original update (times the LoRA scaling, when known)
    norm: float
    #: Frobenius norm of the difference
    error: float
    #: Frobenius norm of the compressed update
    approx_norm: float

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else (0.0 if self.error == 0 else math.inf)

    @property
    def emptied(self) -> bool:
        """The original update was not zero; the compressed one is (the module became a no-op)."""
        return self.norm > 0 and self.approx_norm == 0


@dataclass(frozen=True)
class Fidelity:
    modules: list[ModuleFidelity] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        """``sqrt(sum error^2) / sqrt(sum norm^2)`` over all modules; 0 for an empty adapter."""
        norm = math.sqrt(sum(m.norm ** 2 for m in self.modules))
        err = math.sqrt(sum(m.error ** 2 for m in self.modules))
        return err / norm if norm > 0 else 0.0

    @property
    def emptied(self) -> list[str]:
        return [m.name for m in self.modules if m.emptied]

    def worst(self, n: int = 5) -> list[ModuleFidelity]:
        return sorted(self.modules, key=lambda m: -m.relative_error)[:n]

    def summary(self) -> dict[str, Any]:
        """What the manifest records (``compression.fidelity``)."""
        return {"relative_error": round(self.relative_error, 6), "modules": len(self.modules),
                "emptied": len(self.emptied)}

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "emptied_modules": self.emptied,
                "per_module": [{"name": m.name, "kind": m.kind, "norm": m.norm, "error": m.error,
                                "relative_error": m.relative_error if math.isfinite(m.relative_error) else None}
                               for m in self.modules]}


class Lazy(Mapping[str, Any]):
    """Tensors by name, each made by ``make(name)`` when it is read and not kept: a comparison
    over a whole adapter holds one module's tensors at a time."""

    def __init__(self, names: Iterable[str], make: Callable[[str], Any]) -> None:
        self._names = list(dict.fromkeys(names))
        self._known = set(self._names)
        self._make = make

    def __getitem__(self, name: str) -> Any:
        if name not in self._known:
            raise KeyError(name)
        return self._make(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._known


def _f64(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``x`` as a float64 tensor on the CPU. The arithmetic here is torch's, not numpy's: torch
    decodes the tensors compared, and mixing the two libraries' thread pools slows both."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def pair_error(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, a_hat: np.ndarray | torch.Tensor,
               b_hat: np.ndarray | torch.Tensor) -> tuple[float, float, float]:
    """``(||B A||_F, ||B A - B' A'||_F, ||B' A'||_F)`` from r x r Gram matrices (A: r x n, B: m x r)."""
    a, b, a_hat, b_hat = (_f64(x) for x in (a, b, a_hat, b_hat))
    norm2 = float(torch.sum((b.T @ b) * (a @ a.T)))
    cross = float(torch.sum((b.T @ b_hat) * (a @ a_hat.T)))
    hat2 = float(torch.sum((b_hat.T @ b_hat) * (a_hat @ a_hat.T)))
    return math.sqrt(max(norm2, 0.0)), math.sqrt(max(norm2 - 2 * cross + hat2, 0.0)), math.sqrt(max(hat2, 0.0))


def compare_task_vectors(original: Mapping[str, np.ndarray | torch.Tensor], approx: Mapping[str, np.ndarray | torch.Tensor],
            shapes: Mapping[str, tuple[int, ...]], peft_config: Mapping[str, Any] | None = None) -> Fidelity:
    """Fidelity of task vectors ``approx`` against ``original`` (same names; flat or shaped
    arrays; ``shapes`` gives each tensor's shape). LoRA factor pairs are compared as products."""
    modules: list[ModuleFidelity] = []
    paired: set[str] = set()
    for module, a_name, b_name in lora_pairs(original):
        matrices = lora_matrices(shapes[a_name], shapes[b_name])
        if matrices is None or b_name not in approx or a_name not in approx:
            continue
        sa, sb = matrices
        scaling = 1.0
        if peft_config is not None:
            try:
                scaling = abs(lora_scaling(peft_config, module, sa[0]))
            except Exception:  # a malformed config: compare the products unscaled
                scaling = 1.0
            if not math.isfinite(scaling) or scaling > 1e6:
                scaling = 1.0
        a, b = _f64(original[a_name]).reshape(sa), _f64(original[b_name]).reshape(sb)
        a_hat, b_hat = _f64(approx[a_name]).reshape(sa), _f64(approx[b_name]).reshape(sb)
        norm, err, approx_norm = pair_error(a, b, a_hat, b_hat)
        modules.append(ModuleFidelity(module, "lora", scaling * norm, scaling * err, scaling * approx_norm))
        paired.update((a_name, b_name))
    for name in sorted(n for n in original if n not in paired and n in approx):
        o, h = _f64(original[name]).reshape(-1), _f64(approx[name]).reshape(-1)
        modules.append(ModuleFidelity(name, "tensor", float(torch.linalg.vector_norm(o)),
                                      float(torch.linalg.vector_norm(o - h)), float(torch.linalg.vector_norm(h))))
    return Fidelity(modules)


def measure_fidelity(original: Mapping[str, torch.Tensor], compressed: CompressedAdapter, *,
             base_weights: Mapping[str, torch.Tensor] | None = None) -> Fidelity:
    """Fidelity of a compressed adapter against the tensors it was made from.

    Only the tensors ``compress`` sparsified take part (dense ones are stored as they are). The
    task vector is the tensor minus the file's reference (zero, ones, or ``base_weights`` for a
    file of deltas).

    Raises:
        InvalidArgument: a tensor of the file is missing from ``original`` or has another shape,
            or a file of deltas without ``base_weights``.
    """
    reference = compressed.compression.reference
    deltas = compressed.adapter.representation == C.REPRESENTATION_DELTA
    if deltas and base_weights is None:
        raise InvalidArgument("this file holds deltas to a base model: pass base_weights to measure its fidelity")
    names: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in compressed.tensors.items():
        if get_codec(t.encoding).every_element:
            continue
        if name not in original:
            raise InvalidArgument(f"the original adapter has no tensor {name!r}")
        if tuple(original[name].shape) != tuple(t.shape):
            raise InvalidArgument(f"tensor {name!r}: the original has shape {tuple(original[name].shape)}, "
                                  f"the file {t.shape}")
        if deltas:
            assert base_weights is not None
            if name not in base_weights:
                raise InvalidArgument(f"base_weights has no tensor {name!r}")
        names.append(name)
        shapes[name] = tuple(t.shape)

    def tau(name: str) -> torch.Tensor:
        w = _f64(original[name])
        if deltas:
            assert base_weights is not None
            return w - _f64(base_weights[name])
        return w - (1.0 if reference == C.REFERENCE_ONES else 0.0)

    def hat(name: str) -> torch.Tensor:
        t = compressed.tensors[name]
        return _f64(t.to_dense().float()) - t.offset

    # a module at a time: the whole adapter is never held in float64
    return compare_task_vectors(Lazy(names, tau), Lazy(names, hat), shapes, compressed.adapter.peft_config)


__all__ = ["Fidelity", "ModuleFidelity", "Lazy", "measure_fidelity", "compare_task_vectors", "pair_error"]
