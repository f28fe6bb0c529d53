"""Apply a compressed adapter to a transformers model without writing a folder.

``load_adapter`` adds it as a named PEFT adapter (several can sit side by side; peft's
``set_adapter`` switches and ``delete_adapter`` removes them), on plain or quantised layers alike:
layer sizes are read as peft reads them (``in_features`` / ``out_features``), not from the weight,
whose stored shape a quantised layer changes. ``merge_adapter`` adds it into the base weights
(``W += scale * B @ A`` for LoRA, DoRA's renormalisation, ``W *= l`` for (IA)3, ``W += delta`` for
a full fine-tuning delta) and returns a handle whose ``unmerge`` restores the original weights
exactly; it refuses weights that are not plain float arrays (quantised layers) instead of merging
into them wrongly.

A recovery artifact (spec 3.6) is loaded as recovery modules (``recovery``): hooks beside the
model's linear layers, which ``recovery.get_recovery(model).remove()`` takes out again. They are
non-linear, so ``merge_adapter`` refuses them. An artifact that requires others (its ``requires``)
is applied after them: ``load_adapter`` finds each by its manifest digest among the paths given or
beside the artifact, and applies it unless the model holds it already.

Everything is checked before the model is touched: the modules the adapter targets exist, sizes
agree, the PEFT config agrees with the tensors, and, when the file records one, the base model's
fingerprint matches. A failed call leaves the model as it was, required artifacts it applied
taken out again.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import binding, requirements
from . import constants as C
from .dtypes import to_torch
from .errors import (
    ConfigMismatch,
    InvalidArgument,
    ModelMismatch,
    RequirementMissing,
    UnsupportedAdapter,
    UnsupportedModel,
)
from .manifest import Manifest, Requirement
from .peft_layout import AdapterLayout, base_model_of, lora_scaling, peft_config, peft_type
from .reader import CompeftFile
from .recovery import RecoveryHandle, add_recovery, get_recovery

PathLike = str | os.PathLike[str]


# --- the adapter's layout and the model's layers ----------------------------------------------------
def _layout(manifest: Manifest, *, deltas: bool = False) -> AdapterLayout:
    lay = AdapterLayout.of(((t.name, t.shape) for t in manifest.tensors), deltas=deltas)
    if lay.unsupported:
        kr = lay.unsupported[0]
        what = f"{kr.role.name} tensors" + (f" of a live model (adapter name {kr.adapter!r} in the key)" if kr.adapter else "")
        raise UnsupportedAdapter(f"tensor {kr.key!r}: {what} cannot be applied by this library; write the adapter out "
                                 "with compeft decompress and load that folder with peft (PeftModel.from_pretrained)")
    return lay


def _check_targets(peft_cfg: Any, lay: AdapterLayout) -> None:
    """Every module the file holds factors for must be one the config makes peft wrap."""
    from peft.tuners.tuners_utils import check_target_module_exists

    missed = sorted(p for p in list(lay.lora) + list(lay.ia3) if not check_target_module_exists(peft_cfg, p))
    if missed:
        raise ConfigMismatch(f"the config's target_modules leave out {len(missed)} module(s) the file has "
                             f"tensors for, e.g. {missed[0]}")


def _dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(first, second, from_weight) sizes of a layer as peft reads them: ``(out_features,
    in_features)`` where the layer declares them (``nn.Linear``, bitsandbytes, HQQ and torchao
    layers; ``outfeatures`` / ``infeatures`` for GPTQ), else the shape of a 2-D weight
    (transformers' ``Conv1D`` stores it as (in, out): ``from_weight`` is then True)."""
    layer = getattr(module, "base_layer", module)
    for out_name, in_name in (("out_features", "in_features"), ("outfeatures", "infeatures")):
        out_f, in_f = getattr(layer, out_name, None), getattr(layer, in_name, None)
        if isinstance(out_f, int) and isinstance(in_f, int):
            return out_f, in_f, False
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        shape = getattr(weight, "ds_shape", weight.shape)
        return int(shape[0]), int(shape[1]), True
    return None


def _lora_dims(module: nn.Module, config: Mapping[str, Any] | None) -> tuple[int, int, bool] | None:
    """(out, in, transposed): a weight stored (in, out) under ``fan_in_fan_out`` is transposed."""
    dims = _dims(module)
    if dims is None:
        return None
    first, second, from_weight = dims
    if from_weight and config and config.get("fan_in_fan_out"):
        return second, first, True
    return first, second, False


def _check_model(base: nn.Module, lay: AdapterLayout, config: Mapping[str, Any] | None) -> None:
    """Raise ModelMismatch / ConfigMismatch before anything is changed."""
    modules = dict(base.named_modules())
    params = dict(base.named_parameters())
    missing = sorted({p for p in list(lay.lora) + list(lay.ia3) if p not in modules}
                     | {p for p in lay.full if p not in params})
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelMismatch(f"the model lacks {len(missing)} module(s) the adapter targets: {shown}", modules=missing)
    problems: list[str] = []
    where: list[str] = []

    def problem(module: str, text: str) -> None:
        where.append(module)
        problems.append(text)

    for path, parts in lay.lora.items():
        dims = _lora_dims(modules[path], config)
        if dims is None:
            problem(path, f"{path} is not a linear layer")
            continue
        out_f, in_f, _ = dims
        a, b = parts.get("lora_A"), parts.get("lora_B")
        if a is None or b is None:
            raise ConfigMismatch(f"{path} has only one of lora_A / lora_B")
        if a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            problem(path, f"{path}: lora_A {a} and lora_B {b} do not fit a {out_f}x{in_f} layer")
        elif "magnitude" in parts and parts["magnitude"] != (out_f,):
            problem(path, f"{path}: DoRA magnitude {parts['magnitude']} does not fit {out_f} outputs")
        if config is not None:
            lora_scaling(config, path, a[0])
    for path, shape in lay.ia3.items():
        d = _dims(modules[path])
        if d is None or shape not in ((d[0], 1), (1, d[1])):
            problem(path, f"{path}: (IA)3 vector {shape} does not fit the layer")
    for name, shape in lay.full.items():
        if tuple(params[name].shape) != shape:
            problem(name, f"{name}: stored {shape}, model has {tuple(params[name].shape)}")
    if problems:
        raise ModelMismatch("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""),
                            modules=where)


def _plain_weight(params: Mapping[str, nn.Parameter], name: str, shape: tuple[int, ...]) -> nn.Parameter | None:
    """The parameter ``name`` when it is a plain float array of ``shape``, which a merge can add
    to; None for anything else (absent, or quantised: packed bytes, tensor subclasses)."""
    p = params.get(name)
    if p is None or type(p) not in (nn.Parameter, torch.Tensor) or type(p.data) is not torch.Tensor:
        return None
    if not p.is_floating_point() or tuple(p.shape) != tuple(shape):
        return None
    return p


def _check_base(model: nn.Module, manifest: Manifest) -> None:
    if manifest.base_model.fingerprint is not None:
        binding.check(manifest.base_model, model, subject="the adapter")


class _BaseCheck:
    """The base check of one ``load_adapter`` call: the model's weights are fingerprinted once
    for the artifact and every artifact it requires (recovery modules and adapters are not base
    weights, so applying one does not change the fingerprint). Disabled, it notes the artifacts
    whose recorded fingerprint it did not check."""

    def __init__(self, model: nn.Module, enabled: bool) -> None:
        self.model = model
        self.enabled = enabled
        self.unchecked: list[str] = []
        self._weights: binding.BaseWeights | None = None

    def __call__(self, manifest: Manifest, subject: str) -> None:
        if manifest.base_model.fingerprint is None:
            return
        if not self.enabled:
            self.unchecked.append(subject)
            return
        if self._weights is None:
            self._weights = binding.BaseWeights(self.model)
        binding.check(manifest.base_model, self._weights, subject=subject)


def _unchecked_warning(paths: Sequence[str]) -> None:
    warnings.warn(f"check_base=False: {', '.join(paths)} applied without checking that the model is the base "
                  f"{'it was' if len(paths) == 1 else 'they were'} made for", stacklevel=3)


def _holds(model: nn.Module, req: Requirement) -> bool:
    """The model holds the artifact ``req`` names already (recovery modules loaded from it)."""
    handle = get_recovery(model) if req.kind == C.ADAPTER_KIND_RECOVERY else None
    return handle is not None and handle.source == req.manifest_sha256


@dataclass(frozen=True)
class _Options:
    adapter_name: str
    candidates: tuple[Path, ...]
    device: str | torch.device | None
    dtype: str | torch.dtype | None
    activate: bool
    is_trainable: bool
    base_check: _BaseCheck


# --- public -------------------------------------------------------------------------------------
def load_adapter(model: Any, path: PathLike, *, adapter_name: str = "default", requires: Sequence[PathLike] = (),
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 activate: bool = True, is_trainable: bool = False, check_base: bool = True) -> Any:
    """Load a compressed artifact into ``model``: a PEFT adapter as the adapter
    ``adapter_name``, a recovery artifact as recovery modules (spec 3.6); before it, every
    artifact it requires.

    Args:
        model: a transformers model (its layers may be quantised ones peft supports), or a
            ``peft.PeftModel`` that already holds other adapters.
        path: the compressed file, or a compeft repository on the Hub (``namespace/name[@rev]``,
            ``hf://namespace/name[@rev]/FILE``; pulled and verified first, ``hub.source``).
        requires: files among which to find the artifacts ``path`` requires (spec 3.6); one not
            among them is looked for beside ``path`` (``requirements.find``). An artifact the model
            holds already is not applied again.
        device: where the packed streams are decoded (default: the model's device).
        dtype: dtype of the decoded tensors (default: the file's target dtypes); recovery modules
            get their parameters in it.
        activate: make it the active adapter.
        is_trainable: the adapter's (or recovery modules') parameters are trainable.
        check_base: compare the base fingerprint each file records, when it has one, with the
            model; False skips that, with a warning naming the files whose fingerprint was not
            checked.

    Returns:
        The ``PeftModel`` (``model`` itself when it already was one); for a recovery artifact,
        ``model`` as given (``recovery.get_recovery(model)`` has its modules).

    Raises:
        UnsupportedAdapter, ModelMismatch, ConfigMismatch, BaseMismatch, InvalidArgument,
        RequirementMissing (an artifact it requires is not found), and the file errors of
        ``open_file``; the model is unchanged when any is raised.
    """
    opts = _Options(adapter_name=adapter_name, candidates=tuple(Path(p) for p in requires), device=device,
                    dtype=dtype, activate=activate, is_trainable=is_trainable, base_check=_BaseCheck(model, check_base))
    result, _ = _load(model, _local_file(path), opts, chain=())
    if opts.base_check.unchecked:
        _unchecked_warning(opts.base_check.unchecked)
    return result


def _local_file(path: PathLike) -> Path:
    """``path``, or the one verified artifact of the Hub repository it names (``hub.source``)."""
    from .hub import source

    ref = source.parse(path)
    if ref is None:
        return Path(path)
    found = source.artifacts(ref)
    if len(found) != 1:
        raise InvalidArgument(f"{ref} holds {len(found)} artifacts ({', '.join(p.name for p in found)}): name one, "
                              f"hf://{ref.repo_id}@{ref.revision}/FILE")
    return found[0]


def _load(model: Any, path: Path, opts: _Options, *, chain: tuple[str, ...],
          required: Requirement | None = None) -> tuple[Any, list[RecoveryHandle]]:
    """Apply the artifact at ``path`` after what it requires; ``required`` is the requirement it
    was found for. Returns the model and the recovery modules this call added."""
    with CompeftFile(path) as f:
        m = f.manifest
        digest = f.metadata[C.META_MANIFEST_SHA256]
        if required is not None:
            if m.adapter.kind != required.kind:
                raise RequirementMissing(f"{path} has the manifest sha256 of the required {required.kind} artifact "
                                         f"but is a {m.adapter.kind} artifact", manifest_sha256=digest,
                                         kind=required.kind, name=required.name, path=str(path))
            if m.adapter.kind != C.ADAPTER_KIND_RECOVERY:
                raise UnsupportedAdapter(f"{path} is required, and this library applies required artifacts of kind "
                                         f"{C.ADAPTER_KIND_RECOVERY} only, not {m.adapter.kind}; apply it first")
        if digest in chain:
            raise InvalidArgument(f"{path}: the artifacts' requirements form a cycle")
        plan = [(req, requirements.find(req, candidates=opts.candidates, folder=path.parent))
                for req in m.requires if not _holds(model, req)]
        added: list[RecoveryHandle] = []
        try:
            for req, found in plan:
                if not _holds(model, req):  # an earlier requirement may have brought it
                    _, more = _load(model, found, opts, chain=chain + (digest,), required=req)
                    added += more
            if m.adapter.kind == C.ADAPTER_KIND_RECOVERY:
                added.append(_load_recovery(model, f, digest, opts))
                return model, added
            return _load_peft(model, f, opts), added
        except BaseException:
            for handle in reversed(added):
                handle.remove()
            raise


def _load_recovery(model: Any, f: CompeftFile, digest: str, opts: _Options) -> RecoveryHandle:
    """Recovery modules beside the layers a recovery artifact names, holding its tensors."""
    m = f.manifest
    config = m.adapter.recovery
    assert config is not None  # a recovery artifact without it does not open
    if config.activation not in C.RECOVERY_ACTIVATIONS:
        raise UnsupportedAdapter(f"{f.path}: recovery activation {config.activation!r} is not one this library "
                                 f"applies ({list(C.RECOVERY_ACTIVATIONS)})")
    held = get_recovery(model)
    if held is not None:
        raise InvalidArgument("the model holds recovery modules already ("
                              + (f"loaded from manifest sha256 {held.source}" if held.source else "made by add_recovery")
                              + f"); {f.path} has manifest sha256 {digest}: remove them first "
                              "(recovery.get_recovery(model).remove())")
    opts.base_check(m, str(f.path))
    base = base_model_of(model)
    target = opts.device if opts.device is not None else next(base.parameters()).device
    dtype = to_torch(opts.dtype) if opts.dtype is not None else to_torch(m.tensors[0].dtype) if m.tensors else None
    handle = add_recovery(model, config, init=False, dtype=dtype)
    try:
        handle.load_state_dict(f.state_dict(dtype=opts.dtype, device=target))
    except BaseException:
        handle.remove()
        raise
    handle.modules.source = digest
    handle.modules.requires_grad_(opts.is_trainable)
    return handle


def _load_peft(model: Any, f: CompeftFile, opts: _Options) -> Any:
    """A PEFT adapter added to ``model`` as ``opts.adapter_name``."""
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    adapter_name = opts.adapter_name
    m = f.manifest
    config = m.adapter.peft_config
    ptype = peft_type(config)
    if config is None or ptype is None or not ptype.loadable:
        kind = None if config is None else config.get("peft_type")
        raise UnsupportedAdapter(f"cannot load a {kind or 'non-PEFT'} adapter as a PEFT adapter"
                                 + ("; use merge_adapter" if config is None else ""))
    if isinstance(model, PeftModel) and adapter_name in model.peft_config:
        raise InvalidArgument(f"the model already has an adapter named {adapter_name!r}")
    if isinstance(model, PeftModel):
        types = sorted({str(getattr(c.peft_type, "value", c.peft_type)) for c in model.peft_config.values()})
        if types and types != [str(config.get("peft_type"))]:
            raise UnsupportedAdapter(f"{f.path} is a {config.get('peft_type')} adapter and the model holds "
                                     f"{', '.join(types)} adapter(s): peft keeps adapters of one type in a PeftModel; "
                                     "load it into another copy of the base model")
    base = base_model_of(model)
    lay = _layout(m)
    _check_model(base, lay, config)
    opts.base_check(m, str(f.path))
    peft_cfg = peft_config(config, inference_mode=not opts.is_trainable)
    _check_targets(peft_cfg, lay)
    target = opts.device if opts.device is not None else next(base.parameters()).device
    tensors = f.state_dict(dtype=opts.dtype, device=target)
    # peft freezes every parameter that is not its own; recovery modules keep their setting
    held = get_recovery(model)
    trainable = [(p, p.requires_grad) for p in held.modules.parameters()] if held is not None else []
    was_peft = isinstance(model, PeftModel)
    wrapped: Any
    if was_peft:
        model.add_adapter(adapter_name, peft_cfg)
        wrapped = model
    else:
        wrapped = get_peft_model(model, peft_cfg, adapter_name=adapter_name)
    try:
        result = set_peft_model_state_dict(wrapped, tensors, adapter_name=adapter_name)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ConfigMismatch(f"peft did not place {len(unexpected)} tensor(s), e.g. {unexpected[0]}")
    except BaseException:  # take the half-added adapter out again
        if was_peft:
            wrapped.delete_adapter(adapter_name)
        else:
            wrapped.unload()
        raise
    finally:
        for p, flag in trainable:
            p.requires_grad_(flag)
    if opts.activate:
        wrapped.set_adapter(adapter_name)
    return wrapped


#: the attribute of a model that lists the adapters merged into it, oldest first
MERGED_ATTR = "_compeft_merged"


@dataclass
class MergedAdapter:
    """Handle of a merged adapter: ``unmerge()`` puts the weights back as they were before the
    merge, bit for bit. Adapters merged later into the same weights must be unmerged first (the
    weights they left would otherwise be lost)."""

    model: nn.Module = field(repr=False)
    originals: dict[str, torch.Tensor] = field(repr=False)
    #: the file's ``compeft.manifest_sha256``
    source: str = ""
    path: str = ""

    @property
    def merged(self) -> bool:
        return any(h is self for h in merged_adapters(self.model))

    def unmerge(self) -> None:
        """Restore the weights; a no-op once done.

        Raises:
            InvalidArgument: an adapter merged after this one changed some of the same weights and
                is still merged (unmerge it first).
        """
        stack = merged_adapters(self.model)
        if not any(h is self for h in stack):
            return
        later = stack[next(i for i, h in enumerate(stack) if h is self) + 1:]
        blocking = [h.path or h.source for h in later if set(h.originals) & set(self.originals)]
        if blocking:
            raise InvalidArgument(f"{self.path or 'this adapter'} cannot be unmerged before the adapters merged after "
                                  f"it into the same weights: unmerge {', '.join(reversed(blocking))} first")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, original in self.originals.items():
                params[name].copy_(original)
        self.originals = {}
        stack.remove(self)


def merged_adapters(model: nn.Module) -> list[MergedAdapter]:
    """The adapters merged into ``model`` by ``merge_adapter`` and not unmerged, oldest first."""
    stack = model.__dict__.get(MERGED_ATTR)
    if stack is None:
        stack = []
        model.__dict__[MERGED_ATTR] = stack
    return stack


def merge_adapter(model: nn.Module, path: PathLike, *, scale: float = 1.0, check_base: bool = True) -> MergedAdapter:
    """Merge a compressed adapter into the weights of a (non-PEFT) transformers model.

    LoRA: ``W += scale * s * B @ A`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA,
    rank_pattern / alpha_pattern honoured), then DoRA's per-row renormalisation to the stored
    magnitudes; (IA)3: ``W *= l``; a full fine-tuning delta: ``W += scale * delta``;
    ``modules_to_save`` weights replace the model's. All new weights are computed before any is
    written. An artifact that requires others (spec 3.6) merges into a model that holds them
    (``load_adapter`` applies them); ``check_base=False`` skips the base check, with a warning
    when the file records a fingerprint.

    Raises:
        UnsupportedModel: a weight to merge into is not a plain float array (a quantised layer).
        UnsupportedAdapter: a recovery artifact (non-linear: it cannot be merged), or an adapter
            type that cannot be merged.
        RequirementMissing: the model does not hold an artifact the file requires.
        ModelMismatch, ConfigMismatch, BaseMismatch, InvalidArgument, and the file errors of
        ``open_file``; the model is unchanged when any is raised.
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise InvalidArgument(f"scale must be a finite number, got {scale!r}")
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise UnsupportedModel("merge_adapter merges into a plain transformers model's weights; this is a "
                               "peft.PeftModel: merge into its base (model.get_base_model(), after unloading its own "
                               "adapters with model.unload()), or apply the file beside its adapters with load_adapter")
    with CompeftFile(path) as f:
        m = f.manifest
        digest = f.metadata[C.META_MANIFEST_SHA256]
        again = [h for h in merged_adapters(model) if h.source == digest]
        if again:
            raise InvalidArgument(f"{path} is merged into this model already (as {again[0].path}); merging it twice "
                                  "would add its update twice: unmerge it first, or merge once with scale=2")
        config = m.adapter.peft_config
        ptype = peft_type(config)
        if m.adapter.kind == C.ADAPTER_KIND_RECOVERY:
            raise UnsupportedAdapter(f"{path} is a recovery artifact: its modules are non-linear and cannot be merged "
                                     "into weights; apply it with load_adapter")
        missing = [req for req in m.requires if not _holds(model, req)]
        if missing:
            req = missing[0]
            raise RequirementMissing(f"{path} requires the {req.kind} artifact {req.name or ''} (manifest sha256 "
                                     f"{req.manifest_sha256}), which the model does not hold; apply it first with "
                                     "load_adapter", manifest_sha256=req.manifest_sha256, kind=req.kind, name=req.name)
        if m.adapter.representation == C.REPRESENTATION_DELTA:
            lay = _layout(m, deltas=True)
        elif ptype is not None and ptype.loadable:
            lay = _layout(m)
        else:
            raise UnsupportedAdapter("only LoRA, (IA)3 and full fine-tuning deltas can be merged")
        if lay.ia3 and scale != 1.0:
            raise InvalidArgument("an (IA)3 adapter merges with scale 1 only")
        _check_model(model, lay, config)
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        targets: dict[str, tuple[int, ...]] = {}
        transposed: dict[str, bool] = {}
        for mod in lay.lora:
            out_f, in_f, transposed[mod] = _lora_dims(modules[mod], config) or (0, 0, False)
            targets[f"{mod}.weight"] = (in_f, out_f) if transposed[mod] else (out_f, in_f)
        for mod in lay.ia3:
            d = _dims(modules[mod])
            targets[f"{mod}.weight"] = (d[0], d[1]) if d else ()
        targets.update(lay.full)
        quantised = sorted(n for n, shape in targets.items() if _plain_weight(params, n, shape) is None)
        if quantised:
            raise UnsupportedModel(f"cannot merge into {len(quantised)} weight(s) that are not plain float arrays "
                                   f"(quantised layers), e.g. {quantised[0]} "
                                   f"({type(modules.get(quantised[0].rsplit('.', 1)[0])).__name__}); "
                                   "use load_adapter to apply the adapter beside them", modules=quantised)
        if check_base:
            _check_base(model, m)
        elif m.base_model.fingerprint is not None:
            _unchecked_warning([str(path)])
        device = next(model.parameters()).device
        tensors = f.state_dict(dtype=torch.float32, device=device)

    by_target: dict[str, dict[str, torch.Tensor]] = {}
    for key, kr in lay.keys.items():
        target = kr.module if kr.role.apply in ("lora", "ia3") else (kr.key if m.adapter.representation ==
                                                                      C.REPRESENTATION_DELTA else kr.parameter)
        by_target.setdefault(target, {})[kr.role.name] = tensors[key]
    new: dict[str, torch.Tensor] = {}

    def current(name: str) -> torch.Tensor:
        """The weight as merged so far, in float32."""
        return new[name] if name in new else params[name].to(torch.float32)

    with torch.no_grad():
        # weights the file stores whole come first: a LoRA on lm_head or the embeddings goes on top
        # of the layer's own weight that peft saved beside it (save_embedding_layers)
        for name in lay.full:
            stored = next(iter(by_target[name].values()))
            if m.adapter.representation == C.REPRESENTATION_DELTA:
                new[name] = params[name].to(torch.float32) + scale * stored
            else:
                new[name] = stored
        for mod in lay.lora:
            name = f"{mod}.weight"
            assert config is not None
            # in the (out, in) orientation, which a Conv1D weight (fan_in_fan_out) stores transposed
            w = current(name)
            w = w.T if transposed[mod] else w
            a, b = by_target[mod]["lora_A"], by_target[mod]["lora_B"]
            merged = w + scale * lora_scaling(config, mod, a.shape[0]) * (b @ a)
            if "magnitude" in by_target[mod]:  # DoRA: each output row renormalised to its magnitude
                norm = merged.norm(p=2, dim=1)
                merged = merged * (by_target[mod]["magnitude"] / norm).unsqueeze(1)
            new[name] = merged.T if transposed[mod] else merged
        for mod in lay.ia3:
            name = f"{mod}.weight"
            new[name] = current(name) * by_target[mod]["ia3"]
        originals = {name: params[name].detach().clone() for name in new}
        for name, value in new.items():
            params[name].copy_(value.to(params[name].dtype))
    handle = MergedAdapter(model=model, originals=originals, source=digest, path=str(path))
    merged_adapters(model).append(handle)
    return handle


__all__ = ["load_adapter", "merge_adapter", "MergedAdapter", "merged_adapters"]
