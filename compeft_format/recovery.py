"""Recovery modules (spec 3.6): the knowledge recovery of CA-LoRA, a non-linear low-rank bypass
beside linear layers of a compressed base model,

    y = W x + GELU(x A1^T) A2^T * (alpha / r)

with ``A1`` ``[r, in_features]`` initialised Kaiming-uniform and ``A2`` ``[out_features, r]`` zero,
so that a new module changes nothing until it is trained.

``add_recovery`` gives a transformers model (or a ``peft.PeftModel``, before or after LoRA was
added) its recovery modules: they become the plain base model's submodule ``cpet_recovery``, so
``parameters()``, ``.to()``, DDP and optimisers see them, and a forward hook on each target layer
adds the bypass to the layer's output. The hook sits on the innermost linear layer (a LoRA
layer's ``base_layer``), so peft adds, trains, merges and unloads LoRA around it as before.
``get_recovery(model).remove()`` takes the modules out again and leaves the model as it was.

Recovery modules are not base weights: fingerprints (``binding``) and
``peft_layout.base_state_dict`` leave them out. A file names each module as the plain base model
names it (``model.layers.0.self_attn.q_proj.recovery_A1.weight``); ``RecoveryHandle.state_dict``
and ``load_state_dict`` speak those names.

Example:
    >>> handle = add_recovery(model, RecoveryConfig(r=16, alpha=16.0, target_modules=("q_proj", "v_proj")))
    >>> ...                                    # train: handle.modules.parameters() are trainable
    >>> sd = handle.state_dict()               # {"model.layers.0.self_attn.q_proj.recovery_A1.weight": ...}
    >>> get_recovery(model).remove()           # the model as it was
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from . import constants as C
from .errors import CompeftError, ConfigMismatch, InvalidArgument, ManifestError, ModelMismatch
from .peft_layout import PEFT_PREFIX, base_model_of, base_modules

#: The plain base model's submodule that holds its recovery modules.
SUBMODULE = "cpet_recovery"
#: How a module name becomes a key of ``RecoveryModules`` (an ``nn.ModuleDict``, whose keys cannot
#: hold a dot): each ``.`` becomes this.
KEY_SEPARATOR = "__"
_BASE_LAYER = ".base_layer"


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class RecoveryConfig:
    """How recovery modules are made. A file's ``adapter.recovery`` holds ``r``, ``alpha`` and
    ``activation`` (spec 3.6); its tensors name the modules.

    Raises:
        InvalidArgument: ``r`` not an integer >= 1, ``alpha`` not a finite number, ``activation``
            not a string, ``target_modules`` not a sequence of names.
    """

    #: rank of each bypass
    r: int = 16
    #: the bypass is scaled by ``alpha / r``
    alpha: float = 16.0
    #: the bypass's activation: ``"gelu"`` (the erf form, spec 3.6); a file may name another,
    #: which this library does not apply
    activation: str = C.ACTIVATION_GELU
    #: linear layers by their names in the plain base model (``model.layers.0.self_attn.q_proj``;
    #: peft's ``base_model.model.`` prefix and ``.base_layer`` suffix are taken off);
    #: ``add_recovery`` also takes a name's last components (``q_proj``: every layer so named)
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise InvalidArgument(f"r must be an integer >= 1, got {self.r!r}")
        if not (_number(self.alpha) and math.isfinite(self.alpha)):
            raise InvalidArgument(f"alpha must be a finite number, got {self.alpha!r}")
        if not isinstance(self.activation, str):
            raise InvalidArgument(f"activation must be a string, got {self.activation!r}")
        if isinstance(self.target_modules, str) or not all(isinstance(t, str) for t in self.target_modules):
            raise InvalidArgument("target_modules must be a sequence of module names, not one string")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        """``alpha / r``, the factor of every bypass."""
        return self.alpha / self.r

    def to_json(self) -> dict[str, Any]:
        """``adapter.recovery`` (spec 3.6); the modules are the file's tensors."""
        return {"r": self.r, "alpha": self.alpha, "activation": self.activation}


# --- the file's tensors ---------------------------------------------------------------------------
def tensor_names(module: str) -> tuple[str, str]:
    """The names a file gives the two factors of the recovery module of ``module`` (spec 3.6)."""
    return (f"{module}.{C.RECOVERY_A1}{C.RECOVERY_TENSOR_SUFFIX}",
            f"{module}.{C.RECOVERY_A2}{C.RECOVERY_TENSOR_SUFFIX}")


_FACTOR_SUFFIXES = {f".{role}{C.RECOVERY_TENSOR_SUFFIX}": role for role in (C.RECOVERY_A1, C.RECOVERY_A2)}


def layout(tensors: Iterable[tuple[str, Sequence[int]]], r: int, *,
           error: type[CompeftError] = ManifestError) -> dict[str, tuple[int, int]]:
    """The modules a recovery artifact's tensors describe (spec 3.6), each with its
    ``(in_features, out_features)``, in name order.

    Args:
        tensors: ``(name, shape)`` of every tensor, in manifest order.
        r: the rank of ``adapter.recovery``.
        error: the error to raise (``ManifestError`` for a file, other kinds for other callers).

    Raises:
        ``error``: a name that is not ``<module>.recovery_A1.weight`` or
        ``<module>.recovery_A2.weight``, a tensor that is not 2-dimensional, an ``A1`` whose first
        or an ``A2`` whose second dimension is not ``r``, a dimension of 0, or a module with one
        factor only.
    """
    factors: dict[str, dict[str, tuple[int, int]]] = {}
    for name, shape in tensors:
        suffix = next((s for s in _FACTOR_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)
        if suffix is None:
            raise error(f"tensor {name!r} of a recovery artifact is not <module>.{C.RECOVERY_A1}.weight or "
                        f"<module>.{C.RECOVERY_A2}.weight")
        role = _FACTOR_SUFFIXES[suffix]
        if len(shape) != 2:
            raise error(f"recovery tensor {name!r} has shape {list(shape)}, not two dimensions")
        rank = shape[0] if role == C.RECOVERY_A1 else shape[1]
        if rank != r:
            raise error(f"recovery tensor {name!r} has shape {list(shape)}: rank {rank}, adapter.recovery.r is {r}")
        if min(shape) < 1:
            raise error(f"recovery tensor {name!r} has an empty dimension: {list(shape)}")
        factors.setdefault(name[: -len(suffix)], {})[role] = (int(shape[0]), int(shape[1]))
    out: dict[str, tuple[int, int]] = {}
    for module in sorted(factors):
        parts = factors[module]
        if len(parts) != 2:
            raise error(f"recovery module {module!r} has only its {next(iter(parts))}")
        out[module] = (parts[C.RECOVERY_A1][1], parts[C.RECOVERY_A2][0])
    return out


# --- the modules ----------------------------------------------------------------------------------
class RecoveryModule(nn.Module):
    """One bypass: ``forward(x) = GELU(x A1^T) A2^T * (alpha / r)`` (GELU in its erf form),
    computed in the parameters' dtype and returned in ``x``'s."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r, self.alpha = in_features, out_features, r, float(alpha)
        self.scaling = self.alpha / r
        self.A1 = nn.Parameter(torch.zeros(r, in_features, dtype=dtype, device=device))
        self.A2 = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``A1`` Kaiming-uniform (as ``nn.Linear`` and peft's ``lora_A``: uniform within
        ``1/sqrt(in_features)``), drawn in float32 on the CPU from ``generator`` (torch's default
        generator when None), so that a seed gives the same values on every device; ``A2`` zero."""
        a1 = torch.empty(self.A1.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a1, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.A1.copy_(a1)
            self.A2.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(x.to(self.A1.dtype), self.A1))
        return (F.linear(h, self.A2) * self.scaling).to(x.dtype)

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """The forward hook on the target layer: its output plus the bypass of its input."""
        return output + self(args[0]).to(output.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}"


class RecoveryModules(nn.ModuleDict):
    """The recovery modules of one model, keyed by module name (``.`` written ``__``); the plain
    base model holds it as its submodule ``cpet_recovery``. Marked ``ADDED_MODULE``: none of it
    is the base model's."""

    compeft_added_module = True  # peft_layout.ADDED_MODULE

    def __init__(self, config: RecoveryConfig) -> None:
        super().__init__()
        self._config = config
        self._names: dict[str, str] = {}  # key -> module name
        # The hooks on the layers (the model's, not submodules of this); a deep copy of the model
        # copies them together with the layers' hook tables they point into.
        self._hooks: list[RemovableHandle] = []
        #: ``compeft.manifest_sha256`` of the file the modules were loaded from, if any
        self.source: str | None = None


class RecoveryHandle:
    """The recovery modules of a model: ``modules`` is the ``nn.ModuleDict`` the plain base model
    holds as ``cpet_recovery``; ``config`` says how they were made, its ``target_modules`` the
    full names of the layers they sit beside."""

    def __init__(self, modules: RecoveryModules, owner: nn.Module) -> None:
        self.modules = modules
        self._owner = owner

    @property
    def config(self) -> RecoveryConfig:
        return self.modules._config

    @property
    def source(self) -> str | None:
        """``compeft.manifest_sha256`` of the file the modules were loaded from (``load_adapter``),
        None for modules made by ``add_recovery``."""
        return self.modules.source

    def module(self, name: str) -> RecoveryModule:
        """The recovery module beside the layer ``name`` (a name of ``config.target_modules``).

        Raises:
            InvalidArgument: there is none beside that layer.
        """
        m = self.modules[_key(name)] if _key(name) in self.modules else None
        if not isinstance(m, RecoveryModule):
            raise InvalidArgument(f"no recovery module beside {name!r}")
        return m

    def _items(self) -> list[tuple[str, RecoveryModule]]:
        return sorted((name, self.modules[key]) for key, name in self.modules._names.items())  # type: ignore[misc]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The modules' factors under the names a file gives them (spec 3.6), detached, in module
        name order."""
        out: dict[str, torch.Tensor] = {}
        for name, m in self._items():
            a1, a2 = tensor_names(name)
            out[a1], out[a2] = m.A1.detach(), m.A2.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy factors named as ``state_dict`` names them into the modules (converted to their
        dtype and device). Everything is checked before anything is copied.

        Raises:
            ConfigMismatch: a name that is not a recovery factor's, a factor whose rank is not
                ``config.r``, a module with one factor, or a module of this handle without tensors.
            ModelMismatch: tensors for a layer this handle has no module beside, or whose sizes
                are not the layer's.
        """
        shapes = layout(((k, tuple(v.shape)) for k, v in state_dict.items()), self.config.r, error=ConfigMismatch)
        names = dict(self._items())
        unknown = sorted(set(shapes) - set(names))
        if unknown:
            raise ModelMismatch(f"no recovery module beside {len(unknown)} layer(s) the tensors are for, e.g. "
                                f"{unknown[0]}", modules=unknown)
        missing = sorted(set(names) - set(shapes))
        if missing:
            raise ConfigMismatch(f"no tensors for {len(missing)} recovery module(s), e.g. {missing[0]}")
        wrong = sorted(n for n, (i, o) in shapes.items() if (names[n].in_features, names[n].out_features) != (i, o))
        if wrong:
            m = names[wrong[0]]
            raise ModelMismatch(f"{wrong[0]}: recovery tensors for {shapes[wrong[0]][0]} inputs and "
                                f"{shapes[wrong[0]][1]} outputs, the layer has {m.in_features} and {m.out_features}",
                                modules=wrong)
        with torch.no_grad():
            for name, m in names.items():
                a1, a2 = tensor_names(name)
                m.A1.copy_(state_dict[a1])
                m.A2.copy_(state_dict[a2])

    def remove(self) -> None:
        """Take the hooks and the ``cpet_recovery`` submodule out of the model: it is as it was
        before ``add_recovery``, bit for bit. Removing twice does nothing."""
        for h in self.modules._hooks:
            h.remove()
        self.modules._hooks = []
        if self._owner._modules.get(SUBMODULE) is self.modules:
            delattr(self._owner, SUBMODULE)


def _key(name: str) -> str:
    return name.replace(".", KEY_SEPARATOR)


def plain_name(name: str) -> str:
    """A module name as the plain base model names it: without peft's ``base_model.model.``
    prefix and ``.base_layer`` suffix."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    while name.endswith(_BASE_LAYER):
        name = name[: -len(_BASE_LAYER)]
    return name


def _linear_dims(layer: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a layer that declares them (``nn.Linear`` and the
    quantised linear layers peft supports)."""
    in_f, out_f = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (in_f, out_f))
    return (in_f, out_f) if ok else None  # type: ignore[return-value]


def resolve_targets(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """The layers ``names`` name in ``model``'s plain base model, by full name in name order: a
    full name, or a name's last components (every layer whose name ends with them).

    Raises:
        ModelMismatch: a name that names no module, or a module that is not a linear layer.
    """
    modules = base_modules(model)
    found: dict[str, nn.Module] = {}
    missing: list[str] = []
    for given in names:
        name = plain_name(given)
        hits = [name] if name in modules else [n for n in modules if n.endswith("." + name)]
        if not hits:
            missing.append(given)
        for n in hits:
            found[n] = modules[n]
    if missing:
        everything = {plain_name(n) for n, _ in base_model_of(model).named_modules()}
        added = [m for m in missing if plain_name(m) in everything]
        raise ModelMismatch((f"{added[0]} is a layer an adapter added (a LoRA factor, say), not one of the base "
                             "model's" if added else f"the model has no module {missing[0]!r}")
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), modules=missing)
    not_linear = sorted(n for n, m in found.items() if _linear_dims(m) is None)
    if not_linear:
        raise ModelMismatch(f"{not_linear[0]} is a {type(found[not_linear[0]]).__name__}, not a linear layer "
                            "(a layer with in_features and out_features)", modules=not_linear)
    return dict(sorted(found.items()))


def _placement(layer: nn.Module, dtype: torch.dtype | None) -> tuple[torch.dtype, torch.device]:
    """The dtype (``dtype``, else the layer's floating weight's, else float32) and device of the
    recovery module beside ``layer``."""
    weight = getattr(layer, "weight", None)
    tensors = [weight] if isinstance(weight, torch.Tensor) else list(layer.parameters())
    device = tensors[0].device if tensors else torch.device("cpu")
    if dtype is None:
        dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
    return dtype, device


def add_recovery(model: nn.Module, config: RecoveryConfig, *, init: bool = True, seed: int | None = None,
                 dtype: torch.dtype | None = None) -> RecoveryHandle:
    """Give ``model`` recovery modules beside the linear layers ``config.target_modules`` names.

    Args:
        model: a transformers model, or a ``peft.PeftModel`` (its base model gets them).
        config: rank, alpha, activation and target layers.
        init: initialise ``A1`` Kaiming-uniform and ``A2`` zero (the bypass starts as an exact
            no-op); without, both are zero, to be loaded (``RecoveryHandle.load_state_dict``).
        seed: seed of the initialisation (torch's default generator when None); modules are
            initialised in layer-name order.
        dtype: dtype of the parameters (default: each layer's floating weight's; float32 for a
            quantised layer). They sit on the layer's device.

    Returns:
        The handle; ``handle.config.target_modules`` holds the layers' full names. The parameters
        are trainable. peft's ``get_peft_model`` freezes every parameter that is not its own: give
        recovery modules to the ``PeftModel`` it returns, or ``handle.modules.requires_grad_()``
        after it.

    Raises:
        InvalidArgument: the model holds recovery modules already, no layer is named, the
            activation is not ``gelu``, or two layer names give one key.
        ModelMismatch: a name names no module, or a module that is not a linear layer.
    """
    if config.activation not in C.RECOVERY_ACTIVATIONS:
        raise InvalidArgument(f"recovery activation {config.activation!r} is not one of {list(C.RECOVERY_ACTIVATIONS)}")
    if get_recovery(model) is not None:
        raise InvalidArgument(f"the model holds recovery modules already ({SUBMODULE}); remove them first "
                              "(get_recovery(model).remove())")
    if not config.target_modules:
        raise InvalidArgument("no target_modules: name the linear layers to give recovery modules")
    owner = base_model_of(model)
    targets = resolve_targets(owner, config.target_modules)
    keys = {_key(n) for n in targets}
    if len(keys) != len(targets):
        raise InvalidArgument(f"two target module names give the same key once '.' is written {KEY_SEPARATOR!r}")
    if hasattr(owner, SUBMODULE):
        raise InvalidArgument(f"the model has an attribute {SUBMODULE!r} already")
    container = RecoveryModules(replace(config, target_modules=tuple(targets)))
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    placed: list[tuple[nn.Module, RecoveryModule]] = []
    for name, layer in targets.items():
        in_f, out_f = _linear_dims(layer)  # type: ignore[misc]
        p_dtype, device = _placement(layer, dtype)
        m = RecoveryModule(in_f, out_f, config.r, config.alpha, dtype=p_dtype, device=device)
        if init:
            m.reset_parameters(generator)
        container[_key(name)] = m
        container._names[_key(name)] = name
        placed.append((layer, m))
    owner.add_module(SUBMODULE, container)
    container._hooks = [layer.register_forward_hook(m.hook) for layer, m in placed]
    return RecoveryHandle(container, owner)


def get_recovery(model: nn.Module) -> RecoveryHandle | None:
    """The recovery modules of ``model``.

    Args:
        model: a transformers model or a ``peft.PeftModel``.

    Returns:
        Their handle (``remove()`` takes them out), or None when the model holds none.
    """
    owner = base_model_of(model)
    modules = owner._modules.get(SUBMODULE) if isinstance(owner, nn.Module) else None
    return RecoveryHandle(modules, owner) if isinstance(modules, RecoveryModules) else None


__all__ = ["RecoveryConfig", "RecoveryModule", "RecoveryModules", "RecoveryHandle", "add_recovery", "get_recovery",
           "tensor_names", "layout", "resolve_targets", "plain_name", "SUBMODULE", "KEY_SEPARATOR"]
