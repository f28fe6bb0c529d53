"""Transformers model folders as plain float weights: which class a checkpoint loads with, and how
a packed checkpoint (compressed-tensors: integer codes and scales) is loaded dequantised, so that it
is fingerprinted, trained and adapted as the effective weights it stands for.

transformers is imported only by the functions that load a model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CompeftError, InputError

#: endings of the ``architectures`` a causal language model's config names
CAUSAL_LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")
#: ``quantization_config.quant_method`` of a packed checkpoint loaded dequantised
PACKED_METHOD = "compressed-tensors"


def declares_causal_lm(config: Any) -> bool:
    """Whether the config's ``architectures`` name a causal LM (``LlamaForCausalLM``)."""
    return any(str(a).endswith(CAUSAL_LM_ARCHITECTURES) for a in getattr(config, "architectures", None) or [])


def is_causal_lm(config: Any) -> bool:
    """Whether a checkpoint of ``config`` is a causal LM: its ``architectures`` name one, or name
    none (or a ``...ForConditionalGeneration``) and transformers has a causal LM for its type. A
    checkpoint naming a bare model or another head (``BertModel``, ``BertForMaskedLM``) is not."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if declares_causal_lm(config):
        return True
    names = [str(a) for a in getattr(config, "architectures", None) or []]
    if names and not any(a.endswith("ForConditionalGeneration") for a in names):
        return False
    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING


def is_packed(folder: str | os.PathLike[str]) -> bool:
    """Whether the model folder's ``config.json`` declares a compressed-tensors checkpoint."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == PACKED_METHOD


def dequantising_kwargs(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``from_pretrained`` needs to load the folder as plain float weights: for a packed
    checkpoint a config that dequantises every layer on load (peft then wraps them as any linear
    layer); nothing for other folders."""
    if not is_packed(folder):
        return {}
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def load_float_model(folder: str | os.PathLike[str]) -> Any:
    """The model in a folder, float32, packed layers dequantised: a causal LM when its config names
    one, else the bare model; nothing is downloaded.

    Raises:
        InputError: transformers cannot load it.
    """
    import torch

    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
        loaded: Any = auto.from_pretrained(folder, dtype=torch.float32, local_files_only=True, use_safetensors=True,
                                           output_loading_info=True, **dequantising_kwargs(folder))
        model, info = loaded
    except CompeftError:
        raise
    except Exception as e:  # noqa: BLE001 - a hostile config reaches many libraries' own errors
        raise InputError(f"cannot load the model in {folder}: {type(e).__name__}: {' '.join(str(e).split())[:300]}",
                         path=str(folder)) from None
    # the checkpoint's tensors and the model's must be the same: none made up, none dropped
    odd = {k: sorted(str(x) for x in info.get(k) or [])
           for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(odd.values()):
        shown = "; ".join(f"{k.replace('_', ' ')}: {v[:3]}" for k, v in odd.items() if v)
        raise InputError(f"the checkpoint in {folder} does not hold exactly the tensors of a {type(model).__name__} "
                         f"({shown})", path=str(folder))
    model.eval()
    return model


__all__ = ["CAUSAL_LM_ARCHITECTURES", "PACKED_METHOD", "declares_causal_lm", "is_causal_lm", "is_packed", "dequantising_kwargs",
           "load_float_model"]
