from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"

settings.register_profile("default", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("default")

# Without a GPU the Triton decode kernels run in Triton's interpreter (read when they are compiled).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _backends() -> list[str]:
    from compeft_format.codecs import native

    return ["native"] + [f"native-{isa}" for isa in native.isas()[:-1]] + ["torch"]


@pytest.fixture(params=_backends())
def backend(request, monkeypatch):
    """Run a test with the C decoders (``native``: the widest instruction set the CPU runs;
    ``native-<isa>``: each narrower one it also runs) and with the torch decoders that every other
    device uses (``torch``). ``make test`` sets COMPEFT_REQUIRE_NATIVE=1, so there a missing
    extension fails instead of skipping."""
    from compeft_format.codecs import native

    if request.param.startswith("native") and not native.built():
        if os.environ.get("COMPEFT_REQUIRE_NATIVE") == "1":
            pytest.fail("compeft_format._native is not built")
        pytest.skip("compeft_format._native is not built (no C compiler at install)")
    monkeypatch.setenv("COMPEFT_NATIVE", "0" if request.param == "torch" else "1")
    if request.param.startswith("native-"):
        with native.use_isa(request.param.removeprefix("native-")):
            yield request.param
    else:
        yield request.param


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit pattern (so -0 != +0 and NaN payloads count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


shapes = st.one_of(
    st.just(()),
    st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple),
    st.tuples(st.integers(1, 70), st.integers(1, 13)),
)


@st.composite
def tensors(draw, shape=None, dtype=None, ties: bool | None = None):
    shape = draw(shapes) if shape is None else shape
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    n = math.prod(shape)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    tie_mode = draw(st.booleans()) if ties is None else ties
    if tie_mode:  # few distinct magnitudes: many ties, some exact zeros
        a = rng.integers(-3, 4, size=n).astype(np.float32) * 0.25
    else:
        a = rng.standard_normal(n).astype(np.float32)
    return torch.from_numpy(a.reshape(shape)).to(dtype)


@st.composite
def state_dicts(draw, max_tensors: int = 4):
    k = draw(st.integers(1, max_tensors))
    names = draw(st.lists(st.text("abcxyz._", min_size=1, max_size=6), min_size=k, max_size=k, unique=True))
    return {n: draw(tensors()) for n in names}


@pytest.fixture
def tmp_file(tmp_path):
    return tmp_path / "a.cpeft.safetensors"


def save_tiny_causal_lm(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama built from a config, with a byte-level tokenizer (256 tokens), saved as a
    transformers folder: a base model for calibration that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    tok.pad_token = tok.eos_token = alphabet[0]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


#: the label words of ``write_task``
TASK_WORDS = ["alpha", "beta", "gamma", "delta"]


def write_task(path: Path, n: int, seed: int = 0) -> Path:
    """A learnable JSON Lines task of ``n`` prompt/completion pairs: the completion is the word the
    prompt's last letter points to."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            k = rng.randrange(len(TASK_WORDS))
            f.write(json.dumps({"prompt": f"{rng.randrange(1000)} {'abcd'[k]}:", "completion": f" {TASK_WORDS[k]}"}) + "\n")
    return path


def run_in_threads(work, n: int = 8) -> list[BaseException]:
    """Run ``work(i)`` for i in range(n) on n threads at once; the exceptions they raised."""
    import threading

    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


#: the words of ``save_tiny_bert``'s vocabulary: three positive, three negative, then fillers
CLASS_WORDS = ["good", "great", "fine", "bad", "awful", "poor"] + [f"w{i}" for i in range(40)]


def save_tiny_bert(path: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (``BertModel``, no head) built from a config, with a word-level
    tokenizer that adds ``[CLS]``/``[SEP]``, saved as a transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + CLASS_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_classes(path: Path, n: int, seed: int = 0) -> Path:
    """A JSON Lines sentiment task of ``n`` {"text", "label"} lines: five filler words and one
    word that gives the label (``pos`` or ``neg``)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            y = rng.randrange(2)
            words = [rng.choice(CLASS_WORDS[6:]) for _ in range(5)]
            words.insert(rng.randrange(6), rng.choice(CLASS_WORDS[:3] if y else CLASS_WORDS[3:6]))
            f.write(json.dumps({"text": " ".join(words), "label": ["neg", "pos"][y]}) + "\n")
    return path


def write_lora_folder(path: Path, *, layers: int, dim: int, seed: int = 0) -> Path:
    """A PEFT LoRA folder (r=8 on q_proj and v_proj of ``layers`` layers of width ``dim``, fp16,
    factors * 0.02) for a base named org/tiny."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    path.mkdir()
    sd = {}
    for i in range(layers):
        for p in ("q_proj", "v_proj"):
            pre = f"base_model.model.model.layers.{i}.self_attn.{p}"
            sd[f"{pre}.lora_A.weight"] = torch.randn(8, dim, dtype=torch.float16) * 0.02
            sd[f"{pre}.lora_B.weight"] = torch.randn(dim, 8, dtype=torch.float16) * 0.02
    save_file(sd, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
           "base_model_name_or_path": "org/tiny", "revision": None, "task_type": "CAUSAL_LM"}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def perturb_trainable(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every trainable parameter (a PeftModel's adapter), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model
