"""Pruning masks for a linear layer's weight ``[out_features, in_features]``: unstructured by
magnitude, N:M semi-structured, and Wanda's activation-aware score.

Pure functions, tensors in and boolean masks out (True: the weight is kept). They are written here
in torch because no maintained library computes them on a CPU in a form a plain checkpoint keeps:
torchao's 2:4 sparsity runs only on CUDA, and llm-compressor (which has SparseGPT and Wanda) pins
an older transformers. Every mask is computed per output row, as Wanda compares weights (its
"per output" comparison group), and ties are broken by position (the earlier weight is dropped
first), so masks are the same on every machine and thread count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from compeft_format.errors import InvalidArgument


def _matrix(score: torch.Tensor) -> tuple[int, int]:
    if score.dim() != 2:
        raise InvalidArgument(f"a pruning score is a matrix [out_features, in_features], not of shape {tuple(score.shape)}")
    return int(score.shape[0]), int(score.shape[1])


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured mask: in every row the ``floor(sparsity * in_features)`` entries of lowest
    score are dropped.

    Args:
        score: ``[out_features, in_features]``, higher is more important (``|W|`` for magnitude
            pruning, ``wanda_score`` for Wanda).
        sparsity: fraction of each row to drop, in (0, 1).

    Returns:
        A bool tensor of ``score``'s shape, True where the weight is kept.

    Raises:
        InvalidArgument: ``score`` is not a matrix, or ``sparsity`` is out of range.
    """
    rows, cols = _matrix(score)
    if not 0.0 < sparsity < 1.0:
        raise InvalidArgument(f"sparsity must be between 0 and 1 (exclusive), not {sparsity}")
    drop = int(cols * sparsity)
    mask = torch.ones((rows, cols), dtype=torch.bool)
    if drop:
        order = torch.argsort(score, dim=1, stable=True)
        mask.scatter_(1, order[:, :drop], False)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured mask: of every ``m`` consecutive weights of a row (along the input
    dimension, as sparse tensor cores read them), the ``n`` of highest score are kept.

    Returns:
        A bool tensor of ``score``'s shape, True where the weight is kept: exactly ``n`` per group.

    Raises:
        InvalidArgument: ``score`` is not a matrix, ``0 < n < m`` fails, or ``m`` does not divide
        ``in_features``.
    """
    rows, cols = _matrix(score)
    if not 0 < n < m:
        raise InvalidArgument(f"N:M sparsity needs 0 < N < M, not {n}:{m}")
    if cols % m:
        raise InvalidArgument(f"{n}:{m} sparsity needs in_features divisible by {m}; this layer has {cols}")
    groups = score.reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=2, stable=True)
    mask = torch.ones(groups.shape, dtype=torch.bool)
    mask.scatter_(2, order[:, :, : m - n], False)
    return mask.reshape(rows, cols)


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's importance score ``|W_ij| * ||X_j||_2`` (Sun et al., 2023) in float64.

    Args:
        weight: ``[out_features, in_features]``.
        input_norm: ``[in_features]``, the L2 norm of each input feature over every calibration token.

    Raises:
        InvalidArgument: the shapes do not fit.
    """
    _matrix(weight)
    if input_norm.shape != (weight.shape[1],):
        raise InvalidArgument(f"input norms of shape {tuple(input_norm.shape)} do not fit a weight of shape "
                              f"{tuple(weight.shape)}")
    return weight.detach().abs().to(torch.float64) * input_norm.to(torch.float64)[None, :]


def step_mask(kind: str, params: Mapping[str, Any], weight: torch.Tensor,
              input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The mask of one pruning step of a recipe (``recipe.Step``: ``magnitude``, ``nm`` or ``wanda``).

    Raises:
        InvalidArgument: an unknown kind, bad parameters, or Wanda without ``input_norm``.
    """
    if kind == "wanda":
        if input_norm is None:
            raise InvalidArgument("Wanda pruning needs the input norms of calibration activations")
        score = wanda_score(weight, input_norm)
    elif kind in ("magnitude", "nm"):
        score = weight.detach().abs()
    else:
        raise InvalidArgument(f"{kind!r} is not a pruning step")
    if "n" in params:
        return nm_mask(score, int(params["n"]), int(params["m"]))
    return row_mask(score, float(params["sparsity"]))


__all__ = ["row_mask", "nm_mask", "wanda_score", "step_mask"]
