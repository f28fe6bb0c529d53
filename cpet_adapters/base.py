"""Compressed base models for CPET: a transformers model whose linear layers are pruned and/or
quantised by a recipe (``recipe.Recipe``), saved as an ordinary model folder of effective weights
and bound, by fingerprint, to the model it was derived from.

The folder ``compress_base`` writes loads with ``transformers`` anywhere (a causal LM with
``AutoModelForCausalLM``; an encoder checkpoint such as BERT's with ``AutoModel`` or into a head
model, ``AutoModelForSequenceClassification``): its weights are the effective (dequantised, masked) float32 values, which PEFT trains on
and which fingerprint identically on every machine. Beside them, ``compressed_base.json`` (the
descriptor) records the binding (``compeft_format.BaseBinding``: this folder's fingerprint, the
source model it was derived from and its fingerprint, the recipe), the target modules, per-layer
statistics and the versions of the libraries that did the work. Adapters trained on it record that
binding, so that they are never applied to a different base.

Example:
    >>> base = compress_base("./smollm2", "./smollm2-int4", "int4:g128", source_id="HuggingFaceTB/SmolLM2-135M")
    >>> base.binding.describe()
    >>> base = load_compressed_base("./smollm2-int4")          # verify=True: refuses edited weights
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import compeft_format as cf
from compeft_format.binding import FLOAT32, BaseBinding, ModelRef
from compeft_format.errors import (
    BaseMismatch,
    CompeftError,
    FileNotFound,
    InputError,
    InvalidArgument,
    NonFiniteInput,
    UnsupportedModel,
    VersionError,
)
from compeft_format.fileio import atomic_folder
from compeft_format.hf_models import is_causal_lm
from compeft_format.peft_io import check_output

from .prune import step_mask
from .quantize import check_rtn, library_version, quantise, quiet_imports
from .recipe import Recipe

#: the descriptor's file name in a compressed base's folder, its ``format`` and its version
DESCRIPTOR = "compressed_base.json"
FORMAT = "cpet-compressed-base"
VERSION = 1
#: calibration windows per forward pass
CALIBRATION_BATCH = 8
#: files of a tokenizer that are copied from the source folder when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
#: what ``calibration_sha256`` hashes
CALIBRATION_HASHED = "token ids, int64 little-endian, row-major [samples, seq_len]"


@dataclass(frozen=True)
class CompressedBase:
    """A compressed base model's folder and what its descriptor records.

    Attributes:
        path: the model folder.
        binding: ``id`` None, ``fingerprint`` of the folder's weights (``FLOAT32``), ``derived_from``
            the source model (its id, revision and ``FLOAT32`` fingerprint), ``recipe`` with
            ``name``, ``library``, ``library_version``, ``params`` and ``calibration_sha256``.
        stats: ``{"layers": {module: {...}}, "overall": {...}}``, each with ``sparsity`` (fraction
            of zero weights), ``relative_error`` (``||W' - W||_F / ||W||_F``), ``bits`` (bits per
            weight of the quantised form, 32 for float32) and ``weights`` (count).
        recipe: the recipe applied.
        target_modules: the names of the modules compressed.
    """

    path: Path
    binding: BaseBinding
    stats: dict[str, Any]
    recipe: Recipe | None = None
    target_modules: tuple[str, ...] = field(default=())


# --- which modules ----------------------------------------------------------------------------------
def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks: the ``nn.ModuleList`` holding the most parameters whose entries
    are all of one class (``model.layers`` of a Llama), and its name.

    Raises:
        UnsupportedModel: the model has no such list.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(b) for b in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[0]):
                best = (size, name, module)
    if best is None:
        raise UnsupportedModel(f"{type(model).__name__} has no list of decoder blocks; name the target modules")
    return best[1], best[2]


def resolve_targets(model: nn.Module, target_modules: Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """The linear layers to compress, by module name in model order.

    Args:
        target_modules: None: every ``nn.Linear`` inside the decoder blocks (``decoder_blocks``),
            not embeddings, not ``lm_head``. Else names as PEFT matches them: a module is a target
            when its name equals an entry or ends with ``.`` and the entry (``q_proj``,
            ``layers.0.mlp.up_proj``).

    Raises:
        InvalidArgument: an entry matches no module. UnsupportedModel: one matches a module that
        is not an ``nn.Linear``, a target's weight is shared with another parameter (tied), or
        there is no target at all.
    """
    if target_modules is None:
        prefix, _ = decoder_blocks(model)
        chosen = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix + ".")}
    else:
        if isinstance(target_modules, str) or not all(isinstance(t, str) and t for t in target_modules):
            raise InvalidArgument("target_modules is a list of module names, e.g. ['q_proj', 'v_proj']")
        names = [n for n, _ in model.named_modules() if n]
        chosen = {}
        for entry in target_modules:
            hits = [n for n in names if n == entry or n.endswith("." + entry)]
            if not hits:
                raise InvalidArgument(f"target module {entry!r} matches no module of {type(model).__name__}")
            for n in hits:
                module = model.get_submodule(n)
                if not isinstance(module, nn.Linear):
                    raise UnsupportedModel(f"target module {n!r} is a {type(module).__name__}, not a linear layer",
                                           modules=[n])
                chosen[n] = module
        order = {n: i for i, n in enumerate(names)}
        chosen = dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))
    if not chosen:
        raise UnsupportedModel(f"{type(model).__name__} has no linear layer to compress")
    target_weights = {id(m.weight) for m in chosen.values()}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in target_weights and not any(pname == f"{n}.weight" for n in chosen):
            tied = [n for n, m in chosen.items() if m.weight is p]
            raise UnsupportedModel(f"the weight of {tied[0]!r} is tied to {pname!r}; compressing it would change both",
                                   modules=tied)
    return chosen


def _check_fits(recipe: Recipe, targets: Mapping[str, nn.Linear]) -> None:
    """Every step's group or M divides the in_features of every target, weights are finite."""
    for name, layer in targets.items():
        cols = int(layer.in_features)
        for step in recipe.steps:
            if step.kind == "rtn":
                check_rtn(cols, step.params, repr(name))
            elif "m" in step.params and cols % step.params["m"]:
                raise InvalidArgument(f"{step.text} needs in_features divisible by {step.params['m']}; "
                                      f"{name!r} has {cols}")
        lo, hi = torch.aminmax(layer.weight.detach())  # NaN propagates: one pass instead of isfinite's several
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            raise NonFiniteInput(f"the weight of {name!r} holds NaN or infinity", tensor=f"{name}.weight")


# --- compressing layers -----------------------------------------------------------------------------
#: the attribute of a compressed linear layer holding its round-to-nearest scales and zero points
RTN_STATE = "_compeft_rtn_state"
#: the packed checkpoint formats ``compress_base`` writes
PACKED_FORMATS = ("compressed-tensors",)


def _compress_layer(layer: nn.Linear, recipe: Recipe, input_norm: torch.Tensor | None) -> dict[str, Any]:
    """Apply the recipe's steps to ``layer.weight`` in order and write the effective weight back in
    the layer's dtype; its statistics."""
    with torch.no_grad():
        original = layer.weight.detach().to(torch.float32, copy=True)
        effective = original
        mask: torch.Tensor | None = None
        bits = 32.0
        for step in recipe.steps:
            if step.prunes:
                mask = step_mask(step.kind, step.params, effective, input_norm)
                effective = torch.where(mask, effective, torch.zeros((), dtype=effective.dtype))
            else:
                q = quantise(step.kind, step.params, effective)
                effective, bits = q.weight, q.bits_per_weight
                if q.scale is not None:  # what a packed checkpoint stores beside the codes
                    setattr(layer, RTN_STATE, (q.scale, q.zero_point))
                if mask is not None:  # the quantisers map zero to zero; the mask stays exact regardless
                    effective = torch.where(mask, effective, torch.zeros((), dtype=effective.dtype))
        layer.weight.copy_(effective.to(layer.weight.dtype))
        written = layer.weight.detach()
        diff = torch.linalg.vector_norm(written.to(torch.float32) - original, dtype=torch.float64).item() ** 2
        norm = torch.linalg.vector_norm(original, dtype=torch.float64).item() ** 2
        zeros = written.numel() - int(torch.count_nonzero(written))
    return {"weights": original.numel(), "zeros": zeros, "sum_sq_diff": diff, "sum_sq": norm, "bits": bits}


def _finish_stats(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    def summary(weights: int, zeros: int, diff: float, norm: float, bits: float) -> dict[str, Any]:
        return {"weights": weights, "sparsity": zeros / weights if weights else 0.0,
                "relative_error": (diff / norm) ** 0.5 if norm else 0.0, "bits": bits}

    layers = {n: summary(r["weights"], r["zeros"], r["sum_sq_diff"], r["sum_sq"], r["bits"]) for n, r in raw.items()}
    total = sum(r["weights"] for r in raw.values())
    overall = summary(total, sum(r["zeros"] for r in raw.values()), sum(r["sum_sq_diff"] for r in raw.values()),
                      sum(r["sum_sq"] for r in raw.values()),
                      sum(r["bits"] * r["weights"] for r in raw.values()) / total if total else 0.0)
    overall["layers"] = len(raw)
    return {"layers": layers, "overall": overall}


@contextlib.contextmanager
def _input_norms(layers: Mapping[str, nn.Linear]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, every forward call of the layers adds the squares of its inputs per input feature
    (float64); the dict holds ``sqrt`` of the sums when it closes."""
    sums: dict[str, torch.Tensor] = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in layers.items()}

    def hook(name: str) -> Callable[..., None]:
        def add(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, sums[name].numel()).to(torch.float64)
            sums[name] += x.pow(2).sum(dim=0)
        return add

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        yield sums
    finally:
        for h in handles:
            h.remove()
        for n in sums:
            sums[n] = sums[n].sqrt()


class _Stop(Exception):
    """Ends a forward pass once the last decoder block's inputs are recorded."""


@dataclass
class _BlockCall:
    """One call of a decoder block: the hidden states and the other arguments the model passed."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    positional: bool

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden, *self.args, **self.kwargs) if self.positional else \
            block(*self.args, hidden_states=hidden, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _record_block_calls(model: nn.Module, blocks: nn.ModuleList, batches: Sequence[torch.Tensor]) -> list[list[_BlockCall]]:
    """For each batch, how the model calls each decoder block: the hidden states entering the first
    and the other arguments of each (the model's own masks and position embeddings, which may
    differ between blocks). While recording, each block returns its input unchanged instead of
    computing (the arguments do not depend on the hidden states), and the pass stops at the last."""
    calls: list[list[_BlockCall]] = []
    current: list[_BlockCall] = []

    def stand_in(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            kw = dict(kwargs)
            positional = bool(args)
            hidden = args[0] if positional else kw.pop("hidden_states")
            current.append(_BlockCall(hidden, tuple(args[1:]), kw, positional))
            if index == len(blocks) - 1:
                raise _Stop
            return hidden
        return forward

    own = [b.__dict__.get("forward") for b in blocks]  # a forward set on the instance (e.g. by accelerate)
    for i, b in enumerate(blocks):
        b.forward = stand_in(i)
    try:
        for ids in batches:
            current = []
            with contextlib.suppress(_Stop):
                model(input_ids=ids, use_cache=False)
            if len(current) != len(blocks):
                raise UnsupportedModel(f"{type(model).__name__} did not call each of its {len(blocks)} decoder blocks "
                                       "once per forward pass; Wanda calibration needs that")
            calls.append(current)
    finally:
        for b, f in zip(blocks, own, strict=True):
            if f is None:
                del b.forward
            else:
                b.forward = f
    return calls


def _compress_with_calibration(model: nn.Module, recipe: Recipe, targets: Mapping[str, nn.Linear],
                               batches: Sequence[torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Wanda's procedure: block by block, the inputs of the block's targets are measured on the
    outputs of the blocks before it (already compressed), the block is compressed, and its
    compressed outputs feed the next block. Targets outside the decoder blocks are measured in one
    forward pass of the model after that."""
    prefix, blocks = decoder_blocks(model)
    calls = _record_block_calls(model, blocks, batches)
    hidden = [c[0].hidden for c in calls]
    raw: dict[str, dict[str, Any]] = {}
    for i, block in enumerate(blocks):
        here = {n: m for n, m in targets.items() if n.startswith(f"{prefix}.{i}.")}
        if here:
            with _input_norms(here) as norms:
                for b, c in enumerate(calls):
                    c[i].run(block, hidden[b])
            for n, m in here.items():
                raw[n] = _compress_layer(m, recipe, norms[n])
        hidden = [c[i].run(block, hidden[b]) for b, c in enumerate(calls)]
    rest = {n: m for n, m in targets.items() if n not in raw}
    if rest:
        with _input_norms(rest) as norms:
            for ids in batches:
                model(input_ids=ids, use_cache=False)
        for n, m in rest.items():
            raw[n] = _compress_layer(m, recipe, norms[n])
    return {n: raw[n] for n in targets}


def _as_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    return Recipe.parse(recipe)


def compress_model_(model: nn.Module, recipe: str | Recipe, *, calibration_batches: Sequence[torch.Tensor] | None = None,
                    target_modules: Sequence[str] | None = None) -> dict[str, Any]:
    """Compress a model's linear layers in place: each target's weight becomes its effective
    weight under the recipe (pruned, then quantised and dequantised), in the layer's own dtype.

    Args:
        recipe: a ``Recipe`` or its text (``recipe`` module).
        calibration_batches: token ids ``[batch, seq_len]`` (int64), for recipes that score weights
            by activations (Wanda); ignored by the others. Wanda's norms ``||X_j||_2`` are taken
            over every token of every batch, block by block as Wanda does: the inputs of a block
            are the outputs of the blocks before it, already compressed.
        target_modules: see ``resolve_targets``; default every linear layer of the decoder blocks.

    Returns:
        ``{"layers": {name: stats}, "overall": stats}``, stats as ``CompressedBase.stats``.

    Raises:
        InvalidArgument: a bad recipe, a group or M that does not divide a target's in_features,
            Wanda without calibration batches, unknown target modules.
        NonFiniteInput: a target weight holds NaN or infinity.
        UnsupportedModel: targets that are not linear layers or are tied; a quantisation library
            that is not installed.
    """
    recipe = _as_recipe(recipe)
    targets = resolve_targets(model, target_modules)
    _check_fits(recipe, targets)
    if recipe.needs_calibration:
        batches = list(calibration_batches or [])
        if not batches:
            raise InvalidArgument(f"recipe {recipe.name} scores weights by activations and needs calibration batches")
        if not all(isinstance(b, torch.Tensor) and b.dim() == 2 and not b.is_floating_point() for b in batches):
            raise InvalidArgument("calibration batches are integer tensors of token ids [batch, seq_len]")
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if recipe.needs_calibration:
                raw = _compress_with_calibration(model, recipe, targets, batches)
            else:
                raw = {n: _compress_layer(m, recipe, None) for n, m in targets.items()}
    finally:
        model.train(training)
    return _finish_stats(raw)


# --- calibration text -------------------------------------------------------------------------------
def calibration_windows(tokenizer: Any, texts: Sequence[str], samples: int, seq_len: int) -> torch.Tensor:
    """Calibration token ids: the texts joined by blank lines (``"\\n\\n"``), tokenised without special
    tokens and cut into consecutive windows of ``seq_len`` tokens, the first ``samples`` of them.

    Returns:
        int64 ``[n, seq_len]``, n = ``samples`` or fewer when the text is shorter.

    Raises:
        InvalidArgument: no text, bad counts, or fewer than ``seq_len`` tokens in all.
    """
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidArgument("calibration is a non-empty list of texts")
    if samples < 1 or seq_len < 1:
        raise InvalidArgument(f"calibration_samples and seq_len must be positive, not {samples} and {seq_len}")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    n = min(samples, len(ids) // seq_len)
    if n == 0:
        raise InvalidArgument(f"the calibration text holds {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)


def calibration_sha256(windows: torch.Tensor) -> str:
    """sha256 of calibration token ids: the ``[samples, seq_len]`` array as int64 little-endian,
    row-major (``CALIBRATION_HASHED``)."""
    data = np.ascontiguousarray(windows.detach().cpu().numpy().astype("<i8", copy=False))
    return hashlib.sha256(data.tobytes()).hexdigest()


# --- the folder -------------------------------------------------------------------------------------
def _versions(recipe: Recipe) -> dict[str, str | None]:
    names = ["torch", "transformers", "safetensors"] + [library_version(s.kind)[0] for s in recipe.steps if not s.prunes]
    out: dict[str, str | None] = {"compeft": cf.__version__}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def _library(recipe: Recipe) -> tuple[str, str]:
    """``library`` and ``library_version`` of a binding's recipe: who ran each step, joined by ``+``
    (pruning masks are this library's own)."""
    libs: list[tuple[str, str]] = []
    for step in recipe.steps:
        name, version = ("compeft", cf.__version__) if step.prunes else library_version(step.kind)
        if (name, version or "unknown") not in libs:
            libs.append((name, version or "unknown"))
    return "+".join(n for n, _ in libs), "+".join(v for _, v in libs)


def _source_folder(source: str | os.PathLike[str]) -> Path:
    src = Path(source)
    if not src.exists():
        raise FileNotFound(f"no such model folder: {src}", path=str(src))
    if not src.is_dir() or not (src / "config.json").is_file():
        raise InputError(f"{src} is not a transformers model folder (config.json and safetensors weights)",
                         path=str(src))
    return src


#: ``quant_method`` of a source config whose safetensors weights are plain floats all the same: a
#: GGUF model converted with ``from_pretrained(gguf_file=...)`` and saved keeps it in its config
FLOAT_QUANT_METHODS = ("gguf",)


def _load_source(src: Path) -> Any:
    """The source model in float32: a causal LM when its config names one (``LlamaForCausalLM``),
    else the bare model (an encoder such as ``BertModel``, whose checkpoint then loads into any
    head model). A ``quantization_config`` left in the config of a checkpoint of float weights
    (``FLOAT_QUANT_METHODS``) is dropped; a checkpoint of quantised weights is refused."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    def short(e: Exception) -> str:
        return " ".join(str(e).split())[:500]

    try:
        config = AutoConfig.from_pretrained(src, local_files_only=True)
        qc = getattr(config, "quantization_config", None)
        if qc is not None:
            method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
            if str(getattr(method, "value", method)) not in FLOAT_QUANT_METHODS:
                raise InputError(f"{src} is already quantised ({method}); compress the model it was made from",
                                 path=str(src))
            delattr(config, "quantization_config")
        causal = is_causal_lm(config)
        with quiet_imports():
            model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(
                src, config=config, dtype=torch.float32, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        if isinstance(e, CompeftError):
            raise
        raise InputError(f"cannot load {src} as a transformers model: {short(e)}", path=str(src)) from None
    return model


def _load_tokenizer(src: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"cannot load the tokenizer of {src} to tokenise the calibration text: "
                         f"{' '.join(str(e).split())[:300]}", path=str(src)) from None


def compress_base(source: str | os.PathLike[str], output: str | os.PathLike[str], recipe: str | Recipe, *,
                  calibration: Sequence[str] | None = None, calibration_samples: int = 64, seq_len: int = 128,
                  source_id: str | None = None, source_revision: str | None = None,
                  target_modules: Sequence[str] | None = None, overwrite: bool = False,
                  packed: str | None = None) -> CompressedBase:
    """Compress a local transformers model (a causal LM, or an encoder such as BERT) and save it as a
    model folder of effective weights.

    The source is loaded in float32 from its safetensors (nothing is downloaded), compressed by
    ``compress_model_``, and saved with ``save_pretrained`` (float32 safetensors, which keep the
    effective values exactly) together with the source's tokenizer files and the descriptor
    ``compressed_base.json``. The folder is written beside ``output`` under a temporary name and
    renamed into place when complete: a failed or killed run leaves no ``output``.

    Args:
        source: the model folder.
        output: the folder to write (absent or empty unless ``overwrite``).
        recipe: a ``Recipe`` or its text, e.g. ``int4:g128``, ``nf4``, ``2:4+int4:g128``, ``wanda:0.5``.
        calibration: texts for recipes that score weights by activations (Wanda), tokenised with the
            source's tokenizer (``calibration_windows``); not used by other recipes.
        calibration_samples, seq_len: the number and length of calibration windows.
        source_id, source_revision: what ``derived_from`` names the source as (e.g. its Hub id).
        target_modules: see ``resolve_targets``; default every linear layer of the decoder blocks.
        overwrite: replace an existing ``output``.
        packed: ``compressed-tensors``: store the round-to-nearest codes packed with their scales
            (a compressed-tensors checkpoint, which transformers loads and dequantises to the same
            effective weights: ``compeft_format.hf_models.load_float_model``) instead of the
            effective float32 weights. The binding's fingerprint is that of the effective weights
            either way.

    Returns:
        The ``CompressedBase``, its binding's fingerprint that of the effective weights.

    Raises:
        FileNotFound: no source folder, or no folder to put ``output`` in.
        InputError: the source is not a loadable transformers folder with safetensors weights.
        InvalidArgument: a bad recipe or calibration, ``output`` exists and is not empty (with
            ``overwrite``: is not a compressed base, or holds the source).
        IOFailure: the output could not be written.
        and those of ``compress_model_``.
    """
    src = _source_folder(source)
    out = Path(output)
    recipe = _as_recipe(recipe)
    check_output(out, overwrite=overwrite, folder=True, inputs=[src], replaceable=_is_compressed_base)
    if packed is not None:
        if packed not in PACKED_FORMATS:
            raise InvalidArgument(f"packed format {packed!r} is not one of {list(PACKED_FORMATS)}")
        if not any(s.kind == "rtn" for s in recipe.steps):
            raise InvalidArgument(f"a packed base stores round-to-nearest codes; recipe {recipe.name} has none "
                                  "(int2 to int8, not nf4 or pruning alone)")
    if recipe.needs_calibration and calibration is None:
        raise InvalidArgument(f"recipe {recipe.name} scores weights by activations; pass calibration texts")
    source_fp = cf.fingerprint(src, FLOAT32)
    windows: torch.Tensor | None = None
    if recipe.needs_calibration:
        assert calibration is not None
        windows = calibration_windows(_load_tokenizer(src), calibration, calibration_samples, seq_len)
    model = _load_source(src)
    batches = None if windows is None else list(torch.split(windows, CALIBRATION_BATCH))
    stats = compress_model_(model, recipe, calibration_batches=batches, target_modules=target_modules)
    targets = tuple(stats["layers"])
    calib_sha = None if windows is None else calibration_sha256(windows)
    library, library_version_ = _library(recipe)
    params: dict[str, Any] = {"steps": [s.to_json() for s in recipe.steps], "target_modules":
                              None if target_modules is None else list(target_modules), "dtype": "float32"}
    if windows is not None:
        params.update(calibration_samples=int(windows.shape[0]), seq_len=int(windows.shape[1]))
    derived_from = ModelRef(id=source_id, revision=source_revision, fingerprint=source_fp)
    binding_recipe = {"name": recipe.name, "library": library, "library_version": library_version_,
                      "params": params, "calibration_sha256": calib_sha}

    bound: list[BaseBinding] = []
    effective_fp = cf.fingerprint(model, FLOAT32) if packed else None

    def fill(tmp: Path) -> None:
        packing = None
        try:
            if packed:
                packing = _save_compressed_tensors(model, targets, recipe, tmp)
            else:
                model.save_pretrained(tmp)
        except (ValueError, TypeError, RuntimeError, AttributeError) as e:
            raise UnsupportedModel(f"cannot save the compressed {type(model).__name__}"
                                   f"{' as ' + packed if packed else ''}: {' '.join(str(e).split())[:300]}") from None
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        fingerprint = effective_fp if effective_fp is not None else cf.fingerprint(tmp, FLOAT32)
        binding = BaseBinding(id=None, revision=None, fingerprint=fingerprint, derived_from=derived_from,
                              recipe=binding_recipe)
        descriptor = {
            "format": FORMAT,
            "version": VERSION,
            "binding": binding.to_json(),
            "recipe": recipe.to_json(),
            "target_modules": list(targets),
            "calibration": None if windows is None else {
                "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "sha256": calib_sha,
                "hashed": CALIBRATION_HASHED},
            "stats": stats,
            "libraries": _versions(recipe),
            **({"packed": packing} if packing else {}),
        }
        _write_descriptor(tmp, descriptor)
        bound.append(binding)

    try:
        atomic_folder(out, fill, replace=overwrite)
    except InvalidArgument:  # written meanwhile by another process
        check_output(out, overwrite=overwrite, folder=True, inputs=[src], replaceable=_is_compressed_base)
        raise
    return CompressedBase(out, bound[0], stats, recipe, targets)


def _save_compressed_tensors(model: Any, targets: Sequence[str], recipe: Recipe, folder: Path) -> dict[str, Any]:
    """Save ``model`` (its targets compressed by a round-to-nearest recipe) as a compressed-tensors
    checkpoint: the targets' integer codes packed (symmetric; ``pack-quantized``) or as int8 with
    zero points (asymmetric; ``naive-quantized``, which transformers loads back), their scales, and
    every other tensor as it is. Returns what the descriptor records of it."""
    step = next(s for s in recipe.steps if s.kind == "rtn")
    with quiet_imports():
        try:
            import compressed_tensors  # type: ignore[import-untyped]
            from compressed_tensors.compressors import ModelCompressor  # type: ignore[import-untyped]
            from compressed_tensors.quantization import (  # type: ignore[import-untyped]
                QuantizationArgs,
                QuantizationConfig,
                QuantizationScheme,
                apply_quantization_config,
            )
        except ImportError as e:
            raise UnsupportedModel(f"a packed base needs compressed-tensors, which cannot be imported here ({e}); "
                                   "install compeft[train]") from None
    p = step.params
    fmt = "pack-quantized" if p["symmetric"] else "naive-quantized"
    args = QuantizationArgs(num_bits=p["bits"], type="int", symmetric=p["symmetric"],
                            strategy="channel" if p["group"] is None else "group", group_size=p["group"])
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in set(targets)]
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=others))
    with torch.no_grad():
        for name in targets:
            layer: Any = model.get_submodule(name)
            scale, zero_point = getattr(layer, RTN_STATE)
            layer.weight_scale.copy_(scale.reshape(layer.weight_scale.shape))
            if zero_point is not None:
                layer.weight_zero_point.copy_(zero_point.reshape(layer.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    return {"format": "compressed-tensors", "quantization_format": fmt,
            "library_version": compressed_tensors.__version__}


def _is_compressed_base(folder: Path) -> bool:
    """A folder ``overwrite`` may replace: a compressed base written earlier."""
    return (folder / DESCRIPTOR).is_file()


def _write_descriptor(folder: Path, descriptor: Mapping[str, Any]) -> None:
    (folder / DESCRIPTOR).write_text(json.dumps(descriptor, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_compressed_base(path: str | os.PathLike[str], *, verify: bool = True) -> CompressedBase:
    """Read a compressed base's descriptor.

    Args:
        verify: recompute the fingerprint of the folder's weights and compare it with the recorded one.

    Raises:
        FileNotFound: no such folder or no descriptor in it.
        InputError: the descriptor is not one this library wrote.
        VersionError: the descriptor needs a newer library.
        BaseMismatch: ``verify`` and the weights are not the ones the descriptor records; ``expected``
            is the recorded binding, ``actual`` the fingerprint found, and the message names both.
    """
    p = Path(path)
    desc = p / DESCRIPTOR
    if not p.is_dir():
        raise FileNotFound(f"no such compressed base folder: {p}", path=str(p))
    if not desc.is_file():
        raise FileNotFound(f"{p} holds no {DESCRIPTOR}: it is not a compressed base", path=str(desc))
    try:
        obj = json.loads(desc.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{desc} is not readable JSON: {e}", path=str(desc)) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise InputError(f"{desc} is not a {FORMAT} descriptor", path=str(desc))
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InputError(f"{desc} has no integer version", path=str(desc))
    if version > VERSION:
        raise VersionError(f"{desc} is version {version}; this library reads up to {VERSION}", version=str(version))
    try:
        binding = BaseBinding.from_json(obj.get("binding"), "binding")
        recipe = Recipe.from_json(obj.get("recipe"))
    except CompeftError as e:
        raise InputError(f"{desc}: {e}", path=str(desc)) from None
    stats = obj.get("stats")
    targets = obj.get("target_modules")
    if binding.fingerprint is None or not isinstance(stats, dict) or not isinstance(targets, list) \
            or not all(isinstance(t, str) for t in targets):
        raise InputError(f"{desc} lacks the fingerprint, stats or target modules", path=str(desc))
    if verify:
        actual = cf.fingerprint(p, binding.fingerprint.algorithm)  # a packed folder: its dequantised weights
        if actual != binding.fingerprint:
            raise BaseMismatch(f"the weights in {p} are not the ones {DESCRIPTOR} records: fingerprint "
                               f"{actual.algorithm} {actual.value}, recorded {binding.fingerprint.value}",
                               expected=binding, actual=BaseBinding(fingerprint=actual))
    return CompressedBase(p, binding, stats, recipe, tuple(targets))


__all__ = ["DESCRIPTOR", "FORMAT", "VERSION", "CompressedBase", "compress_base", "load_compressed_base",
           "compress_model_", "resolve_targets", "decoder_blocks", "calibration_windows", "calibration_sha256"]
