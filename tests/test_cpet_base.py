"""Compressed base models for CPET: recipes parse and print canonically; each recipe's effective
weights have the structure it promises (distinct values per group, exact zero patterns, NF4 code
book values, Wanda's activation-aware masks); the saved folder loads with transformers, its
descriptor round-trips, its fingerprint is the same across processes and thread counts and refuses
edited weights; failures and kills leave no output folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import compeft_format as cf
from compeft_format.binding import FLOAT32
from compeft_format.errors import BaseMismatch, FileNotFound, InputError, InvalidArgument, VersionError
from conftest import ROOT, save_tiny_causal_lm
from cpet_adapters import base as B
from cpet_adapters import quantize as Q
from cpet_adapters.prune import nm_mask, row_mask, wanda_score
from cpet_adapters.recipe import Recipe, Step

TEXT = [
    "Compressed base models keep most of what the full model knows. " * 40,
    "Pruning sets weights to zero; quantisation rounds the rest to a few levels. " * 40,
]
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("src") / "tiny")


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def compressed(source: Path, recipe: str, **kw) -> tuple[dict, dict]:
    """Original and effective weights of every target, by compress_model_ on a fresh model."""
    model = load(source)
    before = {n: m.weight.detach().clone() for n, m in B.resolve_targets(model).items()}
    B.compress_model_(model, recipe, **kw)
    after = {n: m.weight.detach().clone() for n, m in B.resolve_targets(model).items()}
    return before, after


def batches(source: Path, samples: int = 8, seq_len: int = 32) -> list[torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(source)
    return list(torch.split(B.calibration_windows(tok, TEXT, samples, seq_len), B.CALIBRATION_BATCH))


# --- recipes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, name, steps", [
    ("int8", "int8", [("rtn", {"bits": 8, "group": None, "symmetric": True})]),
    ("int4:g128", "int4:g128", [("rtn", {"bits": 4, "group": 128, "symmetric": True})]),
    ("INT4:g128:sym", "int4:g128", [("rtn", {"bits": 4, "group": 128, "symmetric": True})]),
    ("int3:g64:asym", "int3:g64:asym", [("rtn", {"bits": 3, "group": 64, "symmetric": False})]),
    ("int2:asym:g32", "int2:g32:asym", [("rtn", {"bits": 2, "group": 32, "symmetric": False})]),
    ("nf4", "nf4", [("nf4", {"block": 64, "double_quant": False})]),
    ("nf4:b64", "nf4", [("nf4", {"block": 64, "double_quant": False})]),
    ("nf4:b128:dq", "nf4:b128:dq", [("nf4", {"block": 128, "double_quant": True})]),
    ("2:4", "2:4", [("nm", {"n": 2, "m": 4})]),
    ("prune:0.50", "prune:0.5", [("magnitude", {"sparsity": 0.5})]),
    ("wanda:0.5", "wanda:0.5", [("wanda", {"sparsity": 0.5})]),
    ("wanda:2:4", "wanda:2:4", [("wanda", {"n": 2, "m": 4})]),
    (" 2:4 + int4:g128 ", "2:4+int4:g128", [("nm", {"n": 2, "m": 4}), ("rtn", {"bits": 4, "group": 128, "symmetric": True})]),
    ("wanda:0.5+int8", "wanda:0.5+int8", [("wanda", {"sparsity": 0.5}), ("rtn", {"bits": 8, "group": None, "symmetric": True})]),
])
def test_recipe_parses_to_its_steps_and_canonical_name(text, name, steps):
    r = Recipe.parse(text)
    assert [(s.kind, s.params) for s in r.steps] == steps
    assert r.name == name and Recipe.parse(r.name) == r
    assert r.to_json() == {"name": name, "steps": [{"kind": k, "params": p} for k, p in steps]}
    assert Recipe.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert r.needs_calibration == name.startswith("wanda")


rtn_steps = st.builds(lambda b, g, s: Step("rtn", {"bits": b, "group": g, "symmetric": s}),
                      st.integers(2, 8), st.one_of(st.none(), st.sampled_from([16, 32, 64, 128])), st.booleans())
nf4_steps = st.builds(lambda b, d: Step("nf4", {"block": b, "double_quant": d}), st.sampled_from([32, 64, 256]), st.booleans())
nm = st.integers(2, 16).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m)))
fractions = st.floats(0.001, 0.999, allow_nan=False)
prune_steps = st.one_of(
    st.builds(lambda f: Step("magnitude", {"sparsity": f}), fractions),
    st.builds(lambda f: Step("wanda", {"sparsity": f}), fractions),
    nm.map(lambda t: Step("nm", {"n": t[0], "m": t[1]})),
    nm.map(lambda t: Step("wanda", {"n": t[0], "m": t[1]})),
)


@given(st.one_of(st.none(), prune_steps), st.one_of(st.none(), rtn_steps, nf4_steps))
def test_every_recipe_round_trips_through_its_name(prune, quant):
    steps = tuple(s for s in (prune, quant) if s is not None)
    if not steps:
        return
    r = Recipe(steps)
    assert Recipe.parse(r.name) == r


@pytest.mark.parametrize("text, words", [
    ("", "empty"), ("int9", "2 to 8"), ("int4:g0", "positive integer"), ("int4:gx", "positive integer"),
    ("int4:g128:g64", "repeated"), ("nf4:b100", "block size"), ("nf4:dq:dq", "repeated"), ("4:2", "below M"),
    ("0:4", "positive integer"), ("prune:1.5", "between 0 and 1"), ("prune:0", "between 0 and 1"),
    ("prune:nan", "between 0 and 1"), ("prune", "prune:<sparsity>"), ("wanda", "wanda:<sparsity>"),
    ("int4:g128+2:4", "pruning comes first"), ("2:4+prune:0.5", "at most one"), ("int8+nf4", "at most one"),
    ("gptq:4", "unknown recipe step"), ("int8+", "empty step"),
])
def test_bad_recipes_are_refused_with_a_clear_message(text, words):
    with pytest.raises(InvalidArgument, match=words) as e:
        Recipe.parse(text)
    assert e.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("build", [
    lambda: Recipe(()),
    lambda: Recipe((Step("rtn", {"bits": 4}),)),
    lambda: Recipe((Step("rtn", {"bits": 12, "group": None, "symmetric": True}),)),
    lambda: Recipe((Step("nf4", {"block": 64, "double_quant": False}), Step("nm", {"n": 2, "m": 4}))),
    lambda: Recipe((Step("magnitude", {"sparsity": 2.0}),)),
    lambda: Step("gptq", {}),
], ids=["empty", "missing-params", "bits", "order", "sparsity", "kind"])
def test_recipes_built_by_hand_are_checked_as_parsed_ones_are(build):
    with pytest.raises(InvalidArgument):
        build()


# --- masks ------------------------------------------------------------------------------------------
def test_row_and_nm_masks_keep_the_highest_scores():
    score = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2, 0.8, 0.7, 0.4]])
    assert row_mask(score, 0.5).tolist() == [[False, True, False, True, False, True, True, False]]
    assert row_mask(score, 0.3).sum().item() == 6  # floor(0.3 * 8) = 2 dropped
    assert nm_mask(score, 2, 4).tolist() == [[False, True, False, True, False, True, True, False]]
    assert nm_mask(score, 1, 4).tolist() == [[False, False, False, True, False, True, False, False]]
    with pytest.raises(InvalidArgument, match="divisible by 3"):
        nm_mask(score, 2, 3)


def test_wanda_keeps_what_activations_make_important_where_magnitude_does_not():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 0.25])
    assert torch.equal(wanda_score(w, norms), torch.tensor([[10.0, 2.0, 3.0, 1.0]], dtype=torch.float64))
    assert row_mask(wanda_score(w, norms), 0.5).tolist() == [[True, False, True, False]]
    assert row_mask(w.abs(), 0.5).tolist() == [[False, False, True, True]]


# --- effective weights ------------------------------------------------------------------------------
def test_default_targets_are_the_linear_layers_of_the_decoder_blocks(source):
    model = load(source)
    targets = list(B.resolve_targets(model))
    per_block = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert targets == [f"model.layers.{i}.{p}" for i in range(2) for p in per_block]
    assert list(B.resolve_targets(model, ["q_proj", "layers.1.mlp.up_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    with pytest.raises(InvalidArgument, match="matches no module"):
        B.resolve_targets(model, ["qkv_proj"])


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (3, 64), (2, 32)])
def test_symmetric_rtn_has_at_most_2_to_the_bits_levels_per_group_within_half_a_step(source, bits, group):
    before, after = compressed(source, f"int{bits}" + (f":g{group}" if group else ""))
    qmax = 2 ** (bits - 1)
    for name, w in before.items():
        g = group or w.shape[1]
        wg, eg = w.reshape(-1, g), after[name].reshape(-1, g)
        step = wg.abs().amax(dim=1, keepdim=True) / ((2 ** bits - 1) / 2)  # torchao's symmetric scale
        codes = eg / step
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert codes.round().min() >= -qmax and codes.round().max() <= qmax - 1
        assert max(len(torch.unique(row)) for row in eg) <= 2 ** bits
        assert ((eg - wg).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all(), name
        assert not torch.equal(eg, wg)


def test_asymmetric_rtn_has_a_zero_point_and_keeps_half_a_step(source):
    bits, group = 3, 32
    before, after = compressed(source, f"int{bits}:g{group}:asym")
    for name, w in before.items():
        wg, eg = w.reshape(-1, group), after[name].reshape(-1, group)
        lo, hi = wg.amin(dim=1, keepdim=True).clamp(max=0), wg.amax(dim=1, keepdim=True).clamp(min=0)
        step = (hi - lo) / (2 ** bits - 1)
        assert max(len(torch.unique(row)) for row in eg) <= 2 ** bits
        assert ((eg - wg).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all(), name
        # the levels of a group are evenly spaced by its step, offset by the zero point
        lowest = eg.amin(dim=1, keepdim=True)
        offsets = (eg - lowest) / step
        assert torch.allclose(offsets, offsets.round(), atol=1e-3)


def test_rtn_group_must_divide_in_features(source):
    with pytest.raises(InvalidArgument, match="group size 48 does not divide in_features 64"):
        B.compress_model_(load(source), "int4:g48")


@pytest.mark.parametrize("block", [64, 128])
def test_nf4_values_are_code_book_entries_times_the_block_absmax(source, block):
    before, after = compressed(source, "nf4" + ("" if block == 64 else f":b{block}"))
    code = Q.nf4_code()
    assert len(code) == 16 and code[0] == -1 and code[7] == 0 and code[-1] == 1
    for name, w in before.items():
        wb, eb = w.reshape(-1, block), after[name].reshape(-1, block)
        absmax = wb.abs().amax(dim=1, keepdim=True)
        nearest = ((wb / absmax)[..., None] - code).abs().argmin(dim=-1)
        assert torch.equal(eb, code[nearest] * absmax), name


def test_nf4_double_quant_keeps_one_scale_per_block_over_the_code_book(source):
    before, after = compressed(source, "nf4:dq")
    code = Q.nf4_code()
    for name, w in before.items():
        eb = after[name].reshape(-1, 64)
        scale = eb.abs().amax(dim=1, keepdim=True)  # code book spans [-1, 1]: the dequantised absmax
        assert torch.allclose(eb / scale, code[((eb / scale)[..., None] - code).abs().argmin(dim=-1)], atol=1e-6)
        assert not torch.equal(after[name], compressed_nf4_plain(w)), name


def compressed_nf4_plain(w: torch.Tensor) -> torch.Tensor:
    return Q.nf4(w, block=64, double_quant=False).weight


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_nm_keeps_exactly_n_of_every_m_inputs_the_largest_unchanged(source, n, m):
    before, after = compressed(source, f"{n}:{m}")
    for name, w in before.items():
        e = after[name]
        kept = (e != 0).reshape(w.shape[0], -1, m)
        assert (kept.sum(dim=-1) == n).all(), name
        assert torch.equal(e[e != 0], w[e != 0])
        groups = w.abs().reshape(w.shape[0], -1, m)
        smallest_kept = torch.where(kept, groups, torch.inf).amin(dim=-1)
        largest_dropped = torch.where(kept, -torch.inf, groups).amax(dim=-1)
        assert (smallest_kept >= largest_dropped).all(), name


def test_unstructured_magnitude_prunes_the_requested_fraction_of_every_row(source):
    before, after = compressed(source, "prune:0.75")
    for name, w in before.items():
        e = after[name]
        assert ((e == 0).sum(dim=1) == int(0.75 * w.shape[1])).all(), name
        assert torch.equal(e[e != 0], w[e != 0])
        smallest_kept = torch.where(e != 0, w.abs(), torch.inf).amin(dim=1)
        largest_dropped = torch.where(e != 0, -torch.inf, w.abs()).amax(dim=1)
        assert (smallest_kept >= largest_dropped).all()


def _inputs_of(model: torch.nn.Module, name: str, calib: list[torch.Tensor]) -> torch.Tensor:
    """||X_j||_2 of the inputs of module ``name`` over the calibration batches, by a hook."""
    sums = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda mod, args: sums.append(args[0].reshape(-1, args[0].shape[-1]).double().pow(2).sum(0)))
    with torch.no_grad():
        for ids in calib:
            model(input_ids=ids, use_cache=False)
    handle.remove()
    return torch.stack(sums).sum(0).sqrt()


@pytest.mark.parametrize("recipe", ["wanda:0.5", "wanda:2:4"])
def test_wanda_masks_follow_activation_norms_block_by_block(source, recipe):
    calib = batches(source)
    before, after = compressed(source, recipe, calibration_batches=calib)
    _, magnitude = compressed(source, recipe.replace("wanda:0.5", "prune:0.5").replace("wanda:", ""))
    step = Recipe.parse(recipe).steps[0]

    def mask(w, norms):
        score = wanda_score(w, norms)
        return nm_mask(score, 2, 4) if "n" in step.params else row_mask(score, 0.5)

    # block 0 sees the dense model's activations; block 1 those of the compressed block 0
    dense_norms = _inputs_of(load(source), Q_PROJ, calib)
    pruned_model = load(source)
    pruned_model.load_state_dict({**pruned_model.state_dict(), **{f"{n}.weight": w for n, w in after.items()}})
    layer1 = Q_PROJ.replace("layers.0", "layers.1")
    pruned_norms = _inputs_of(pruned_model, layer1, calib)
    assert torch.equal(after[Q_PROJ] != 0, mask(before[Q_PROJ], dense_norms))
    assert torch.equal(after[layer1] != 0, mask(before[layer1], pruned_norms))
    assert not torch.equal(after[layer1] != 0, mask(before[layer1], _inputs_of(load(source), layer1, calib)))
    # and they are not magnitude's masks
    assert not torch.equal(after[Q_PROJ] != 0, magnitude[Q_PROJ] != 0)
    assert (after[Q_PROJ] == 0).float().mean().item() == 0.5


def test_wanda_leaves_the_blocks_as_they_were_and_the_model_runs(source):
    model = load(source)
    ids = torch.arange(30).reshape(1, 30)
    B.compress_model_(model, "wanda:0.5", calibration_batches=batches(source))
    assert all("forward" not in block.__dict__ for block in model.model.layers)
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == (1, 30, 256) and bool(torch.isfinite(out).all())


def test_wanda_needs_calibration(source, tmp_path):
    with pytest.raises(InvalidArgument, match="calibration"):
        B.compress_model_(load(source), "wanda:0.5")
    with pytest.raises(InvalidArgument, match="calibration texts"):
        B.compress_base(source, tmp_path / "out", "wanda:0.5")
    with pytest.raises(InvalidArgument, match="fewer than one window of 512"):
        B.compress_base(source, tmp_path / "out", "wanda:0.5", calibration=["short"], seq_len=512)
    assert not (tmp_path / "out").exists()


def test_a_combination_prunes_then_quantises_the_pruned_weights(source):
    before, after = compressed(source, "2:4+int4:g32")
    reordered = 0
    for name, w in before.items():
        mask = nm_mask(w.abs(), 2, 4)
        expected = Q.rtn(torch.where(mask, w, torch.zeros(())), bits=4, group=32, symmetric=True).weight
        assert torch.equal(after[name], torch.where(mask, expected, torch.zeros(()))), name
        assert ((after[name] != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
        # the other order would choose the mask among rounded values, whose ties fall otherwise
        rounded = Q.rtn(w, bits=4, group=32, symmetric=True).weight
        reverse = torch.where(nm_mask(rounded.abs(), 2, 4), rounded, torch.zeros(()))
        reordered += int(not torch.equal(after[name], reverse))
    assert reordered == len(before)


# --- the folder -------------------------------------------------------------------------------------
def test_the_folder_loads_with_transformers_and_its_descriptor_round_trips(source, tmp_path):
    out = tmp_path / "int8"
    made = B.compress_base(source, out, "int8", source_id="tiny/llama", source_revision="abc123")
    model = load(out)
    ids = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        got, want = model(ids).logits, load(source)(ids).logits
    assert not torch.equal(got, want)
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()

    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"] == AutoTokenizer.from_pretrained(source)("abc")["input_ids"]
    b = made.binding
    assert b.id is None and b.revision is None
    assert b.fingerprint == cf.fingerprint(out, FLOAT32) == cf.fingerprint(model, FLOAT32)
    assert b.derived_from == cf.ModelRef(id="tiny/llama", revision="abc123", fingerprint=cf.fingerprint(source, FLOAT32))
    assert b.recipe is not None
    assert b.recipe["name"] == "int8" and b.recipe["library"] == "torchao" and b.recipe["calibration_sha256"] is None
    assert b.recipe["library_version"] == Q.library_version("rtn")[1]
    assert b.recipe["params"]["steps"] == [{"kind": "rtn", "params": {"bits": 8, "group": None, "symmetric": True}}]

    again = B.load_compressed_base(out)
    assert again == made
    assert cf.BaseBinding.from_json(json.loads(json.dumps(b.to_json()))) == b
    desc = json.loads((out / B.DESCRIPTOR).read_text())
    assert desc["format"] == "cpet-compressed-base" and desc["version"] == 1
    assert desc["binding"] == b.to_json() and desc["target_modules"] == list(made.target_modules)
    assert len(made.target_modules) == 14
    overall = made.stats["overall"]
    assert overall["weights"] == sum(p.numel() for n, p in model.named_parameters() if "layers." in n and "proj" in n)
    assert 0 < overall["relative_error"] < 0.02 and overall["bits"] == pytest.approx(8 + 32 / 64, abs=0.2)
    assert desc["libraries"]["torchao"] == Q.library_version("rtn")[1]


def test_calibration_is_hashed_as_int64_token_ids(source, tmp_path):
    made = B.compress_base(source, tmp_path / "w", "wanda:0.5+int8", calibration=TEXT, calibration_samples=6, seq_len=40)
    ids = AutoTokenizer.from_pretrained(source)("\n\n".join(TEXT), add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: 6 * 40], dtype=torch.int64)
    expected = hashlib.sha256(b"".join(int(i).to_bytes(8, "little", signed=True) for i in windows.tolist())).hexdigest()
    assert made.binding.recipe is not None
    assert made.binding.recipe["calibration_sha256"] == expected
    assert made.binding.recipe["library"] == "compeft+torchao"
    assert made.binding.recipe["params"]["calibration_samples"] == 6 and made.binding.recipe["params"]["seq_len"] == 40
    assert made.binding.describe().endswith("by wanda:0.5+int8")
    assert made.stats["overall"]["sparsity"] >= 0.5


DETERMINISM = """
import sys, torch
torch.set_num_threads(1)
from cpet_adapters.base import compress_base
made = compress_base(sys.argv[1], sys.argv[2], "wanda:2:4+int4:g32", calibration=sys.argv[3:], calibration_samples=8,
                     seq_len=32)
print(made.binding.fingerprint.value)
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_fingerprint_is_deterministic_across_processes_and_threads_and_follows_one_weight(source, tmp_path):
    recipe = dict(calibration=TEXT, calibration_samples=8, seq_len=32)
    here = B.compress_base(source, tmp_path / "a", "wanda:2:4+int4:g32", **recipe)
    proc = _run(DETERMINISM, str(source), str(tmp_path / "b"), *TEXT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == here.binding.fingerprint.value
    assert cf.fingerprint(tmp_path / "b", FLOAT32) == here.binding.fingerprint

    edited = tmp_path / "src2"
    edited.mkdir()
    for f in source.iterdir():
        (edited / f.name).write_bytes(f.read_bytes())
    sd = load_file(edited / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][3, 5] += 0.5
    save_file(sd, edited / "model.safetensors", metadata={"format": "pt"})
    other = B.compress_base(edited, tmp_path / "c", "wanda:2:4+int4:g32", **recipe)
    assert other.binding.fingerprint != here.binding.fingerprint
    assert other.binding.derived_from != here.binding.derived_from


def test_load_refuses_a_folder_whose_weights_were_edited(source, tmp_path):
    out = tmp_path / "nf4"
    made = B.compress_base(source, out, "nf4")
    sd = load_file(out / "model.safetensors")
    sd["model.layers.0.self_attn.v_proj.weight"][0, 0] *= -1
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BaseMismatch) as e:
        B.load_compressed_base(out)
    actual = cf.fingerprint(out, FLOAT32)
    assert made.binding.fingerprint is not None
    assert made.binding.fingerprint.value in str(e.value) and actual.value in str(e.value)
    assert e.value.expected == made.binding and e.value.actual.fingerprint == actual
    assert B.load_compressed_base(out, verify=False).binding == made.binding


@pytest.mark.parametrize("edit, error, words", [
    (lambda d: {**d, "format": "something-else"}, InputError, "not a cpet-compressed-base descriptor"),
    (lambda d: {**d, "version": 2}, VersionError, "version 2"),
    (lambda d: {**d, "recipe": {**d["recipe"], "name": "int4:g32"}}, InputError, "disagree"),
    (lambda d: {**d, "binding": {**d["binding"], "fingerprint": None}}, InputError, "lacks the fingerprint"),
    (lambda d: [d], InputError, "not a cpet-compressed-base descriptor"),
], ids=["format", "version", "recipe", "fingerprint", "not-an-object"])
def test_load_refuses_a_descriptor_it_did_not_write(source, tmp_path, edit, error, words):
    out = tmp_path / "int8"
    B.compress_base(source, out, "int8")
    desc = json.loads((out / B.DESCRIPTOR).read_text())
    (out / B.DESCRIPTOR).write_text(json.dumps(edit(desc)))
    with pytest.raises(error, match=words):
        B.load_compressed_base(out)


def test_missing_source_existing_output_and_bad_recipe_are_typed_errors(source, tmp_path):
    with pytest.raises(FileNotFound):
        B.compress_base(tmp_path / "nowhere", tmp_path / "out", "int8")
    with pytest.raises(InvalidArgument, match="unknown recipe step"):
        B.compress_base(source, tmp_path / "out", "gptq:4")
    with pytest.raises(FileNotFound):
        B.load_compressed_base(source)
    assert not (tmp_path / "out").exists()

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InvalidArgument, match="overwrite"):
        B.compress_base(source, out, "int8")
    with pytest.raises(InvalidArgument, match="did not write"):  # overwrite replaces only a compressed base
        B.compress_base(source, out, "int8", overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    B.compress_base(source, out, "int8")
    B.compress_base(source, out, "2:4", overwrite=True)
    assert B.load_compressed_base(out).recipe == Recipe.parse("2:4")
    with pytest.raises(InvalidArgument, match="which this command reads"):
        B.compress_base(out, out, "int8", overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    B.compress_base(source, empty, "2:4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]
    # the same output checks as every other command: a file is not replaced by a folder, even
    # with overwrite, and the output's folder must exist
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    with pytest.raises(InvalidArgument, match="give the folder to write"):
        B.compress_base(source, a_file, "int8", overwrite=True)
    assert a_file.read_text() == "mine"
    with pytest.raises(FileNotFound, match="folder of the output does not exist"):
        B.compress_base(source, tmp_path / "no" / "out", "int8")


def test_a_float_copy_of_a_gguf_model_is_compressed_and_a_quantised_checkpoint_refused(source, tmp_path):
    """A GGUF model converted by transformers and saved keeps ``quantization_config`` in its config
    although its safetensors hold floats; a checkpoint of quantised weights is no source."""
    src = tmp_path / "src"
    shutil.copytree(source, src)
    config = json.loads((src / "config.json").read_text())
    gguf = {"quant_method": "gguf", "gguf_file": "model.Q4_1.gguf", "dequantize": False}
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": gguf}))
    made = B.compress_base(src, tmp_path / "out", "int8")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert made.binding.derived_from is not None
    assert made.binding.derived_from.fingerprint == cf.fingerprint(source, FLOAT32)
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(InputError, match="already quantised"):
        B.compress_base(src, tmp_path / "again", "int8")
    assert not (tmp_path / "again").exists()


def test_a_failed_compression_leaves_no_output(source, tmp_path, monkeypatch):
    def fail(folder, descriptor):
        assert (folder / "model.safetensors").is_file()
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(B, "_write_descriptor", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        B.compress_base(source, tmp_path / "out", "int8")
    assert list(tmp_path.iterdir()) == []


KILLED = """
import os, signal, sys
from cpet_adapters import base
def die(folder, descriptor):
    os.kill(os.getpid(), signal.SIGKILL)
base._write_descriptor = die
base.compress_base(sys.argv[1], sys.argv[2], "int4:g32")
"""


def test_a_killed_compression_leaves_no_output_and_the_next_run_sweeps_its_folder(source, tmp_path):
    out = tmp_path / "out"
    proc = _run(KILLED, str(source), str(out))
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".out.") and left[0].name.endswith(".tmp")
    assert (left[0] / "model.safetensors").is_file()
    B.compress_base(source, out, "int4:g32")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    B.load_compressed_base(out)


def test_a_causal_lm_whose_config_names_no_architecture_keeps_its_head(tmp_path):
    from safetensors import safe_open

    src = save_tiny_causal_lm(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["architectures"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = B.compress_base(src, tmp_path / "out", "int8").path
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in set(f.keys())


@pytest.mark.parametrize("recipe", ["int4:g32", "int3:g32:asym", "int8", "2:4+int4:g32"])
def test_a_packed_base_loads_back_to_the_same_effective_weights(tmp_path, recipe):
    from safetensors import safe_open

    from cpet_adapters.train import load_model

    src = save_tiny_causal_lm(tmp_path / "src")
    dense = B.compress_base(src, tmp_path / "dense", recipe)
    packed = B.compress_base(src, tmp_path / "packed", recipe, packed="compressed-tensors")
    assert packed.binding.fingerprint == dense.binding.fingerprint  # bound to the effective weights
    # the packed folder is fingerprinted as the weights transformers dequantises it to
    assert cf.fingerprint(packed.path, cf.binding.FLOAT32) == dense.binding.fingerprint
    config = json.loads((packed.path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    q = "model.layers.0.self_attn.q_proj."
    with safe_open(str(packed.path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        # codes, not floats: packed into int32 words (symmetric) or int8 with zero points (asymmetric)
        codes = f.get_tensor(q + "weight_packed") if q + "weight_packed" in names else f.get_tensor(q + "weight")
    assert q + "weight_scale" in names and codes.dtype in (torch.int32, torch.int8)
    size = sum(p.stat().st_size for p in packed.path.glob("*.safetensors"))
    assert size < 0.75 * sum(p.stat().st_size for p in dense.path.glob("*.safetensors"))
    a, b = load_model(dense.path).state_dict(), load_model(packed.path).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert B.load_compressed_base(packed.path, verify=True).binding == packed.binding


def test_a_packed_base_is_refused_for_recipes_without_codes_and_checked_when_changed(tmp_path):
    from safetensors.torch import load_file, save_file

    src = save_tiny_causal_lm(tmp_path / "src")
    for recipe in ("nf4", "2:4"):
        with pytest.raises(cf.InvalidArgument, match="round-to-nearest"):
            B.compress_base(src, tmp_path / recipe.replace(":", ""), recipe, packed="compressed-tensors")
    with pytest.raises(cf.InvalidArgument, match="packed format"):
        B.compress_base(src, tmp_path / "x", "int4:g32", packed="gguf")
    made = B.compress_base(src, tmp_path / "packed", "int4:g32", packed="compressed-tensors")
    sd = load_file(str(made.path / "model.safetensors"))
    sd["model.layers.0.self_attn.q_proj.weight_scale"] = sd["model.layers.0.self_attn.q_proj.weight_scale"] * 2
    save_file(sd, str(made.path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(cf.BaseMismatch):
        B.load_compressed_base(made.path, verify=True)


def test_the_cli_writes_a_packed_base_that_trains_and_binds_its_artifacts(tmp_path):
    from conftest import write_task
    from cpet_adapters.export import export, load_into
    from cpet_adapters.train import TrainConfig, train

    src = save_tiny_causal_lm(tmp_path / "src")
    p = subprocess.run([sys.executable, "-m", "compeft_format.cli", "cpet", "compress-base", str(src), "-o",
                        str(tmp_path / "packed"), "--recipe", "int4:g32", "--packed", "compressed-tensors"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    data = write_task(tmp_path / "train.jsonl", 16)
    train(TrainConfig(base=str(tmp_path / "packed"), data=str(data), output=str(tmp_path / "run"), max_steps=2,
                      max_len=32, lora_r=2, recovery=True, recovery_r=2, save_every=0))
    arts = export(tmp_path / "run", tmp_path / "out")
    dense = B.compress_base(src, tmp_path / "dense", "int4:g32").binding.fingerprint
    assert all(a.base_fingerprint == dense.value for a in arts)
    load_into(tmp_path / "packed", arts[-1].path)  # the packed folder is the base the artifacts name
    with pytest.raises(cf.BaseMismatch):
        load_into(src, arts[-1].path)


@pytest.mark.parametrize("damage", ["missing", "extra", "heads"])
def test_a_damaged_packed_folder_is_refused_with_a_typed_error(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    src = save_tiny_causal_lm(tmp_path / "src")
    made = B.compress_base(src, tmp_path / "packed", "int4:g32", packed="compressed-tensors")
    weights = made.path / "model.safetensors"
    if damage == "heads":  # a hostile config: transformers itself fails (ZeroDivisionError)
        config = json.loads((made.path / "config.json").read_text())
        config["num_attention_heads"] = 0
        (made.path / "config.json").write_text(json.dumps(config))
    else:
        sd = load_file(str(weights))
        if damage == "missing":  # transformers would make up a random embedding
            del sd["model.embed_tokens.weight"]
        else:  # and would drop a tensor no layer uses
            sd["evil.weight"] = torch.zeros(2)
        save_file(sd, str(weights), metadata={"format": "pt"})
    with pytest.raises(cf.InputError):
        cf.fingerprint(made.path, cf.binding.FLOAT32)
