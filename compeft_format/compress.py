"""ComPEFT compression (Yadav et al., 2023; spec section 6): sparsify a task vector by magnitude,
then replace each kept entry by ``sign * scale``.

The task vector is the adapter minus a reference: zero for LoRA, ones for (IA)3, the pretrained
weights for a full fine-tuning residual. With ``scope="global"`` every sparsified tensor joins one
vector (keys in sorted order) for one top-k; ``scope="tensor"`` selects per tensor.

Two methods (spec 6.6), both ``CompeftConfig.method(name)``:

- ``paper``: the published algorithm, exactly: one scale ``alpha * sigma`` for the whole
  adapter (global scope), alpha to be chosen on validation data.
- ``fit`` (the default): the same selection and ternary values, made to keep the weight update
  without data. Each LoRA module's factors are first *balanced*: row i of A and column i of B are
  scaled to equal norms, which leaves ``B A`` unchanged but lets one top-k treat A and B alike
  (without it, global top-k can empty every ``lora_B``). Then, per module, A is ternarised, B is
  refitted to the ternarised A by least squares (``B A A'^T (A' A'^T)^-1``, r x r algebra) and
  ternarised with the count of entries the selection gave it, and the pair's scales give the
  module's update ``B A`` its original Frobenius norm (``scale="norm"``; ``"lsq"`` fits it by
  least squares instead, which shrinks it). Other sparsified tensors keep their norm the same way.
  ``alpha`` multiplies every scale; 1 needs no data.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from torch import nn

from . import constants as C
from ._version import __version__
from .binding import BaseBinding
from .codecs import get_codec
from .compressed import CompressedAdapter, CompressedTensor
from .dtypes import DTYPE_NAMES, TORCH_DTYPES, name_of
from .errors import InvalidArgument, NonFiniteInput, UnsupportedDtype
from .fidelity import Lazy, compare_task_vectors
from .manifest import AdapterInfo, CompressionInfo, ProvenanceInfo, Requirement
from .peft_layout import DEFAULT_DENSE_PATTERNS, config_dict, lora_matrices, lora_pairs, peft_type, sparsifiable
from .recovery import RecoveryConfig
from .recovery import layout as recovery_layout


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


#: scales that fit LoRA factor pairs together (and allow ``refit``)
PAIR_SCALES = (C.SCALE_LSQ, C.SCALE_NORM)
#: the named methods (``CompeftConfig.method``): their options
METHODS: dict[str, dict[str, Any]] = {
    C.METHOD_PAPER: {"balance": C.BALANCE_NONE, "scale": C.SCALE_SIGMA, "refit": False},
    C.METHOD_FIT: {"balance": C.BALANCE_RANK, "scale": C.SCALE_NORM, "refit": True},
}


@dataclass(frozen=True)
class CompeftConfig:
    """The parameters of ComPEFT (spec section 6); checked when made.

    Example:
        >>> cfg = CompeftConfig(density=0.05, alpha=2.0, scope="tensor")
        >>> compress(state_dict, cfg)
    """

    #: fraction of task-vector entries kept, in (0, 1]; exactly ``round(density * N)`` are selected
    density: float = C.DEFAULT_DENSITY
    #: multiplier of every scale (``scale="sigma"``: of sigma, the standard deviation of the dense
    #: task vector; otherwise of the fitted scale, for which 1 is the least-squares fit)
    alpha: float = 1.0
    #: ``"global"`` (one top-k and one scale over all sparsified tensors, the paper's default) or
    #: ``"tensor"`` (per tensor)
    scope: str = C.SCOPE_GLOBAL
    #: ``"ternary"`` (kept entries become ``+/- alpha*sigma``) or ``"prune"`` (kept entries keep
    #: their values; the paper's ablation)
    mode: str = C.MODE_TERNARY
    #: ``"zero"`` (LoRA), ``"ones"`` ((IA)3), ``"base"`` (a full fine-tune: ``compress`` then takes
    #: the pretrained weights as ``base_weights``), or None: from the PEFT type, zero without one
    reference: str | None = None
    #: dtype the tensors decode to (a spec name or torch dtype); None: each tensor's own
    dtype: str | None = None
    #: glob patterns of tensor names stored dense, as they are
    dense_patterns: tuple[str, ...] = DEFAULT_DENSE_PATTERNS
    #: tensors with fewer elements are stored dense
    min_sparse_numel: int = C.DEFAULT_MIN_SPARSE_NUMEL
    #: ``"rank"``: balance each LoRA module's factors per rank component before selection (``B A``
    #: unchanged); ``"none"``: select on the factors as they are (the paper)
    balance: str = C.BALANCE_RANK
    #: ternary scales: ``"sigma"`` (``alpha * sigma``, the paper); ``"mean"`` (per tensor, the mean
    #: kept magnitude: the least-squares scale of each tensor alone); ``"lsq"`` (LoRA pairs: the
    #: least-squares fit of ``B A``; other tensors: ``"mean"``); ``"norm"`` (each LoRA module's
    #: update, and each other tensor, keeps the Frobenius norm of the original)
    scale: str = C.SCALE_NORM
    #: with ``scale="lsq"`` or ``"norm"``: refit each ``lora_B`` to its ternarised ``lora_A``
    #: before ternarising it
    refit: bool = True

    @classmethod
    def method(cls, name: str, **changes: Any) -> CompeftConfig:
        """The config of a named method (``"paper"`` or ``"fit"``), with ``changes`` applied.

        Example:
            >>> CompeftConfig.method("paper", density=0.05, alpha=3.0)
        """
        if name not in METHODS:
            raise InvalidArgument(f"method must be one of {list(METHODS)}, got {name!r}")
        return cls().replace(**{**METHODS[name], **changes})

    @property
    def method_name(self) -> str | None:
        """``"paper"`` or ``"fit"`` when the options are exactly one of them, else None."""
        opts = {"balance": self.balance, "scale": self.scale, "refit": self.refit and self.scale in PAIR_SCALES}
        return next((n for n, o in METHODS.items() if o == opts), None)

    def __post_init__(self) -> None:
        if not (_number(self.density) and 0.0 < float(self.density) <= 1.0):
            raise InvalidArgument(f"density must be in (0, 1], got {self.density!r}")
        if not (_number(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0):
            raise InvalidArgument(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if self.scope not in C.SCOPES:
            raise InvalidArgument(f"scope must be one of {list(C.SCOPES)}, got {self.scope!r}")
        if self.mode not in C.MODES:
            raise InvalidArgument(f"mode must be one of {list(C.MODES)}, got {self.mode!r}")
        if self.reference is not None and self.reference not in C.REFERENCES:
            raise InvalidArgument(f"reference must be one of {list(C.REFERENCES)} (or base weights), "
                                  f"not {self.reference!r}")
        if not (isinstance(self.min_sparse_numel, int) and self.min_sparse_numel >= 0):
            raise InvalidArgument("min_sparse_numel must be an integer >= 0")
        if isinstance(self.dense_patterns, str):
            raise InvalidArgument("dense_patterns must be a sequence of glob patterns, not one string")
        object.__setattr__(self, "dense_patterns", tuple(self.dense_patterns))
        if not all(isinstance(p, str) for p in self.dense_patterns):
            raise InvalidArgument("dense_patterns must be a sequence of glob patterns")
        if self.dtype is not None:
            object.__setattr__(self, "dtype", name_of(self.dtype))
        if self.balance not in C.BALANCES:
            raise InvalidArgument(f"balance must be one of {list(C.BALANCES)}, got {self.balance!r}")
        if self.scale not in C.SCALES:
            raise InvalidArgument(f"scale must be one of {list(C.SCALES)}, got {self.scale!r}")
        if not isinstance(self.refit, bool):
            raise InvalidArgument(f"refit must be True or False, got {self.refit!r}")

    def replace(self, **changes: Any) -> CompeftConfig:
        """This config with some parameters changed; an unknown name is an ``InvalidArgument``."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise InvalidArgument(f"unknown ComPEFT parameter(s) {unknown}; the parameters are {sorted(names)}")
        return replace(self, **changes)


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


#: elements per chunk of the passes over a whole task vector (1 MiB of float32)
CHUNK = 1 << 18
#: elements per chunk of the float64 passes of ``task_std`` (512 KiB)
STD_CHUNK = 1 << 16
_MAGNITUDE_BITS = np.uint32(0x7FFFFFFF)


def _top_count(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry of a histogram, and how many entries lie above it."""
    from_top = np.cumsum(hist[::-1])
    j = int(np.searchsorted(from_top, k))
    return hist.size - 1 - j, int(from_top[j]) - int(hist[hist.size - 1 - j])


def top_k_by_magnitude(values: np.ndarray, k: int) -> np.ndarray:
    """``top_k_indices(np.abs(values), k)`` for a flat finite float32 array, without a copy of it.

    A non-negative binary32 value orders as its bit pattern does, so the k-th largest magnitude is
    found by two histogram passes over the bits (high half, then the low half within the one high
    bin that holds it); a third pass collects the entries above it and the ties, lowest index
    first. Each pass works on chunks of ``CHUNK`` elements.
    """
    n = values.size
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if values.dtype != np.float32 or values.ndim != 1:
        raise InvalidArgument("top_k_by_magnitude takes a flat float32 array")
    spans = [(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]

    def bits(i: int, j: int) -> np.ndarray:
        return values[i:j].view(np.uint32) & _MAGNITUDE_BITS

    high = np.zeros(1 << 15, dtype=np.int64)
    for i, j in spans:
        high += np.bincount(bits(i, j) >> 16, minlength=1 << 15)
    hi, above = _top_count(high, k)
    low = np.zeros(1 << 16, dtype=np.int64)
    for i, j in spans:
        b = bits(i, j)
        low += np.bincount(b[(b >> 16) == hi] & 0xFFFF, minlength=1 << 16)
    lo, above_low = _top_count(low, k - above)
    threshold = np.uint32((hi << 16) | lo)
    need = k - above - above_low
    parts: list[np.ndarray] = []
    for i, j in spans:
        b = bits(i, j)
        parts.append(np.flatnonzero(b > threshold) + i)
        if need > 0:
            tied = np.flatnonzero(b == threshold)[:need] + i
            parts.append(tied)
            need -= tied.size
    out = np.concatenate(parts).astype(np.int64, copy=False)
    out.sort()
    return out


def task_std(values: np.ndarray) -> float:
    """Standard deviation of the dense task vector, unbiased (torch.std's default, as the paper's
    code). One element: its magnitude; none: 0."""
    n = values.size
    if n == 0:
        return 0.0
    if n == 1:
        return float(abs(values[0]))
    step = STD_CHUNK
    if n <= step:
        return float(np.std(values, dtype=np.float64, ddof=1))
    # in chunks, so a large vector needs no float64 copy of itself
    spans = range(0, n, step)
    mean = math.fsum(float(np.sum(values[i:i + step], dtype=np.float64)) for i in spans) / n
    squares = math.fsum(float(np.sum(np.square(values[i:i + step].astype(np.float64) - mean))) for i in spans)
    return math.sqrt(squares / (n - 1))


def _check_dtype(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise UnsupportedDtype(f"tensor {name!r} is a {type(t).__name__}, not a torch tensor", tensor=name)
    if t.device.type == "meta":
        raise InvalidArgument(f"tensor {name!r} is on the meta device and holds no values: load the weights first")
    if t.dtype not in DTYPE_NAMES:
        raise UnsupportedDtype(f"tensor {name!r} has dtype {t.dtype}; only float32, float16 and bfloat16 can be "
                               "compressed", tensor=name)


def _check_finite(name: str, a: np.ndarray, what: str) -> None:
    """Refuse NaN and Inf in ``a``, a chunk at a time (no mask of the whole array)."""
    for i in range(0, a.size, CHUNK):
        if not np.isfinite(a[i:i + CHUNK]).all():
            raise NonFiniteInput(f"tensor {name!r} {what}", tensor=name)


def _to_f32(name: str, t: torch.Tensor, out: np.ndarray) -> np.ndarray:
    """``t`` (checked by ``_check_dtype``) flat in float32, written into ``out``; NaN and Inf refused."""
    torch.from_numpy(out).copy_(t.detach().reshape(-1))
    _check_finite(name, out, "contains NaN or Inf")
    return out


def _as_f32(name: str, t: Any) -> np.ndarray:
    _check_dtype(name, t)
    return _to_f32(name, t, np.empty(t.numel(), dtype=np.float32))


def _task_vector(name: str, t: torch.Tensor, out: np.ndarray, base_weights: Mapping[str, torch.Tensor] | None,
                 offset: float) -> np.ndarray:
    """The task vector of ``t`` written into ``out``: ``t`` minus its base weights, or minus ``offset``
    (x - 0 is x, -0 included: the zero reference leaves it as it is)."""
    _to_f32(name, t, out)
    if base_weights is not None:
        with np.errstate(over="ignore"):
            np.subtract(out, _base_for(name, t, base_weights), out=out)
        _check_finite(name, out, "minus its base weights overflows float32")
    elif offset:
        np.subtract(out, np.float32(offset), out=out)
    return out


def _base_for(name: str, t: torch.Tensor, base: Mapping[str, torch.Tensor]) -> np.ndarray:
    if name not in base:
        raise InvalidArgument(f"base state dict has no tensor {name!r}")
    b = base[name]
    if tuple(b.shape) != tuple(t.shape):
        raise InvalidArgument(f"base tensor {name!r} has shape {tuple(b.shape)}, adapter has {tuple(t.shape)}")
    return _as_f32(name, b)


def _keep_dense(name: str, numel: int, patterns: Sequence[str], min_sparse_numel: int) -> bool:
    return numel < min_sparse_numel or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _from_peft_model(model: nn.Module) -> tuple[dict[str, torch.Tensor], Any]:
    """The active adapter's state dict and config of a ``peft.PeftModel``."""
    configs = getattr(model, "peft_config", None)
    name = getattr(model, "active_adapter", None)
    if not isinstance(configs, Mapping) or not isinstance(name, str) or name not in configs:
        raise InvalidArgument(f"a {type(model).__name__} is not a peft model with one active adapter; pass a state dict")
    from peft import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(model, adapter_name=name)), configs[name]


def _string_map(meta: Mapping[str, str] | None) -> dict[str, str] | None:
    if meta is None:
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InvalidArgument("source_metadata maps strings to strings, as safetensors metadata does")
    return dict(sorted(meta.items()))


def now_utc() -> str:
    """The time a file records as made: now, or ``SOURCE_DATE_EPOCH`` (seconds since 1970, UTC)
    when the environment sets it (reproducible builds), as ``YYYY-MM-DDTHH:MM:SSZ``.

    Raises:
        InvalidArgument: ``SOURCE_DATE_EPOCH`` is not a whole number of seconds >= 0.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None or not epoch.strip():
        when = datetime.now(timezone.utc)
    else:
        try:
            when = datetime.fromtimestamp(int(epoch.strip()), timezone.utc)
            if int(epoch.strip()) < 0:
                raise ValueError
        except (ValueError, OverflowError, OSError):
            raise InvalidArgument(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {epoch!r}") from None
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def compress(
    adapter: Mapping[str, torch.Tensor] | nn.Module,
    config: CompeftConfig | None = None,
    /,
    *,
    peft_config: Mapping[str, Any] | Any | None = None,
    base: BaseBinding | None = None,
    base_weights: Mapping[str, torch.Tensor] | None = None,
    adapter_kind: str | None = None,
    recovery: RecoveryConfig | None = None,
    requires: Sequence[Requirement] = (),
    training: Mapping[str, Any] | None = None,
    source: str | None = None,
    created_at: str | None = None,
    source_metadata: Mapping[str, str] | None = None,
    **parameters: Any,
) -> CompressedAdapter:
    """Compress an adapter's tensors with ComPEFT.

    Args:
        adapter: tensors by name (float32, float16 or bfloat16), or a ``peft.PeftModel`` (its active
            adapter, with its PEFT config).
        config: the method's parameters; keyword arguments change single ones
            (``compress(sd, density=0.05)``); ``method="paper"`` starts from a named method. ``reference=`` may also be given the pretrained state
            dict itself, as ``base_weights``.
        peft_config: the adapter's PEFT config (a mapping or a peft config object), recorded in the
            file. With a known PEFT type only its task-vector factors are sparsified (LoRA and (IA)3
            weights; DoRA magnitudes, ``modules_to_save`` copies and the like stay dense) and the
            reference defaults from the type.
        base: the base model the adapter belongs to (``binding.BaseBinding``), recorded as is.
        base_weights: the pretrained weights, for ``reference="base"``: the file then stores deltas.
        adapter_kind: ``lora``, ``ia3``, ``full``, ``recovery`` or ``other``; by default from the
            PEFT type (``full`` for deltas without one, ``recovery`` with ``recovery``).
        recovery: makes a recovery artifact (spec 3.6): the configuration of its modules
            (``recovery.RecoveryConfig``, e.g. ``RecoveryHandle.config``), whose ``r``, ``alpha``
            and ``activation`` the file records. ``adapter`` is then the modules' factors by the
            names a file gives them (``RecoveryHandle.state_dict()``), checked against it; their
            reference is zero. ``density=1, dense_patterns=("*",)`` keeps them as they are.
        requires: artifacts to apply before this one (``Requirement``; ``requirements.requirement``
            makes one of a file), recorded in the file (spec 3.6).
        training: how the adapter was trained (any JSON object; informative), recorded as
            ``provenance.training``.
        source, created_at: provenance (``created_at`` defaults to now, UTC, or to the time
            ``SOURCE_DATE_EPOCH`` gives in the environment, for files that are the same byte for
            byte from run to run).
        source_metadata: the safetensors ``__metadata__`` of a single-file source (kohya ``ss_*``,
            ``modelspec.*``), recorded as ``provenance.source_metadata`` (format 1.5) so that a
            single-file output gets it back; strings only.

    Returns:
        A ``CompressedAdapter``; ``save`` writes it to a file.

    Raises:
        InvalidArgument: a parameter out of range, or a PEFT type without a known reference and
            no reference given; a recovery artifact whose tensors are not the modules' factors
            (spec 3.6), or with a PEFT config or base weights; ``requires`` that are not
            ``Requirement`` objects, ``training`` that JSON cannot hold.
        UnsupportedDtype: a tensor is not a float tensor.
        NonFiniteInput: a tensor holds NaN or Inf.

    Example:
        >>> ca = compress(peft_state_dict, density=0.1, alpha=1.0, peft_config=cfg)
        >>> save(ca, "adapter.cpeft.safetensors")
    """
    ref = parameters.get("reference")
    if ref is not None and not isinstance(ref, str):
        if not isinstance(ref, Mapping):
            raise InvalidArgument(f"reference must be 'zero', 'ones', 'base' or a base state dict, not {ref!r}")
        base_weights, parameters["reference"] = ref, C.REFERENCE_BASE
    method = parameters.pop("method", None)
    if method is not None:
        if config is not None:
            raise InvalidArgument("give either a config or method=, not both")
        config = CompeftConfig.method(method)
    cfg = (config or CompeftConfig()).replace(**parameters)
    if isinstance(adapter, nn.Module):
        state_dict, model_config = _from_peft_model(adapter)
        peft_config = model_config if peft_config is None else peft_config
    elif isinstance(adapter, Mapping):
        state_dict = dict(adapter)
    else:
        raise InvalidArgument(f"cannot compress a {type(adapter).__name__}; pass a state dict or a peft model")
    cfg_json = None if peft_config is None else config_dict(peft_config)
    ptype = peft_type(cfg_json)

    reference = cfg.reference
    if reference is None:
        if base_weights is not None:
            reference = C.REFERENCE_BASE
        elif ptype is not None:
            reference = ptype.reference
        elif cfg_json is not None:
            raise InvalidArgument(f"peft_type {cfg_json.get('peft_type')!r} has no default reference; pass "
                                  "--reference (CLI) or reference= (Python)")
        else:
            reference = C.REFERENCE_ZERO
    if (reference == C.REFERENCE_BASE) != (base_weights is not None):
        raise InvalidArgument("reference 'base' needs the pretrained weights (base_weights=), and they need it")
    patterns = cfg.dense_patterns
    if ptype is not None:  # a known PEFT type: only its factors are task vectors
        patterns += tuple(glob.escape(n) for n in sorted(state_dict) if not sparsifiable(n))
    if adapter_kind is None:
        adapter_kind = (C.ADAPTER_KIND_RECOVERY if recovery is not None else ptype.kind if ptype
                        else ("full" if base_weights is not None else C.ADAPTER_KIND_OTHER))
    recovery = _recovery_config(recovery, adapter_kind, state_dict, cfg_json, base_weights)
    requirements = list(requires)
    if not all(isinstance(r, Requirement) for r in requirements):
        raise InvalidArgument("requires must be a sequence of Requirement objects "
                              "(compeft_format.requirements.requirement(path) makes one of a file)")
    training_json = None if training is None else config_dict(training)

    target = cfg.dtype
    names = sorted(state_dict)
    dense: dict[str, CompressedTensor] = {}
    sparse_names: list[str] = []
    offsets: dict[str, float] = {}
    for name in names:
        t = state_dict[name]
        _check_dtype(name, t)
        tdtype = target or name_of(t.dtype)
        shape = tuple(int(d) for d in t.shape)
        if _keep_dense(name, t.numel(), patterns, cfg.min_sparse_numel):
            src = t.detach().to("cpu")
            if base_weights is not None:
                src = torch.from_numpy(_task_vector(name, t, np.empty(t.numel(), np.float32), base_weights, 0.0))
            elif not bool(torch.isfinite(src).all()):
                raise NonFiniteInput(f"tensor {name!r} contains NaN or Inf", tensor=name)
            dense[name] = CompressedTensor.dense(name, shape, tdtype, _finite_cast(name, src.reshape(-1), tdtype).clone())
            continue
        offsets[name] = 1.0 if reference == C.REFERENCE_ONES and base_weights is None else 0.0
        sparse_names.append(name)

    # Every task vector is a view into one float32 buffer, in name order: one top-k runs over it
    # with no further copy of the adapter (the peak is about this buffer and the input).
    shapes = {n: tuple(int(d) for d in state_dict[n].shape) for n in sparse_names}
    bounds = np.cumsum([0] + [math.prod(shapes[n]) for n in sparse_names])
    buffer = np.empty(int(bounds[-1]), dtype=np.float32)
    taus = {n: buffer[bounds[i]:bounds[i + 1]] for i, n in enumerate(sparse_names)}
    for n in sparse_names:
        _task_vector(n, state_dict[n], taus[n], base_weights, offsets[n])

    def original(n: str) -> np.ndarray:
        """The task vector of ``n`` as given (``taus`` holds it balanced)."""
        return _task_vector(n, state_dict[n], np.empty(taus[n].size, np.float32), base_weights, offsets[n])

    pairs = [(a, b, *m) for _, a, b in lora_pairs(sparse_names) if (m := lora_matrices(shapes[a], shapes[b]))]
    if cfg.balance == C.BALANCE_RANK:
        for a, b, sa, sb in pairs:
            taus[a][:], taus[b][:] = _balance(taus[a].reshape(sa), taus[b].reshape(sb))

    # selection: the kept indices of each candidate, and the sigma the paper's scale comes from
    keep: dict[str, np.ndarray] = {}
    sigma: dict[str, float] = {}
    sigma_global: float | None = None
    candidates = buffer.size
    if cfg.scope == C.SCOPE_GLOBAL and sparse_names:
        sigma_global = task_std(buffer)
        chosen = top_k_by_magnitude(buffer, kept_count(cfg.density, buffer.size))
        split = np.searchsorted(chosen, bounds)
        for i, n in enumerate(sparse_names):
            keep[n], sigma[n] = chosen[split[i]:split[i + 1]] - bounds[i], sigma_global
        del chosen
    else:
        for n in sparse_names:
            keep[n] = top_k_by_magnitude(taus[n], kept_count(cfg.density, taus[n].size))
            sigma[n] = task_std(taus[n])
    # An entry whose task value is exactly zero has sign 0 in the paper's formula: it is not stored.
    for n in sparse_names:
        keep[n] = keep[n][taus[n][keep[n]] != 0]

    sparse: dict[str, CompressedTensor] = {}
    options: dict[str, Any] | None = None
    if cfg.mode == C.MODE_TERNARY:
        signs = {n: taus[n][keep[n]] < 0 for n in sparse_names}
        if cfg.scale == C.SCALE_SIGMA:
            units = dict(sigma)
        elif cfg.scale == C.SCALE_NORM:
            units = {n: _norm_scale(taus[n], keep[n].size) for n in sparse_names}
        else:
            units = {n: _mean_magnitude(taus[n][keep[n]]) for n in sparse_names}
        if cfg.scale in PAIR_SCALES:
            for a, b, sa, sb in pairs:
                keep[b], signs[b], units[a], units[b] = _fit_pair(
                    taus[a].reshape(sa), taus[b].reshape(sb), keep[a], keep[b], cfg.refit, cfg.scale)
        for n in sparse_names:
            sparse[n] = _ternary(n, state_dict[n], keep[n], signs[n], units[n], cfg, offsets[n],
                                 exact_sigma=cfg.scale == C.SCALE_SIGMA)
        if cfg.method_name != "paper":
            options = {"balance": cfg.balance, "scale": cfg.scale, "refit": cfg.refit and cfg.scale in PAIR_SCALES}
    else:
        for n in sparse_names:
            tdtype = cfg.dtype or name_of(state_dict[n].dtype)
            kept = _finite_cast(n, torch.from_numpy(taus[n][keep[n]].copy()), tdtype)
            sparse[n] = CompressedTensor.sparse(n, shapes[n], tdtype, keep[n], kept, offsets[n])
        if cfg.balance != C.BALANCE_NONE:
            options = {"balance": cfg.balance}
    if not sparse_names:  # every tensor kept as it is: nothing was refined or lost
        options = None
    fidelity = None
    if options is not None:  # what the decoded tensors (in their target dtypes) give, a module at a time
        approx = Lazy(sparse_names, lambda n: sparse[n].to_dense().float().numpy() - np.float32(offsets[n]))
        fidelity = compare_task_vectors(Lazy(sparse_names, original), approx, shapes, cfg_json).summary()

    tensors = {n: (sparse.get(n) or dense[n]) for n in names}
    return CompressedAdapter(
        tensors=tensors,
        adapter=AdapterInfo(
            kind=adapter_kind if adapter_kind in C.ADAPTER_KINDS else C.ADAPTER_KIND_OTHER,
            representation=C.REPRESENTATION_DELTA if base_weights is not None else C.REPRESENTATION_WEIGHTS,
            peft_config=cfg_json,
            recovery=recovery,
        ),
        base_model=base or BaseBinding(),
        compression=CompressionInfo(
            method=C.METHOD_COMPEFT,
            density=float(cfg.density),
            alpha=float(cfg.alpha),
            scope=cfg.scope,
            mode=cfg.mode,
            reference=reference,
            sigma=sigma_global,
            candidates=int(candidates),
            kept=int(sum(t.nnz for t in sparse.values())),
            options=options,
            fidelity=fidelity,
        ),
        provenance=ProvenanceInfo(
            tool=f"compeft {__version__}",
            created_at=created_at or now_utc(),
            source=source,
            training=training_json,
            source_metadata=_string_map(source_metadata),
        ),
        requires=requirements,
    )


def _recovery_config(recovery: RecoveryConfig | None, kind: str, state_dict: Mapping[str, torch.Tensor],
                     peft_config: Mapping[str, Any] | None,
                     base_weights: Mapping[str, torch.Tensor] | None) -> RecoveryConfig | None:
    """The ``adapter.recovery`` of a recovery artifact, its ``target_modules`` the modules its
    tensors name; None for other artifacts."""
    if recovery is None:
        if kind == C.ADAPTER_KIND_RECOVERY:
            raise InvalidArgument("a recovery artifact needs its configuration: pass recovery=RecoveryConfig(...)")
        return None
    if not isinstance(recovery, RecoveryConfig):
        raise InvalidArgument(f"recovery must be a RecoveryConfig, not a {type(recovery).__name__}")
    if kind != C.ADAPTER_KIND_RECOVERY:
        raise InvalidArgument(f"recovery= makes a recovery artifact, not one of kind {kind!r}")
    if peft_config is not None or base_weights is not None:
        raise InvalidArgument("a recovery artifact has no PEFT config and no base weights to subtract")
    modules = recovery_layout(((n, tuple(t.shape)) for n, t in sorted(state_dict.items())), recovery.r,
                              error=InvalidArgument)
    if recovery.target_modules and set(recovery.target_modules) != set(modules):
        raise InvalidArgument(f"the recovery config targets {len(recovery.target_modules)} module(s), the tensors "
                              f"are for {len(modules)}: they must be the same")
    return replace(recovery, target_modules=tuple(modules))


def _balance(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row i of ``a`` (r x n) times c_i and column i of ``b`` (m x r) divided by c_i, with c_i
    chosen so both have the same root-mean-square entry: ``b @ a`` is unchanged, and one top-k
    over both factors keeps entries of each in proportion to its size. Flat float32."""
    na = np.linalg.norm(a.astype(np.float64), axis=1) / math.sqrt(max(a.shape[1], 1))
    nb = np.linalg.norm(b.astype(np.float64), axis=0) / math.sqrt(max(b.shape[0], 1))
    c = np.ones_like(na)
    ok = (na > 0) & (nb > 0)
    c[ok] = np.sqrt(nb[ok] / na[ok])
    return ((a * c[:, None]).astype(np.float32).reshape(-1),
            (b / c[None, :]).astype(np.float32).reshape(-1))


def _mean_magnitude(kept: np.ndarray) -> float:
    """The least-squares scale of ternary values with these signs and support: the mean magnitude."""
    return float(np.mean(np.abs(kept), dtype=np.float64)) if kept.size else 0.0


def _norm_scale(tau: np.ndarray, kept: int) -> float:
    """The scale at which ``kept`` ternary entries have the Frobenius norm of ``tau``."""
    return float(np.linalg.norm(tau.astype(np.float64)) / math.sqrt(kept)) if kept else 0.0


def _fit_pair(a: np.ndarray, b: np.ndarray, keep_a: np.ndarray, keep_b: np.ndarray,
              refit: bool, rule: str) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Ternary factors of one LoRA module for ``b @ a`` (a: r x n, b: m x r): A keeps its
    selection with the least-squares scale; B (refitted to the ternarised A when ``refit``) keeps
    as many entries as its selection had; B's scale makes the product the least-squares fit
    (``rule="lsq"``) or gives it the norm of ``b @ a`` (``"norm"``).
    Returns B's kept indices and signs, A's and B's scales before alpha."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    flat_a = np.zeros(a.size)
    flat_a[keep_a] = np.sign(a64.reshape(-1)[keep_a])
    ta = flat_a.reshape(a.shape)
    scale_a = _mean_magnitude(a.reshape(-1)[keep_a])
    source = b64
    if refit and keep_a.size and keep_b.size:
        a_hat = scale_a * ta
        source = b64 @ (a64 @ a_hat.T) @ np.linalg.pinv(a_hat @ a_hat.T)
        keep_b = top_k_indices(np.abs(source).reshape(-1), keep_b.size)
        keep_b = keep_b[source.reshape(-1)[keep_b] != 0]
    values_b = source.reshape(-1)[keep_b]
    flat_b = np.zeros(b.size)
    flat_b[keep_b] = np.sign(values_b)
    tb = flat_b.reshape(b.shape)
    num = float(np.sum((b64.T @ tb) * (a64 @ ta.T)))
    den = float(np.sum((tb.T @ tb) * (ta @ ta.T)))
    if num > 0 and den > 0 and scale_a > 0:
        if rule == C.SCALE_NORM:
            scale_b = math.sqrt(float(np.sum((b64.T @ b64) * (a64 @ a64.T))) / den) / scale_a
        else:
            scale_b = num / den / scale_a
    else:  # nothing of the product survives: each factor keeps its own least-squares scale
        scale_b = _mean_magnitude(values_b)
    return keep_b, values_b < 0, scale_a, scale_b


def _ternary(name: str, t: torch.Tensor, keep: np.ndarray, negative: np.ndarray, unit: float,
             cfg: CompeftConfig, offset: float, *, exact_sigma: bool) -> CompressedTensor:
    tdtype = cfg.dtype or name_of(t.dtype)
    shape = tuple(int(d) for d in t.shape)
    with np.errstate(over="ignore"):
        scale = np.float32(cfg.alpha * unit)
    if not np.isfinite(scale):
        raise InvalidArgument(f"alpha * {'sigma' if exact_sigma else 'scale'} = {cfg.alpha * unit:g} overflows "
                              f"binary32 for tensor {name!r}")
    return CompressedTensor.ternary(name, shape, tdtype, keep, negative, float(scale), offset, sigma=unit)


def _finite_cast(name: str, values: torch.Tensor, dtype: str) -> torch.Tensor:
    """``values`` in ``dtype``, refusing values that overflow it (files never hold infinities)."""
    out = values.to(TORCH_DTYPES[dtype])
    if not bool(torch.isfinite(out).all()):
        raise InvalidArgument(f"tensor {name!r} has values beyond the range of {dtype}; choose a wider dtype")
    return out


def rescale(adapter: CompressedAdapter, alpha: float) -> CompressedAdapter:
    """The same selection with another alpha: every ternary scale becomes alpha times its scale at
    alpha 1 (``alpha * sigma`` for the paper's method)."""
    old = adapter.compression.alpha
    if not old or adapter.compression.mode != C.MODE_TERNARY:
        raise InvalidArgument("rescale needs a ternary ComPEFT adapter with a recorded alpha")
    if not (_number(alpha) and math.isfinite(alpha) and alpha > 0):
        raise InvalidArgument(f"alpha must be a finite number > 0, got {alpha!r}")
    tensors = {}
    for n, t in adapter.tensors.items():
        if get_codec(t.encoding).member_scale:
            assert t.scale is not None
            unit = t.sigma if t.sigma is not None else t.scale / old
            with np.errstate(over="ignore"):
                scale = np.float32(unit * alpha)
            if not np.isfinite(scale):
                raise InvalidArgument(f"alpha {alpha:g} times sigma overflows binary32 for tensor {n!r}")
            t = replace(t, scale=float(scale))
        tensors[n] = t
    # the fidelity measured at the old scales no longer holds
    return replace(adapter, tensors=tensors, compression=replace(adapter.compression, alpha=float(alpha), fidelity=None))


def search_alpha(loss_of: Callable[[float], float], grid: Sequence[float], start: float = 1.0,
                 exhaustive: bool = False) -> tuple[float, dict[float, float]]:
    """The alpha of ``grid`` with the lowest ``loss_of(alpha)``, and every loss measured.

    The loss of a scale is close to convex in log(alpha), so by default the search starts at the
    grid point nearest ``start`` and walks downhill to a local minimum, measuring 3-4 points
    where the whole grid has 7-8. ``exhaustive`` measures every point. A non-finite loss counts
    as infinite; ties go to the alpha nearest 1.
    """
    pts = sorted({float(a) for a in grid})
    if not pts:
        raise InvalidArgument("the alpha grid is empty")
    losses: dict[float, float] = {}

    def loss(i: int) -> float:
        if pts[i] not in losses:
            v = float(loss_of(pts[i]))
            losses[pts[i]] = v if math.isfinite(v) else math.inf
        return losses[pts[i]]

    def key(a: float) -> tuple[float, float]:
        return losses[a], abs(math.log(a))

    if exhaustive:
        for i in range(len(pts)):
            loss(i)
    else:
        i = min(range(len(pts)), key=lambda j: abs(math.log(pts[j] / start)))
        while True:
            loss(i)
            best = min((j for j in (i - 1, i, i + 1) if 0 <= j < len(pts)), key=lambda j: (loss(j), j != i))
            if best == i:
                break
            i = best
    return min(losses, key=key), losses


def alpha_search(
    evaluate: Callable[[dict[str, torch.Tensor]], float],
    adapter: CompressedAdapter,
    grid: Sequence[float] = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0),
    *,
    exhaustive: bool = False,
) -> tuple[float, dict[float, float], CompressedAdapter]:
    """Pick alpha on a validation callback, as the paper does.

    The top-k selection does not depend on alpha, so the adapter is compressed once and only the
    scale changes. ``evaluate`` receives the decoded state dict and returns a score (higher is
    better). The grid is walked downhill from alpha 1 (``search_alpha``), or measured whole with
    ``exhaustive``.

    Returns:
        (best alpha, score per alpha measured, the adapter rescaled to the best alpha).
    """
    best, losses = search_alpha(lambda a: -float(evaluate(rescale(adapter, a).state_dict())), grid,
                                exhaustive=exhaustive)
    return best, {a: -v for a, v in losses.items()}, rescale(adapter, best)


__all__ = ["CompeftConfig", "compress", "rescale", "alpha_search", "search_alpha", "kept_count", "top_k_indices", "task_std"]
