"""ComPEFT compression (Yadav et al., 2023): sparsify a task vector by magnitude, then replace each
kept entry by ``sign * alpha * sigma``.

The task vector is the adapter minus a reference: zero for LoRA, ones for (IA)3, the pretrained
weights for a full fine-tuning residual. With ``scope="global"`` every sparsified tensor joins one
vector (keys in sorted order) for one top-k and one scale; ``scope="tensor"`` does both per tensor.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from . import constants as C
from ._version import __version__
from .compressed import CompressedAdapter, CompressedTensor
from .dtypes import DTYPE_NAMES, TORCH_DTYPES, name_of
from .errors import InvalidArgument, NonFiniteInput, UnsupportedDtype
from .manifest import AdapterInfo, BaseModelInfo, CompressionInfo, ProvenanceInfo

Reference = str | Mapping[str, torch.Tensor]


def kept_count(density: float, n: int) -> int:
    """``round(density * n)`` with halves rounded up, computed in binary64 (spec 6.2)."""
    return min(n, int(math.floor(density * n + 0.5)))


def top_k_indices(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest entries; among equal magnitudes the lower index wins.

    Linear time: one partition finds the k-th largest value, then ties at that value are filled
    from the lowest index upward.
    """
    n = magnitude.size
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    threshold = np.partition(magnitude, n - k)[n - k]
    above = magnitude > threshold
    need = k - int(np.count_nonzero(above))
    ties = np.flatnonzero(magnitude == threshold)[:need]
    above[ties] = True
    return np.flatnonzero(above).astype(np.int64)


def task_std(values: np.ndarray) -> float:
    """Standard deviation of the dense task vector, unbiased (torch.std's default, as the paper's
    code). One element: its magnitude; none: 0."""
    n = values.size
    if n == 0:
        return 0.0
    if n == 1:
        return float(abs(values[0]))
    return float(np.std(values, dtype=np.float64, ddof=1))


def _as_f32(name: str, t: torch.Tensor) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise UnsupportedDtype(f"tensor {name!r} is a {type(t).__name__}, not a torch tensor")
    if t.dtype not in DTYPE_NAMES:
        raise UnsupportedDtype(f"tensor {name!r} has dtype {t.dtype}; only float32, float16 and bfloat16 can be compressed")
    a = t.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy()
    if not np.isfinite(a).all():
        raise NonFiniteInput(f"tensor {name!r} contains NaN or Inf")
    return a


def _reference_for(name: str, t: torch.Tensor, reference: Reference) -> tuple[np.ndarray | None, float]:
    """The reference as (explicit base array or None, scalar offset)."""
    if isinstance(reference, str):
        if reference == C.REFERENCE_ZERO:
            return None, 0.0
        if reference == C.REFERENCE_ONES:
            return None, 1.0
        raise InvalidArgument(f"reference must be 'zero', 'ones' or a base state dict, not {reference!r}")
    if name not in reference:
        raise InvalidArgument(f"base state dict has no tensor {name!r}")
    base = reference[name]
    if tuple(base.shape) != tuple(t.shape):
        raise InvalidArgument(f"base tensor {name!r} has shape {tuple(base.shape)}, adapter has {tuple(t.shape)}")
    return _as_f32(name, base), 0.0


def _keep_dense(name: str, numel: int, patterns: Sequence[str], min_sparse_numel: int) -> bool:
    return numel < min_sparse_numel or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def compress(
    state_dict: Mapping[str, torch.Tensor],
    *,
    density: float = 0.1,
    alpha: float = 1.0,
    scope: str = C.SCOPE_GLOBAL,
    mode: str = C.MODE_TERNARY,
    reference: Reference = C.REFERENCE_ZERO,
    dtype: str | torch.dtype | None = None,
    dense_patterns: Iterable[str] = C.DEFAULT_DENSE_PATTERNS,
    min_sparse_numel: int = C.DEFAULT_MIN_SPARSE_NUMEL,
    adapter_kind: str = "other",
    peft_config: Mapping[str, Any] | None = None,
    base_model_id: str | None = None,
    base_model_revision: str | None = None,
    base_fingerprint: Mapping[str, str] | None = None,
    source: str | None = None,
    created_at: str | None = None,
) -> CompressedAdapter:
    """Compress an adapter's tensors with ComPEFT.

    Args:
        state_dict: adapter tensors (float32, float16 or bfloat16), by name.
        density: fraction of task-vector entries kept, in (0, 1]; exactly
            ``round(density * N)`` entries are selected (``kept_count``).
        alpha: multiplier of sigma, the standard deviation of the dense task vector.
        scope: ``"global"`` (one top-k and one scale over all sparsified tensors, the paper's
            default) or ``"tensor"`` (per tensor).
        mode: ``"ternary"`` (kept entries become ``+/- alpha*sigma``) or ``"prune"`` (kept entries
            keep their values; the paper's ablation).
        reference: ``"zero"`` (LoRA), ``"ones"`` ((IA)3) or the pretrained state dict (full
            fine-tuning; the file then stores deltas).
        dtype: dtype the tensors decode to; default each tensor's own.
        dense_patterns: glob patterns of tensor names stored dense, as they are.
        min_sparse_numel: tensors with fewer elements are stored dense.

    Returns:
        A ``CompressedAdapter``; ``save`` writes it to a file.

    Raises:
        InvalidArgument: density, alpha, scope, mode or reference out of range.
        UnsupportedDtype: a tensor is not a float tensor.
        NonFiniteInput: a tensor holds NaN or Inf.

    Example:
        >>> ca = compress(peft_state_dict, density=0.1, alpha=1.0)
        >>> save(ca, "adapter.cpeft.safetensors")
    """
    if not (isinstance(density, (int, float)) and 0.0 < float(density) <= 1.0):
        raise InvalidArgument(f"density must be in (0, 1], got {density!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise InvalidArgument(f"alpha must be a finite number > 0, got {alpha!r}")
    if scope not in C.SCOPES:
        raise InvalidArgument(f"scope must be one of {list(C.SCOPES)}, got {scope!r}")
    if mode not in C.MODES:
        raise InvalidArgument(f"mode must be one of {list(C.MODES)}, got {mode!r}")
    if min_sparse_numel < 0:
        raise InvalidArgument("min_sparse_numel must be >= 0")
    patterns = tuple(dense_patterns)
    target = None if dtype is None else name_of(dtype)
    explicit_base = not isinstance(reference, str)

    names = sorted(state_dict)
    dense: dict[str, CompressedTensor] = {}
    sparse_names: list[str] = []
    taus: dict[str, np.ndarray] = {}
    offsets: dict[str, float] = {}
    for name in names:
        t = state_dict[name]
        values = _as_f32(name, t)
        tdtype = target or name_of(t.dtype)
        shape = tuple(int(d) for d in t.shape)
        if _keep_dense(name, values.size, patterns, min_sparse_numel):
            src = t.detach().to("cpu")
            if explicit_base:
                base, _ = _reference_for(name, t, reference)
                src = torch.from_numpy(values - base)
            dense[name] = CompressedTensor(name, shape, tdtype, C.ENC_DENSE,
                                           values=_finite_cast(name, src.reshape(-1), tdtype).clone())
            continue
        base, offset = _reference_for(name, t, reference)
        taus[name] = values - base if base is not None else values - np.float32(offset)
        offsets[name] = offset
        sparse_names.append(name)

    sparse: dict[str, CompressedTensor] = {}
    sigma_global: float | None = None
    candidates = sum(taus[n].size for n in sparse_names)
    if scope == C.SCOPE_GLOBAL and sparse_names:
        flat = np.concatenate([taus[n] for n in sparse_names])
        sigma_global = task_std(flat)
        keep = top_k_indices(np.abs(flat), kept_count(density, flat.size))
        bounds = np.cumsum([0] + [taus[n].size for n in sparse_names])
        split = np.searchsorted(keep, bounds)
        for i, n in enumerate(sparse_names):
            local = keep[split[i]:split[i + 1]] - bounds[i]
            sparse[n] = _make_sparse(n, state_dict[n], taus[n], local, sigma_global, alpha,
                                     offsets[n], mode, target)
    else:
        for n in sparse_names:
            tau = taus[n]
            keep = top_k_indices(np.abs(tau), kept_count(density, tau.size))
            sparse[n] = _make_sparse(n, state_dict[n], tau, keep, task_std(tau), alpha,
                                     offsets[n], mode, target)

    tensors = {n: (sparse.get(n) or dense[n]) for n in names}
    kept = sum(t.nnz for t in sparse.values())
    return CompressedAdapter(
        tensors=tensors,
        adapter=AdapterInfo(
            kind=adapter_kind if adapter_kind in C.ADAPTER_KINDS else "other",
            representation=C.REPRESENTATION_DELTA if explicit_base else C.REPRESENTATION_WEIGHTS,
            peft_config=dict(peft_config) if peft_config is not None else None,
        ),
        base_model=BaseModelInfo(
            id=base_model_id,
            revision=base_model_revision,
            fingerprint=dict(base_fingerprint) if base_fingerprint else None,
        ),
        compression=CompressionInfo(
            method=C.METHOD_COMPEFT,
            density=float(density),
            alpha=float(alpha),
            scope=scope,
            mode=mode,
            reference=C.REFERENCE_BASE if explicit_base else str(reference),
            sigma=sigma_global,
            candidates=int(candidates),
            kept=int(kept),
        ),
        provenance=ProvenanceInfo(
            tool=f"compeft {__version__}",
            created_at=created_at or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            source=source,
        ),
    )



def _make_sparse(name: str, t: torch.Tensor, tau: np.ndarray, keep: np.ndarray, sigma: float,
                 alpha: float, offset: float, mode: str, target: str | None) -> CompressedTensor:
    # An entry whose task value is exactly zero has sign 0 in the paper's formula: it is not stored.
    keep = keep[tau[keep] != 0]
    tdtype = target or name_of(t.dtype)
    if mode == C.MODE_TERNARY and not math.isfinite(float(np.float32(alpha * sigma))):
        raise InvalidArgument(f"alpha * sigma = {alpha * sigma:g} overflows binary32 for tensor {name!r}")
    shape = tuple(int(d) for d in t.shape)
    if mode == C.MODE_TERNARY:
        return CompressedTensor(name, shape, tdtype, C.ENC_TERNARY, indices=keep,
                                negative=tau[keep] < 0, scale=float(np.float32(alpha * sigma)), offset=offset,
                                sigma=sigma)
    values = _finite_cast(name, torch.from_numpy(tau[keep].copy()), tdtype)
    return CompressedTensor(name, shape, tdtype, C.ENC_SPARSE, indices=keep, values=values, offset=offset)


def _finite_cast(name: str, values: torch.Tensor, dtype: str) -> torch.Tensor:
    """``values`` in ``dtype``, refusing values that overflow it (files never hold infinities)."""
    out = values.to(TORCH_DTYPES[dtype])
    if not bool(torch.isfinite(out).all()):
        raise InvalidArgument(f"tensor {name!r} has values beyond the range of {dtype}; choose a wider dtype")
    return out


def rescale(adapter: CompressedAdapter, alpha: float) -> CompressedAdapter:
    """The same selection with another alpha: every ternary scale becomes ``alpha * sigma``."""
    old = adapter.compression.alpha
    if not old or adapter.compression.mode != C.MODE_TERNARY:
        raise InvalidArgument("rescale needs a ternary ComPEFT adapter with a recorded alpha")
    if not (math.isfinite(alpha) and alpha > 0):
        raise InvalidArgument(f"alpha must be a finite number > 0, got {alpha!r}")
    tensors = {}
    for n, t in adapter.tensors.items():
        if t.encoding == C.ENC_TERNARY:
            sigma = t.sigma if t.sigma is not None else t.scale / old
            scale = np.float32(sigma * alpha)
            if not np.isfinite(scale):
                raise InvalidArgument(f"alpha {alpha:g} times sigma overflows binary32 for tensor {n!r}")
            t = replace(t, scale=float(scale))
        tensors[n] = t
    return replace(adapter, tensors=tensors, compression=replace(adapter.compression, alpha=float(alpha)))


def alpha_search(
    evaluate: Callable[[dict[str, torch.Tensor]], float],
    adapter: CompressedAdapter,
    grid: Sequence[float] = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0),
) -> tuple[float, dict[float, float], CompressedAdapter]:
    """Pick alpha on a validation callback, as the paper does.

    The top-k selection does not depend on alpha, so the adapter is compressed once and only the
    scale changes. ``evaluate`` receives the decoded state dict and returns a score (higher is
    better); the first best alpha of ``grid`` wins.

    Returns:
        (best alpha, score per alpha, the adapter rescaled to the best alpha).
    """
    if not grid:
        raise InvalidArgument("alpha grid is empty")
    scores: dict[float, float] = {}
    best_alpha, best_score, best = None, -math.inf, adapter
    for a in grid:
        candidate = rescale(adapter, float(a))
        score = float(evaluate(candidate.state_dict()))
        scores[float(a)] = score
        if best_alpha is None or score > best_score:
            best_alpha, best_score, best = float(a), score, candidate
    assert best_alpha is not None
    return best_alpha, scores, best
