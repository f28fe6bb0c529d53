"""What the tensors of a PEFT adapter are: each state-dict key mapped to the module it belongs to
and its role there (LoRA factors, DoRA magnitudes, (IA)3 vectors, modules_to_save copies, biases,
trainable tokens, ...), the PEFT types this library knows, and the PEFT config as plain JSON.

Compression asks it which tensors are task-vector factors (sparsified) and which are full weights
(kept dense); ``apply`` asks it where each tensor goes; ``binding`` asks it which tensors of a
model holding adapters are the base model's (which it learns from peft's own layers). It imports
peft only in the functions that build peft objects.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import constants as C
from .errors import ConfigMismatch, InvalidArgument, UnsupportedAdapter

if TYPE_CHECKING:
    import torch

#: Prefix of every key in a saved peft adapter.
PEFT_PREFIX = "base_model.model."

#: Tensor-name patterns kept dense by default when the source has no PEFT config: they are not
#: deltas from the reference (DoRA magnitudes, ``modules_to_save`` copies) or are small and
#: sensitive (biases, norms).
DEFAULT_DENSE_PATTERNS = (
    "*lora_magnitude_vector*",
    "*modules_to_save*",
    "*.bias",
    "*norm*",
)


@dataclass(frozen=True)
class Role:
    """A kind of tensor in a PEFT adapter."""

    name: str
    #: the key's ending after the module path (a regex; an adapter-name segment is allowed before
    #: a trailing ``.weight``)
    suffix: str
    #: a task-vector factor: compression may sparsify it; anything else is a full weight, kept dense
    sparsifiable: bool = False
    #: how ``apply`` places it: ``"lora"`` (a factor or DoRA magnitude of a LoRA module), ``"ia3"``,
    #: ``"parameter"`` (replaces the base parameter of that name); ``""`` cannot be applied
    apply: str = ""


#: Roles in match order; a key that matches none is a full weight (``parameter``), unless it
#: looks like an adapter tensor of a kind not listed here (``unknown``).
ROLES: tuple[Role, ...] = (
    Role("lora_bias", r"lora_B\.bias"),  # before lora_B, which would take ``.bias`` for an adapter name
    Role("lora_A", r"lora_A", sparsifiable=True, apply="lora"),
    Role("lora_B", r"lora_B", sparsifiable=True, apply="lora"),
    Role("lora_embedding_A", r"lora_embedding_A", sparsifiable=True),
    Role("lora_embedding_B", r"lora_embedding_B", sparsifiable=True),
    Role("magnitude", r"lora_magnitude_vector", apply="lora"),
    Role("lora_E", r"lora_E"),
    Role("ranknum", r"ranknum"),
    Role("ia3", r"ia3_l", sparsifiable=True, apply="ia3"),
    Role("trainable_tokens", r"token_adapter\.trainable_tokens_delta"),
    Role("base_layer", r"base_layer\.(?:weight|bias)", apply="parameter"),
    # a base layer's bias trained with ``bias="all"`` (not a LoRA bias, not one of a wrapped layer)
    Role("bias", r"(?<!lora_B\.)(?<!base_layer\.)bias", apply="parameter"),
)
PARAMETER = Role("parameter", "", apply="parameter")
UNKNOWN = Role("unknown", "")
_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>" + "|".join(f"(?P<r{i}>{r.suffix})" for i, r in enumerate(ROLES))
                  + r")(?:\.(?!weight$)(?P<adapter>[A-Za-z0-9_-]+))?(?:\.weight)?$")
#: the name prefixes of peft's tuners: a saved tensor with one that no role above names is of a kind
#: this library does not know
_ADAPTER_LIKE = re.compile(r"(^|\.)(lora_|ia3_|vera_|oft_|boft_|hra_|ln_tuning|hada_|lokr_|fourierft_|vblora_|adaption_|"
                           r"prompt_|token_adapter)")


@dataclass(frozen=True)
class KeyRole:
    """Where one tensor of an adapter goes."""

    key: str
    #: the module path in the base model (without ``base_model.model.``)
    module: str
    role: Role
    #: the adapter name inside the key, for keys of a live model's state dict (``lora_A.default``)
    adapter: str | None = None

    @property
    def parameter(self) -> str:
        """The base-model parameter a full weight replaces (``parameter`` and ``base_layer``)."""
        if self.role.name == "base_layer":
            return f"{self.module}.{self.key.rsplit('.', 1)[1]}"
        return _strip(self.key)


def _strip(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def parse_key(key: str) -> KeyRole:
    """The module and role of a state-dict key of a PEFT adapter."""
    bare = _strip(key)
    m = _KEY.match(bare)
    if m is not None:
        role = next(ROLES[i] for i in range(len(ROLES)) if m.group(f"r{i}") is not None)
        return KeyRole(key, m["module"], role, m["adapter"])
    role = UNKNOWN if _ADAPTER_LIKE.search(bare) else PARAMETER
    return KeyRole(key, bare.rsplit(".", 1)[0] if "." in bare else "", role)


def sparsifiable(key: str) -> bool:
    """A task-vector factor of a PEFT adapter (LoRA and (IA)3 weights), which may be sparsified."""
    return parse_key(key).role.sparsifiable


# --- the base model's tensors of a model holding peft adapters ----------------------------------
def base_model_of(model: Any) -> Any:
    """The model a ``peft.PeftModel`` wraps (tuner layers still in it); any other model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


#: A module whose class sets this attribute true holds weights added beside the base model (the
#: recovery modules of ``recovery``): neither its parameters nor its submodules are the base model's.
ADDED_MODULE = "compeft_added_module"


def _wrapping(base: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """The names the adapters of ``base`` added (peft's adapter layers, ``modules_to_save`` copies,
    modules marked ``ADDED_MODULE``), and the (wrapped prefix, original prefix) pairs of the layers
    peft wrapped, the innermost wrapper first."""
    added: list[str] = []
    unwrap: list[tuple[str, str]] = []
    for path, module in base.named_modules():
        at = f"{path}." if path else ""
        if getattr(module, ADDED_MODULE, False):
            added.append(path)
        if hasattr(module, "adapter_layer_names") and hasattr(module, "base_layer"):  # a peft tuner layer
            added += [at + n for n in (*module.adapter_layer_names, *getattr(module, "other_param_names", ()))]
            unwrap.append((at + "base_layer.", at))
        if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):  # ModulesToSaveWrapper
            added.append(at + "modules_to_save")
            unwrap.append((at + "original_module.", at))
        if hasattr(module, "token_adapter"):  # TrainableTokensWrapper
            unwrap.append((at + "token_adapter.", at))
    unwrap.sort(key=lambda u: -len(u[0]))  # the innermost wrapper first
    return added, unwrap


def _original_name(name: str, added: list[str], unwrap: list[tuple[str, str]]) -> str | None:
    """``name`` (a state-dict key, or a module path followed by ".") as before wrapping; None for
    the names adapters added."""
    if any(name == a or name.startswith(a + ".") for a in added):
        return None
    renamed = True
    while renamed:
        renamed = False
        for old, new in unwrap:
            if name.startswith(old):
                name, renamed = new + name[len(old):], True
                break
    return name


def base_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The base model's own tensors, under their original names, of a model that may hold peft
    adapters of any kind: the tensors each peft tuner layer declares as its own
    (``adapter_layer_names``, ``other_param_names``), ``modules_to_save`` copies, trainable-token
    deltas and the modules marked ``ADDED_MODULE`` (recovery modules) are left out, and wrapped
    weights (``base_layer``, ``original_module``, ``token_adapter``) are named as before wrapping."""
    base = base_model_of(model)
    added, unwrap = _wrapping(base)
    out: dict[str, torch.Tensor] = {}
    for key, t in base.state_dict().items():
        original = _original_name(key, added, unwrap)
        if original is not None:
            out[original] = t
    return out


def base_modules(model: Any) -> dict[str, Any]:
    """The base model's own modules by their original names, of a model that may hold adapters: a
    layer peft wrapped is its innermost ``base_layer`` (``original_module``), and the modules
    adapters added are left out. The root module is not listed."""
    base = base_model_of(model)
    added, unwrap = _wrapping(base)
    out: dict[str, Any] = {}
    for path, module in base.named_modules():  # a wrapper before the layer it wraps: the layer wins
        if not path or any(path == a or path.startswith(a + ".") for a in added):
            continue
        original = _original_name(path + ".", [], unwrap)
        if original is not None and original != ".":
            out[original[:-1]] = module
    return out


# --- PEFT types and configs ------------------------------------------------------------------------
@dataclass(frozen=True)
class PeftType:
    #: the manifest's ``adapter.kind``
    kind: str
    #: the reference its task vector is taken against
    reference: str
    #: ``load_adapter`` and ``merge_adapter`` can apply it
    loadable: bool


PEFT_TYPES: dict[str, PeftType] = {
    "LORA": PeftType("lora", C.REFERENCE_ZERO, loadable=True),
    "ADALORA": PeftType("lora", C.REFERENCE_ZERO, loadable=False),
    "IA3": PeftType("ia3", C.REFERENCE_ONES, loadable=True),
}


def peft_type(config: Mapping[str, Any] | None) -> PeftType | None:
    """The known PEFT type of a config, or None."""
    if config is None:
        return None
    return PEFT_TYPES.get(str(config.get("peft_type", "")).upper())


def config_dict(config: Any) -> dict[str, Any]:
    """A PEFT config as the JSON object ``adapter_config.json`` holds: from a mapping or a peft
    config object (``to_dict()``); sets become sorted lists, enums their values, paths strings.

    Raises:
        InvalidArgument: a value JSON cannot hold.
    """
    if isinstance(config, Mapping):
        raw: Any = dict(config)
    elif callable(getattr(config, "to_dict", None)):
        raw = config.to_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        raw = dataclasses.asdict(config)
    else:
        raise InvalidArgument(f"peft_config must be a mapping or a peft config, not a {type(config).__name__}")
    out = _jsonable(raw, "peft_config")
    assert isinstance(out, dict)
    return out


def _jsonable(x: Any, where: str) -> Any:
    if isinstance(x, enum.Enum):  # before str and int: peft's enums are both
        return _jsonable(x.value, where)
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        if not math.isfinite(x):
            raise InvalidArgument(f"{where} holds {x}, which JSON cannot hold")
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, Mapping):
        if not all(isinstance(k, str) for k in x):
            raise InvalidArgument(f"{where} has keys that are not strings")
        return {k: _jsonable(v, f"{where}.{k}") for k, v in x.items()}
    if isinstance(x, (set, frozenset)):
        return sorted((_jsonable(v, where) for v in x), key=repr)
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, where) for v in x]
    raise InvalidArgument(f"{where} holds a {type(x).__name__}, which JSON cannot hold")


#: Longest regular expression a PEFT config may give (``rank_pattern`` keys, ``target_modules``).
MAX_PATTERN = 512
#: Most unbounded repetitions (``*``, ``+``, ``{n,}``) in one of them.
MAX_REPEATS = 2

_SRE: Any = getattr(re, "_parser", None)
if _SRE is None:  # Python 3.10
    import sre_parse as _SRE
#: what a repetition may repeat: one character, a class of them, or a group of such
_SIMPLE = {_SRE.LITERAL, _SRE.NOT_LITERAL, _SRE.ANY, _SRE.IN, _SRE.CATEGORY}
_REPEATS = {_SRE.MAX_REPEAT, _SRE.MIN_REPEAT} | ({_SRE.POSSESSIVE_REPEAT} if hasattr(_SRE, "POSSESSIVE_REPEAT") else set())


class _Explosive(Exception):
    """A construct whose matching time can grow exponentially."""


def _simple(items: Any) -> bool:
    return all(op in _SIMPLE or (op == _SRE.SUBPATTERN and _simple(av[-1])) for op, av in items)


def _unbounded_repeats(items: Any) -> int:
    """The unbounded repetitions of a parsed expression; ``_Explosive`` for a repetition of
    anything but single characters (``(a+)+``, ``(a|b\\)*``, ``(ab|cd){2,}``) and for
    backreferences."""
    count = 0
    for op, av in items:
        if op in _REPEATS:
            _low, high, sub = av
            if high > 1 and not _simple(sub):
                raise _Explosive("repeats a group holding an alternation or a repetition")
            count += (high == _SRE.MAXREPEAT) + _unbounded_repeats(sub)
        elif op == _SRE.SUBPATTERN:
            count += _unbounded_repeats(av[-1])
        elif op == _SRE.BRANCH:
            count += sum(_unbounded_repeats(alt) for alt in av[1])
        elif op in (_SRE.ASSERT, _SRE.ASSERT_NOT):
            count += _unbounded_repeats(av[1])
        elif op == getattr(_SRE, "ATOMIC_GROUP", None):
            count += _unbounded_repeats(av)
        elif op in (_SRE.GROUPREF, _SRE.GROUPREF_EXISTS):
            raise _Explosive("refers back to a group")
    return count


def check_pattern(pattern: Any, where: str) -> str:
    """A regular expression from a PEFT config that can be run on module names without risk: a
    string of at most ``MAX_PATTERN`` characters that parses, in which every repetition repeats
    single characters (or a group of them: no repeated alternation, no nested repetition, no
    backreference), with at most ``MAX_REPEATS`` unbounded repetitions, so matching stays
    polynomial and small. The expression is judged from its parse tree, not its text, so no
    escaping hides a construct. peft runs these expressions (``rank_pattern`` and
    ``alpha_pattern`` keys, a string ``target_modules`` or ``exclude_modules``,
    ``modules_to_save``, ``layers_pattern``), so a config from a file is checked before it
    reaches peft.

    Raises:
        ConfigMismatch: anything else.
    """
    if not isinstance(pattern, str) or not 0 < len(pattern) <= MAX_PATTERN:
        raise ConfigMismatch(f"{where}: a pattern must be a string of 1 to {MAX_PATTERN} characters")
    try:
        parsed = _SRE.parse(pattern)
        repeats = _unbounded_repeats(parsed)
        re.compile(pattern)
    except _Explosive as e:
        raise ConfigMismatch(f"{where}: pattern {pattern[:80]!r} {e}; its matching time could explode") from None
    except (re.error, RecursionError, OverflowError, ValueError, TypeError) as e:
        raise ConfigMismatch(f"{where}: pattern {pattern[:80]!r} is not a regular expression ({e})") from None
    if repeats > MAX_REPEATS:
        raise ConfigMismatch(f"{where}: pattern {pattern[:80]!r} has more than {MAX_REPEATS} unbounded "
                             "repetitions; its matching time could explode")
    return pattern


def check_config_patterns(config: Mapping[str, Any]) -> None:
    """Every value of a PEFT config that peft runs as a regular expression (``check_pattern``):
    ``rank_pattern`` and ``alpha_pattern`` keys, ``target_modules`` and ``exclude_modules`` when
    they are strings, every name of ``modules_to_save`` (peft embeds them in an expression) and
    ``layers_pattern`` (a string or a list of them).

    Raises:
        ConfigMismatch: a value of the wrong type or a pattern ``check_pattern`` refuses.
    """
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, Mapping):
            raise ConfigMismatch(f"{name} must be an object")
        for key in patterns:
            check_pattern(key, name)
    for name in ("target_modules", "exclude_modules"):
        if isinstance(config.get(name), str):
            check_pattern(config[name], name)
    for name in ("modules_to_save", "layers_pattern"):
        value = config.get(name)
        if value is None:
            continue
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)):
            raise ConfigMismatch(f"{name} must be a string or a list of strings")
        for v in values:
            check_pattern(v, name)


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the end of the
    module name (each key checked by ``check_pattern`` first)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({check_pattern(key, 'rank_pattern / alpha_pattern')})$", module):
            return value
    return default


def lora_scaling(config: Mapping[str, Any], module: str, rank: int) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) of one module, rank and alpha patterns
    honoured; ``ConfigMismatch`` when the config's rank is not the tensors'."""
    r = int(pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
    if r != rank:
        raise ConfigMismatch(f"config gives {module!r} rank {r}, its tensors have rank {rank}")
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def peft_config(config: Mapping[str, Any], *, inference_mode: bool) -> Any:
    """A peft config object from its JSON form (imports peft)."""
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    try:
        name = PeftType(str(config.get("peft_type", "")).upper())
    except ValueError:
        raise UnsupportedAdapter(f"peft has no adapter type {config.get('peft_type')!r}") from None
    check_config_patterns(config)
    names = {f.name for f in dataclasses.fields(PEFT_TYPE_TO_CONFIG_MAPPING[name])}
    kwargs = {k: v for k, v in config.items() if k in names and k not in ("peft_type", "auto_mapping")}
    kwargs["inference_mode"] = inference_mode
    return PeftConfig.from_peft_type(peft_type=name, **kwargs)


def lora_pairs(names: Iterable[str]) -> list[tuple[str, str, str]]:
    """``(module, lora_A key, lora_B key)`` of every module that has both factors among ``names``
    (embedding LoRA factors included; keys with an adapter name, ``lora_A.default.weight``, pair
    with the same adapter's), in name order."""
    found: dict[tuple[str, str | None, bool], dict[str, str]] = {}
    for key in names:
        kr = parse_key(key)
        if kr.role.name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            group = (kr.module, kr.adapter, kr.role.name.startswith("lora_embedding"))
            found.setdefault(group, {})[kr.role.name[-1]] = key
    return sorted((module, parts["A"], parts["B"]) for (module, _, _), parts in found.items()
                  if "A" in parts and "B" in parts)


def lora_matrices(shape_a: Sequence[int], shape_b: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The shapes ``(r, n)`` and ``(m, r)`` under which a LoRA module's update is the matrix
    product ``B A`` of its factors: linear and embedding factors as they are, convolution factors
    (A: ``r x in x k..``, B: ``out x r x 1..``) flattened after the first axis. None when the
    shapes do not make such a product."""
    if len(shape_a) < 2 or len(shape_b) < 2:
        return None
    a = (int(shape_a[0]), math.prod(int(d) for d in shape_a[1:]))
    b = (int(shape_b[0]), math.prod(int(d) for d in shape_b[1:]))
    return (a, b) if b[1] == a[0] > 0 else None


# --- an adapter's tensors, by where they go --------------------------------------------------------
@dataclass
class AdapterLayout:
    """The tensors of an adapter grouped by what they touch: per LoRA module its factors and DoRA
    magnitude, per (IA)3 module its vector, full weights by parameter name, and the keys of kinds
    that cannot be applied."""

    lora: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    ia3: dict[str, tuple[int, ...]] = field(default_factory=dict)
    full: dict[str, tuple[int, ...]] = field(default_factory=dict)
    keys: dict[str, KeyRole] = field(default_factory=dict)
    unsupported: list[KeyRole] = field(default_factory=list)

    @classmethod
    def of(cls, tensors: Iterable[tuple[str, tuple[int, ...]]], *, deltas: bool = False) -> AdapterLayout:
        """The layout of ``(key, shape)`` pairs; with ``deltas`` every tensor is a difference to
        add to the base parameter of the same name (a full fine-tuning delta)."""
        lay = cls()
        for key, shape in tensors:
            kr = KeyRole(key, key.rsplit(".", 1)[0], PARAMETER) if deltas else parse_key(key)
            lay.keys[key] = kr
            if kr.adapter is not None or not kr.role.apply:
                lay.unsupported.append(kr)
            elif kr.role.apply == "lora":
                lay.lora.setdefault(kr.module, {})[kr.role.name] = tuple(shape)
            elif kr.role.apply == "ia3":
                lay.ia3[kr.module] = tuple(shape)
            else:
                lay.full[kr.key if deltas else kr.parameter] = tuple(shape)
        return lay


__all__ = ["PEFT_PREFIX", "DEFAULT_DENSE_PATTERNS", "Role", "ROLES", "KeyRole", "parse_key", "sparsifiable", "lora_pairs", "lora_matrices",
           "base_model_of", "base_state_dict", "base_modules", "ADDED_MODULE", "PeftType", "PEFT_TYPES", "peft_type", "config_dict", "pattern_value", "check_pattern",
           "check_config_patterns", "lora_scaling",
           "peft_config", "AdapterLayout"]
