"""Compression recipes for a base model: a short text such as ``2:4+int4:g128`` that names which
weights are pruned and how the rest are quantised, and its parsed form.

Grammar (steps joined by ``+``, at most one pruning step, then at most one quantisation step):

===================  ==============  ====================================================================
text                 kind            meaning
===================  ==============  ====================================================================
``int8``             ``rtn``         round-to-nearest, ``bits`` 2..8, one scale per output channel
``int4:g128``        ``rtn``         round-to-nearest with one scale per group of 128 input weights
``int3:g64:asym``    ``rtn``         asymmetric: a scale and a zero point per group (``:sym`` default)
``nf4``, ``nf4:b64`` ``nf4``         QLoRA NormalFloat4, one absmax per block (default 64); ``:dq``
                                     also quantises the absmax values (QLoRA double quantisation)
``2:4``, ``4:8``     ``nm``          N:M semi-structured: N of every M consecutive input weights kept,
                                     those of largest magnitude
``prune:0.5``        ``magnitude``   unstructured: in every output row, the given fraction of the
                                     weights with the smallest magnitude set to zero
``wanda:0.5``        ``wanda``       as ``prune`` with Wanda's score ``|W_ij| * ||X_j||_2`` (calibration)
``wanda:2:4``        ``wanda``       N:M by Wanda's score
===================  ==============  ====================================================================

``Recipe.name`` is the canonical text (defaults left out: ``nf4:b64`` is ``nf4``, ``int4:g128:sym``
is ``int4:g128``), so ``Recipe.parse(r.name) == r``.

Example:
    >>> Recipe.parse("wanda:2:4+int4:g128").steps
    (Step(kind='wanda', params={'n': 2, 'm': 4}), Step(kind='rtn', params={'bits': 4, 'group': 128, 'symmetric': True}))
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compeft_format.errors import InvalidArgument

#: step kinds that set weights to zero, and those that round them; a recipe prunes before it rounds
PRUNING_KINDS = ("magnitude", "nm", "wanda")
QUANTISATION_KINDS = ("rtn", "nf4")
#: bits of a round-to-nearest step
RTN_BITS = range(2, 9)
#: NF4 block sizes bitsandbytes supports, and QLoRA's default
NF4_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NF4_DEFAULT_BLOCK = 64


@dataclass(frozen=True)
class Step:
    """One compression step.

    Attributes:
        kind: ``rtn``, ``nf4``, ``magnitude``, ``nm`` or ``wanda``.
        params: the step's parameters, e.g. ``{"bits": 4, "group": 128, "symmetric": True}`` (``group``
            None: one scale per output channel), ``{"block": 64, "double_quant": False}``,
            ``{"sparsity": 0.5}``, ``{"n": 2, "m": 4}``.
    """

    kind: str
    params: dict[str, Any]

    def __post_init__(self) -> None:
        if self.kind not in _FORMATTERS:
            raise InvalidArgument(f"unknown step kind {self.kind!r}; use one of {sorted(_FORMATTERS)}")

    @property
    def text(self) -> str:
        """The step's canonical text."""
        return _FORMATTERS[self.kind](self.params)

    @property
    def prunes(self) -> bool:
        return self.kind in PRUNING_KINDS

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": dict(self.params)}


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: its steps in the order they are applied (pruning first)."""

    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.steps, tuple) or not self.steps or not all(isinstance(s, Step) for s in self.steps):
            raise InvalidArgument("a recipe's steps are a non-empty tuple of Step")
        for step in self.steps:  # only what a recipe's text can name: parameters of the right types and ranges
            try:
                named = _parse_step(step.text)
            except (KeyError, TypeError, ValueError):
                named = None
            if named != step:
                raise InvalidArgument(f"step {step.kind} with parameters {step.params} is not one a recipe can name")
        pruning = [s for s in self.steps if s.prunes]
        rounding = [s for s in self.steps if not s.prunes]
        if len(pruning) > 1 or len(rounding) > 1:
            raise InvalidArgument(f"recipe {self.name!r}: at most one pruning step and one quantisation step")
        if pruning and rounding and self.steps[0] is not pruning[0]:
            raise InvalidArgument(f"recipe {self.name!r}: pruning comes first, then quantisation "
                                  f"(write '{pruning[0].text}+{rounding[0].text}')")

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """Parse a recipe's text (module docstring).

        Raises:
            InvalidArgument: the text is not a recipe; the message names the step and what is wrong.
        """
        if not isinstance(text, str):
            raise InvalidArgument(f"a recipe is text such as 'int4:g128' or '2:4+int8', not a {type(text).__name__}")
        parts = text.strip().lower().split("+")
        if not text.strip():
            raise InvalidArgument("empty recipe; give e.g. 'int8', 'int4:g128', 'nf4', '2:4', 'prune:0.5', 'wanda:0.5'")
        return cls(tuple(_parse_step(p.strip()) for p in parts))

    @property
    def name(self) -> str:
        """The canonical text: ``Recipe.parse(name) == self``."""
        return "+".join(s.text for s in self.steps)

    @property
    def needs_calibration(self) -> bool:
        """Whether a step scores weights by calibration activations (Wanda)."""
        return any(s.kind == "wanda" for s in self.steps)

    @property
    def prunes(self) -> bool:
        return any(s.prunes for s in self.steps)

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., "steps": [{"kind": ..., "params": {...}}, ...]}``."""
        return {"name": self.name, "steps": [s.to_json() for s in self.steps]}

    @classmethod
    def from_json(cls, obj: Any) -> Recipe:
        """The recipe ``to_json`` wrote: parsed from its ``name``, whose steps must agree with ``steps``
        where those are given.

        Raises:
            InvalidArgument: not such an object, or its name and steps disagree.
        """
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise InvalidArgument("a recipe's JSON is an object with a 'name' string")
        recipe = cls.parse(obj["name"])
        steps = obj.get("steps")
        if steps is not None and steps != [s.to_json() for s in recipe.steps]:
            raise InvalidArgument(f"recipe {obj['name']!r}: its steps disagree with its name")
        return recipe

    def __str__(self) -> str:
        return self.name


# --- one parser and one formatter per kind of step ---------------------------------------------------
_INT = re.compile(r"[1-9][0-9]*")


def _int(text: str, what: str, step: str) -> int:
    if not _INT.fullmatch(text):
        raise InvalidArgument(f"recipe step {step!r}: {what} must be a positive integer, not {text!r}")
    return int(text)


def _fraction(text: str, step: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise InvalidArgument(f"recipe step {step!r}: the sparsity must be a number between 0 and 1 (exclusive), "
                              f"not {text!r}")
    return value


def _nm(n_text: str, m_text: str, step: str) -> dict[str, Any]:
    n, m = _int(n_text, "N", step), _int(m_text, "M", step)
    if n >= m:
        raise InvalidArgument(f"recipe step {step!r}: N:M keeps N of every M weights, so N must be below M")
    return {"n": n, "m": m}


def _parse_rtn(step: str, head: str, options: list[str]) -> Step:
    bits = _int(head[3:], "the bit width", step)
    if bits not in RTN_BITS:
        raise InvalidArgument(f"recipe step {step!r}: round-to-nearest takes {RTN_BITS.start} to {RTN_BITS.stop - 1} bits")
    group: int | None = None
    symmetric: bool | None = None
    for opt in options:
        if opt.startswith("g") and group is None:
            group = _int(opt[1:], "the group size", step)
        elif opt in ("sym", "asym") and symmetric is None:
            symmetric = opt == "sym"
        else:
            raise InvalidArgument(f"recipe step {step!r}: unknown or repeated option {opt!r} "
                                  "(int<bits> takes ':g<group>' and ':sym' or ':asym')")
    return Step("rtn", {"bits": bits, "group": group, "symmetric": True if symmetric is None else symmetric})


def _parse_nf4(step: str, head: str, options: list[str]) -> Step:
    block: int | None = None
    double = False
    for opt in options:
        if opt.startswith("b") and block is None:
            block = _int(opt[1:], "the block size", step)
            if block not in NF4_BLOCKS:
                raise InvalidArgument(f"recipe step {step!r}: NF4 block size must be one of {list(NF4_BLOCKS)}")
        elif opt == "dq" and not double:
            double = True
        else:
            raise InvalidArgument(f"recipe step {step!r}: unknown or repeated option {opt!r} (nf4 takes ':b<block>', ':dq')")
    return Step("nf4", {"block": NF4_DEFAULT_BLOCK if block is None else block, "double_quant": double})


def _parse_prune(step: str, head: str, options: list[str]) -> Step:
    if len(options) != 1:
        raise InvalidArgument(f"recipe step {step!r}: write prune:<sparsity>, e.g. prune:0.5")
    return Step("magnitude", {"sparsity": _fraction(options[0], step)})


def _parse_wanda(step: str, head: str, options: list[str]) -> Step:
    if len(options) == 1:
        return Step("wanda", {"sparsity": _fraction(options[0], step)})
    if len(options) == 2:
        return Step("wanda", _nm(options[0], options[1], step))
    raise InvalidArgument(f"recipe step {step!r}: write wanda:<sparsity> or wanda:<N>:<M>, e.g. wanda:0.5, wanda:2:4")


def _parse_step(step: str) -> Step:
    if not step:
        raise InvalidArgument("empty step in recipe (two '+' in a row, or one at an end)")
    head, *options = step.split(":")
    if re.fullmatch(r"int[0-9]+", head):
        return _parse_rtn(step, head, options)
    if head in _PARSERS:
        return _PARSERS[head](step, head, options)
    if re.fullmatch(r"[0-9]+", head) and len(options) == 1:
        return Step("nm", _nm(head, options[0], step))
    raise InvalidArgument(f"unknown recipe step {step!r}; steps are int<bits>[:g<group>][:asym], "
                          "nf4[:b<block>][:dq], <N>:<M>, prune:<sparsity>, wanda:<sparsity>, wanda:<N>:<M>")


_PARSERS: dict[str, Callable[[str, str, list[str]], Step]] = {
    "nf4": _parse_nf4,
    "prune": _parse_prune,
    "wanda": _parse_wanda,
}


def _format_rtn(p: dict[str, Any]) -> str:
    return f"int{p['bits']}" + (f":g{p['group']}" if p["group"] is not None else "") + ("" if p["symmetric"] else ":asym")


def _format_nf4(p: dict[str, Any]) -> str:
    return "nf4" + (f":b{p['block']}" if p["block"] != NF4_DEFAULT_BLOCK else "") + (":dq" if p["double_quant"] else "")


def _format_wanda(p: dict[str, Any]) -> str:
    return f"wanda:{p['n']}:{p['m']}" if "n" in p else f"wanda:{p['sparsity']!r}"


_FORMATTERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "rtn": _format_rtn,
    "nf4": _format_nf4,
    "nm": lambda p: f"{p['n']}:{p['m']}",
    "magnitude": lambda p: f"prune:{p['sparsity']!r}",
    "wanda": _format_wanda,
}

__all__ = ["Step", "Recipe", "PRUNING_KINDS", "QUANTISATION_KINDS"]
