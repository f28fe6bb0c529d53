"""Choose alpha (and, under a byte budget, the density) by a model's loss on calibration text.

The selection of kept entries does not depend on alpha, so each density is compressed once and
only the scales change between candidates. Each candidate's tensors are put into one PEFT model
(the adapter's own config) and scored by the mean next-token loss over the calibration text; the
lowest loss wins. Needs ``transformers`` and ``peft`` (the ``train`` extra).
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import constants as C
from .compress import CompeftConfig, compress, rescale, search_alpha
from .compressed import CompressedAdapter
from .errors import FileNotFound, InputError, InvalidArgument
from .fileio import PathLike
from .peft_layout import peft_config as make_peft_config
from .writer import WriterOptions, save

#: alpha grids: around the fitted scale (1 is the least-squares fit), and the paper's for sigma
FIT_ALPHAS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
PAPER_ALPHAS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0)
#: densities tried under a byte budget
BUDGET_DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
MAX_TEXT_BYTES = 64 << 20


@dataclass
class Calibration:
    """What ``calibrate`` chose and what it measured (losses are mean next-token cross-entropy)."""

    adapter: CompressedAdapter
    density: float
    alpha: float
    loss: float
    base_loss: float
    adapter_loss: float
    #: (density, alpha) -> loss of every candidate
    losses: dict[tuple[float, float], float] = field(default_factory=dict)
    #: density -> file bytes, for the densities measured against a budget
    sizes: dict[float, int] = field(default_factory=dict)

    @property
    def gain_kept(self) -> float | None:
        """Share of the adapter's loss improvement over the base model that the choice keeps."""
        gain = self.base_loss - self.adapter_loss
        return (self.base_loss - self.loss) / gain if gain > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {"density": self.density, "alpha": self.alpha, "loss": self.loss, "base_loss": self.base_loss,
                "adapter_loss": self.adapter_loss, "gain_kept": self.gain_kept,
                "candidates": [{"density": d, "alpha": a, "loss": v} for (d, a), v in self.losses.items()],
                "sizes": {str(d): n for d, n in self.sizes.items()}}


def read_texts(path: PathLike, max_samples: int = 256) -> list[str]:
    """Calibration text: a ``.jsonl`` file (each line an object with a string ``text``) or plain
    text (paragraphs separated by blank lines; one paragraph per line when there are none).

    Raises:
        FileNotFound, InputError: unreadable, not UTF-8, malformed JSON lines, or no text.
    """
    p = Path(path)
    try:
        if p.stat().st_size > MAX_TEXT_BYTES:
            raise InputError(f"{p}: calibration data over {MAX_TEXT_BYTES >> 20} MiB; give a sample")
        raw = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFound(f"{p}: no such file") from None
    except UnicodeDecodeError:
        raise InputError(f"{p}: calibration data is not UTF-8 text") from None
    texts: list[str] = []
    if p.suffix == ".jsonl":
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise InputError(f"{p}:{i}: not JSON ({getattr(e, 'msg', 'too deep or too long')})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise InputError(f"{p}:{i}: each line must be an object with a string 'text'")
            texts.append(obj["text"])
    else:
        parts = [t.strip() for t in raw.split("\n\n")]
        texts = parts if len([t for t in parts if t]) > 1 else raw.splitlines()
    texts = [t for t in texts if t.strip()][:max_samples]
    if not texts:
        raise InputError(f"{p}: no calibration text")
    return texts


class LossMeter:
    """Mean next-token loss of a causal LM over fixed token batches."""

    def __init__(self, model: Any, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 256, batch: int = 8):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = [tokenizer(t, truncation=True, max_length=seq_len)["input_ids"] for t in texts]
        enc = sorted((e for e in enc if len(e) > 1), key=len)
        if not enc:
            raise InputError("the calibration text is too short: no sample has two tokens")
        self.model = model
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for s in range(0, len(enc), batch):
            chunk = enc[s:s + batch]
            n = max(len(e) for e in chunk)
            ids = torch.full((len(chunk), n), int(tokenizer.pad_token_id))
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for i, e in enumerate(chunk):
                ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), 1
            self.batches.append((ids, mask, ids.masked_fill(mask == 0, -100)))
        self.tokens = sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in self.batches)

    @torch.inference_mode()
    def __call__(self) -> float:
        self.model.eval()
        total = 0.0
        device = next(self.model.parameters()).device
        for ids, mask, labels in self.batches:
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device),
                ignore_index=-100, reduction="sum"))
        return total / self.tokens


def load_causal_lm(path: PathLike, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """A local transformers causal LM and its tokenizer (nothing is downloaded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: not a model folder (config.json, weights and tokenizer)")
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
        model: Any = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{p}: cannot load a causal language model: {str(e).splitlines()[0]}") from None
    model.to(device)
    return model, tok


def _file_bytes(adapter: CompressedAdapter, options: WriterOptions | None) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "size.cpeft.safetensors"
        save(adapter, path, options)
        return path.stat().st_size


def calibrate(
    state_dict: Mapping[str, torch.Tensor],
    peft_config: Mapping[str, Any],
    model: Any,
    meter: Callable[[], float],
    config: CompeftConfig | None = None,
    *,
    alphas: Sequence[float] | None = None,
    densities: Sequence[float] | None = None,
    max_bytes: int | None = None,
    writer_options: WriterOptions | None = None,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
    compressor: Callable[[CompeftConfig], CompressedAdapter] | None = None,
    exhaustive: bool = False,
    **compress_args: Any,
) -> Calibration:
    """Compress ``state_dict`` with the alpha (and density) whose loss ``meter()`` finds lowest.

    Args:
        state_dict, peft_config: the adapter (a PEFT state dict and its config).
        model: the base model (not wrapped by peft); it is wrapped here and unwrapped at the end.
        meter: returns the loss of ``model`` as it is when called.
        config: the method; its density is used unless ``max_bytes`` is given.
        alphas: the grid (default ``FIT_ALPHAS``, or ``PAPER_ALPHAS`` for ``scale="sigma"``).
        densities, max_bytes: with a budget, every density of ``densities`` (default
            ``BUDGET_DENSITIES``) whose file fits in ``max_bytes`` is tried.
        progress: wraps the candidate loop (a progress bar), given the iterable and its length
            (an upper bound: the search stops at the best alpha of each density).
        exhaustive: measure every alpha of the grid instead of walking downhill from alpha 1
            (``search_alpha``); each density after the first starts at the previous one's best.
        compressor: makes the compressed adapter for a config (default: ``compress`` of
            ``state_dict`` with ``peft_config`` and ``compress_args``: ``base``, ``source``, ...).

    Raises:
        InvalidArgument: an empty grid, or no density fits the budget.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    cfg = config or CompeftConfig()
    grid = tuple(alphas) if alphas else (PAPER_ALPHAS if cfg.scale == C.SCALE_SIGMA else FIT_ALPHAS)
    if any(not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0) for a in grid):
        raise InvalidArgument(f"alphas must be finite numbers > 0, got {list(grid)}")
    if max_bytes is not None and max_bytes <= 0:
        raise InvalidArgument(f"max_bytes must be > 0, got {max_bytes}")
    compressed: dict[float, CompressedAdapter] = {}
    sizes: dict[float, int] = {}
    for d in (sorted(densities or BUDGET_DENSITIES) if max_bytes is not None else [cfg.density]):
        one = cfg.replace(density=float(d), alpha=1.0)
        ca = compressor(one) if compressor else compress(state_dict, one, peft_config=peft_config, **compress_args)
        if max_bytes is not None:
            sizes[float(d)] = _file_bytes(ca, writer_options)
            if sizes[float(d)] > max_bytes:
                break  # larger densities make larger files
        compressed[float(d)] = ca
    if not compressed:
        raise InvalidArgument(f"no density fits in {max_bytes:,} bytes: the smallest file tried "
                              f"(density {min(sizes)}) has {sizes[min(sizes)]:,}")

    pm = get_peft_model(model, make_peft_config(dict(peft_config), inference_mode=True))
    try:
        with pm.disable_adapter():
            base_loss = meter()
        set_peft_model_state_dict(pm, dict(state_dict))
        adapter_loss = meter()
        losses: dict[tuple[float, float], float] = {}
        ticks = iter(progress(range(len(compressed) * len(grid)), len(compressed) * len(grid)) if progress else ())

        def measure(d: float, a: float) -> float:
            set_peft_model_state_dict(pm, rescale(compressed[d], a).state_dict(torch.float32))
            losses[(d, a)] = meter()
            next(ticks, None)
            return losses[(d, a)]

        start = 1.0
        for d in compressed:
            start, _ = search_alpha(functools.partial(measure, d), grid, start, exhaustive)
        for _ in ticks:  # let a progress bar finish
            pass
    finally:
        pm.unload()
    ranked = sorted(losses, key=lambda k: (losses[k] if math.isfinite(losses[k]) else math.inf, k[0],
                                           abs(math.log(k[1]))))
    for d, a in ranked:  # the scales change the manifest's bytes a little: check the final file
        chosen = rescale(compressed[d], a)
        if max_bytes is None:
            break
        size = _file_bytes(chosen, writer_options)
        if size <= max_bytes:
            sizes[d] = size
            break
    else:
        raise InvalidArgument(f"no candidate fits in {max_bytes:,} bytes once its scales are set")
    return Calibration(chosen, d, a, losses[(d, a)], base_loss, adapter_loss, losses, sizes)


__all__ = ["Calibration", "calibrate", "read_texts", "LossMeter", "load_causal_lm", "FIT_ALPHAS", "PAPER_ALPHAS",
           "BUDGET_DENSITIES"]
