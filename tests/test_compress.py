"""ComPEFT selection and scaling, checked against an independent reference implementation."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compeft_format as cf
from compeft_format import constants as C
from conftest import bits_equal, state_dicts, tensors

NO_DENSE = dict(dense_patterns=(), min_sparse_numel=0)
PAPER = dict(method="paper", **NO_DENSE)


def reference_selection(tau: np.ndarray, density: float) -> np.ndarray:
    """Sort by (-|tau|, index), take round-half-up(d*N), drop exact zeros: the spec's rule."""
    n = tau.size
    k = min(n, math.floor(density * n + 0.5))
    order = np.lexsort((np.arange(n), -np.abs(tau)))
    keep = np.sort(order[:k])
    return keep[tau[keep] != 0]


def flat_f32(sd):
    return {k: v.to(torch.float32).reshape(-1).numpy() for k, v in sd.items()}


densities = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False).filter(lambda d: d > 0)


@given(sd=state_dicts(), density=densities, alpha=st.floats(0.1, 10.0))
def test_global_selection_and_scale_match_reference(sd, density, alpha):
    ca = cf.compress(sd, density=density, alpha=alpha, **PAPER)
    names = sorted(sd)
    f = flat_f32(sd)
    flat = np.concatenate([f[n] for n in names])
    keep = reference_selection(flat, density)
    sigma = 0.0 if flat.size == 0 else (abs(float(flat[0])) if flat.size == 1 else float(np.std(flat.astype(np.float64), ddof=1)))
    scale = float(np.float32(alpha * sigma))
    bounds = np.cumsum([0] + [f[n].size for n in names])
    got = np.concatenate([ca.tensors[n].indices + bounds[i] for i, n in enumerate(names)])
    np.testing.assert_array_equal(got, keep)
    assert ca.compression.kept == keep.size
    assert ca.compression.candidates == flat.size
    for n in names:
        t = ca.tensors[n]
        assert t.encoding == C.ENC_TERNARY
        assert t.scale == scale
        np.testing.assert_array_equal(t.negative, f[n][t.indices] < 0)
        # decoded values: +/- scale at kept positions, 0 elsewhere, rounded once to the dtype
        dense = t.to_dense(torch.float32).reshape(-1).numpy()
        expect = np.zeros(f[n].size, np.float32)
        expect[t.indices] = np.where(t.negative, -np.float32(scale), np.float32(scale))
        np.testing.assert_array_equal(dense, expect)
        assert bits_equal(t.to_dense(), torch.from_numpy(expect).to(sd[n].dtype).reshape(sd[n].shape))


@given(sd=state_dicts(), density=densities)
def test_per_tensor_scope(sd, density):
    ca = cf.compress(sd, density=density, alpha=2.0, scope="tensor", **PAPER)
    f = flat_f32(sd)
    for n, t in ca.tensors.items():
        np.testing.assert_array_equal(t.indices, reference_selection(f[n], density))
        a = f[n]
        sigma = 0.0 if a.size == 0 else (abs(float(a[0])) if a.size == 1 else float(np.std(a.astype(np.float64), ddof=1)))
        assert t.scale == float(np.float32(2.0 * sigma))


@given(t=tensors(), density=densities)
def test_prune_mode_keeps_values(t, density):
    ca = cf.compress({"w": t}, density=density, mode="prune", **NO_DENSE)
    ct = ca.tensors["w"]
    assert ct.encoding == C.ENC_SPARSE
    a = t.to(torch.float32).reshape(-1).numpy()
    np.testing.assert_array_equal(ct.indices, reference_selection(a, density))
    expect = torch.zeros(a.size, dtype=t.dtype)
    expect[torch.from_numpy(ct.indices)] = t.reshape(-1)[torch.from_numpy(ct.indices)]
    assert bits_equal(ct.to_dense(), expect.reshape(t.shape))


def test_exact_count_and_rounding():
    t = torch.arange(1, 21, dtype=torch.float32)  # all distinct, none zero
    for d, k in [(0.05, 1), (0.025, 1), (0.024, 0), (0.5, 10), (0.525, 11), (1.0, 20)]:
        ca = cf.compress({"w": t}, density=d, **NO_DENSE)
        assert ca.tensors["w"].nnz == k, (d, k)
        np.testing.assert_array_equal(ca.tensors["w"].indices, np.arange(20 - k, 20))


def test_ties_broken_by_lower_index_across_tensors():
    sd = {"a": torch.tensor([1.0, -1.0, 0.5]), "b": torch.tensor([1.0, 1.0, -1.0])}
    ca = cf.compress(sd, density=3 / 6, **NO_DENSE)
    assert ca.tensors["a"].indices.tolist() == [0, 1]
    assert ca.tensors["b"].indices.tolist() == [0]
    assert ca.tensors["a"].negative.tolist() == [False, True]


def test_zero_entries_are_never_stored():
    sd = {"w": torch.tensor([0.0, 0.0, 3.0, 0.0])}
    ca = cf.compress(sd, density=1.0, **NO_DENSE)
    assert ca.tensors["w"].indices.tolist() == [2]


def test_ones_reference_and_offset():
    w = torch.tensor([1.0, 1.5, 0.25, 1.0, 2.0], dtype=torch.float16)
    ca = cf.compress({"ia3_l": w}, density=0.4, reference="ones", **NO_DENSE)
    t = ca.tensors["ia3_l"]
    assert t.offset == 1.0 and t.indices.tolist() == [2, 4]  # |tau| = .75 and 1.0
    dense = t.to_dense(torch.float32)
    s = np.float32(t.scale)
    assert dense.tolist() == [1.0, 1.0, float(np.float32(1) - s), 1.0, float(np.float32(1) + s)]


def test_explicit_base_reference_stores_deltas():
    base = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    ft = {"w": torch.tensor([[1.0, 2.5], [3.0, 3.0]])}
    ca = cf.compress(ft, density=0.5, reference=base, **NO_DENSE)
    assert ca.adapter.representation == C.REPRESENTATION_DELTA
    assert ca.compression.reference == C.REFERENCE_BASE
    assert ca.tensors["w"].indices.tolist() == [1, 3]
    assert ca.tensors["w"].negative.tolist() == [False, True]


def test_dense_overrides_defaults_and_patterns():
    sd = {
        "m.lora_A.weight": torch.randn(8, 64),
        "m.bias": torch.randn(64),
        "m.lora_magnitude_vector": torch.randn(64),
        "m.modules_to_save.default.weight": torch.randn(4, 16),
        "m.norm.weight": torch.randn(64),
        "m.tiny": torch.randn(4),
        "m.head.weight": torch.randn(16, 16),
    }
    ca = cf.compress(sd, density=0.1, dense_patterns=cf.peft_layout.DEFAULT_DENSE_PATTERNS + ("*.head.*",))
    enc = {n: t.encoding for n, t in ca.tensors.items()}
    assert enc == {
        "m.bias": "dense", "m.head.weight": "dense", "m.lora_A.weight": "ternary",
        "m.lora_magnitude_vector": "dense", "m.modules_to_save.default.weight": "dense",
        "m.norm.weight": "dense", "m.tiny": "dense",
    }
    for n, t in ca.tensors.items():
        if t.encoding == "dense":
            assert bits_equal(t.to_dense(), sd[n])
    # dense tensors do not take part in the global top-k
    assert ca.compression.candidates == 8 * 64
    assert ca.tensors["m.lora_A.weight"].nnz == round(0.1 * 512)


def test_dtype_override():
    sd = {"w": torch.randn(10, 10, dtype=torch.float32)}
    ca = cf.compress(sd, density=0.2, dtype="bfloat16", **NO_DENSE)
    assert ca.tensors["w"].to_dense().dtype == torch.bfloat16


@pytest.mark.parametrize("density", [0, -0.1, 1.0001, float("nan"), "0.1"])
def test_bad_density(density):
    with pytest.raises(cf.InvalidArgument) as e:
        cf.compress({"w": torch.ones(4)}, density=density)
    assert e.value.code == "INVALID_ARGUMENT"


def test_bad_inputs_are_typed():
    with pytest.raises(cf.NonFiniteInput):
        cf.compress({"w": torch.tensor([1.0, float("nan")])}, **NO_DENSE)
    with pytest.raises(cf.NonFiniteInput):
        cf.compress({"w": torch.tensor([1.0, float("inf")])}, **NO_DENSE)
    with pytest.raises(cf.UnsupportedDtype) as e:
        cf.compress({"w": torch.ones(4, dtype=torch.int64)})
    assert e.value.code == "UNSUPPORTED_DTYPE"
    with pytest.raises(cf.InvalidArgument):
        cf.compress({"w": torch.ones(4)}, alpha=0)
    with pytest.raises(cf.InvalidArgument):
        cf.compress({"w": torch.ones(4)}, scope="layer")
    with pytest.raises(cf.InvalidArgument):
        cf.compress({"w": torch.ones(4)}, reference={"v": torch.ones(4)})
    with pytest.raises(cf.InvalidArgument):
        cf.compress({"w": torch.ones(4)}, reference={"w": torch.ones(5)})


def test_alpha_search_picks_best_and_rescales():
    torch.manual_seed(0)
    target = torch.randn(40, 40)
    ca = cf.compress({"w": target}, density=0.3, alpha=1.0, **PAPER)

    def evaluate(sd):  # negative reconstruction error: the best alpha minimises it
        return -float(((sd["w"] - target) ** 2).sum())

    best, scores, tuned = cf.alpha_search(evaluate, ca, grid=[0.25, 0.5, 1.0, 2.0, 4.0], exhaustive=True)
    assert set(scores) == {0.25, 0.5, 1.0, 2.0, 4.0}
    assert best == max(scores, key=scores.get)
    walked = cf.alpha_search(evaluate, ca, grid=[0.25, 0.5, 1.0, 2.0, 4.0])
    assert walked[0] == best and set(walked[1]) < set(scores) and walked[1][best] == scores[best]
    assert tuned.compression.alpha == best
    assert tuned.tensors["w"].indices.tolist() == ca.tensors["w"].indices.tolist()
    assert tuned.tensors["w"].scale == float(np.float32(best * ca.tensors["w"].sigma))
    # picking a non-trivial alpha: the top 30% of a Gaussian sit well above one sigma
    assert best > 1.0


def test_dense_patterns_may_come_from_a_generator():
    sd = {"w": torch.randn(64), "v": torch.randn(64)}
    ca = cf.compress(sd, density=0.5, dense_patterns=(p for p in ["w"]))
    assert ca.tensors["w"].encoding == "dense" and ca.tensors["v"].encoding == "ternary"


# --- the fit method: balancing, fitted scales, refit --------------------------------------------
def _lora(seed: int, modules: int = 3, r: int = 4, n: int = 24, m: int = 20, b_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(modules):
        sd[f"base_model.model.layers.{i}.q.lora_A.weight"] = torch.randn(r, n, generator=g)
        sd[f"base_model.model.layers.{i}.q.lora_B.weight"] = torch.randn(m, r, generator=g) * b_scale
    return sd


def _products(sd, dtype=torch.float64):
    return {k[: -len(".lora_A.weight")]: sd[k.replace("lora_A", "lora_B")].to(dtype) @ sd[k].to(dtype)
            for k in sd if "lora_A" in k}


def _rel_error(sd, approx):
    p, q = _products(sd), _products(approx)
    num = sum(float(((p[k] - q[k]) ** 2).sum()) for k in p)
    return math.sqrt(num / sum(float((p[k] ** 2).sum()) for k in p))


def test_balancing_keeps_every_product_and_equalises_rank_components():
    sd = _lora(1, b_scale=0.01)
    ca = cf.compress(sd, density=1.0, mode="prune", balance="rank", **NO_DENSE)
    out = {k: v.double() for k, v in ca.state_dict(torch.float32).items()}
    for k, p in _products(sd).items():
        torch.testing.assert_close(_products(out)[k], p, rtol=1e-5, atol=1e-7)
        a, b = out[k + ".lora_A.weight"], out[k + ".lora_B.weight"]
        # row i of A and column i of B have the same root-mean-square entry
        torch.testing.assert_close(a.norm(dim=1) / a.shape[1] ** 0.5, b.norm(dim=0) / b.shape[0] ** 0.5,
                                   rtol=1e-5, atol=0)
    assert ca.compression.options == {"balance": "rank"}
    paper = cf.compress(sd, density=1.0, mode="prune", method="paper", **NO_DENSE)
    assert paper.compression.options is None and paper.compression.fidelity is None


def test_paper_method_empties_small_lora_b_and_fit_does_not():
    sd = _lora(2, b_scale=0.01)  # B's entries 100x smaller than A's, as after short training
    paper = cf.compress(sd, density=0.2, method="paper", **NO_DENSE)
    assert all(t.nnz == 0 for n, t in paper.tensors.items() if "lora_B" in n)
    assert cf.measure_fidelity(sd, paper).emptied == [f"layers.{i}.q" for i in range(3)]
    assert _rel_error(sd, paper.state_dict()) == 1.0
    fit = cf.compress(sd, density=0.2, **NO_DENSE)
    assert all(t.nnz > 0 for t in fit.tensors.values())
    assert fit.compression.fidelity["emptied"] == 0
    assert _rel_error(sd, fit.state_dict()) < 0.9


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
def test_each_fit_step_lowers_the_error_of_the_products(density):
    sd = _lora(3, modules=4, r=8, n=64, m=48, b_scale=0.1)
    errors = {}
    for name, opts in {"paper": dict(method="paper"),
                       "balanced, sigma": dict(balance="rank", scale="sigma", refit=False),
                       "balanced, mean": dict(balance="rank", scale="mean", refit=False),
                       "balanced, lsq": dict(balance="rank", scale="lsq", refit=False),
                       "balanced, lsq, refit": dict(balance="rank", scale="lsq", refit=True)}.items():
        ca = cf.compress(sd, density=density, **opts, **NO_DENSE)
        errors[name] = _rel_error(sd, ca.state_dict())
        # the error recorded in the file is the one measured on the decoded tensors
        if ca.compression.fidelity is not None:
            assert ca.compression.fidelity["relative_error"] == pytest.approx(errors[name], abs=2e-6)
    assert errors["balanced, mean"] < errors["paper"]
    assert errors["balanced, lsq"] <= errors["balanced, mean"] + 1e-9
    assert errors["balanced, lsq, refit"] <= errors["balanced, lsq"] + 1e-9


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_norm_scale_keeps_each_update_norm(density):
    sd = _lora(6, modules=3, r=8, n=64, m=48, b_scale=0.1)
    sd["base_model.model.x.ia3_l"] = 1 + torch.randn(40)
    ca = cf.compress(sd, density=density, scale="norm", reference="zero", **NO_DENSE)
    out = {k: v.double() for k, v in ca.state_dict(torch.float32).items()}
    for k, p in _products(sd).items():
        assert float(_products(out)[k].norm()) == pytest.approx(float(p.norm()), rel=1e-5)
    assert float(out["base_model.model.x.ia3_l"].norm()) == pytest.approx(float(sd["base_model.model.x.ia3_l"].norm()),
                                                                          rel=1e-5)
    # and the norm scale is the least-squares one divided by the cosine of the two updates
    lsq = cf.compress(sd, density=density, scale="lsq", reference="zero", **NO_DENSE)
    q = {k: v.double() for k, v in lsq.state_dict(torch.float32).items()}
    for k, p in _products(sd).items():
        cos = float((p * _products(q)[k]).sum() / (p.norm() * _products(q)[k].norm()))
        assert float(_products(out)[k].norm()) * cos == pytest.approx(float(_products(q)[k].norm()), rel=1e-4)


def test_fitted_scales_are_least_squares():
    sd = _lora(4, modules=1, r=4, n=40, m=30)
    ca = cf.compress(sd, density=0.3, refit=False, scale="lsq", **NO_DENSE)
    a_name, b_name = sorted(sd)
    ta, tb = ca.tensors[a_name], ca.tensors[b_name]
    # A's scale: the mean magnitude of its kept (balanced) entries; the product's: no better scale exists
    dense = {k: v.double() for k, v in ca.state_dict(torch.float32).items()}
    base = _rel_error(sd, dense)
    for f in (0.97, 1.03):
        nudged = {**dense, b_name: dense[b_name] * f}
        assert _rel_error(sd, nudged) > base
    assert ta.scale > 0 and tb.scale > 0
    mean_scale = cf.compress({"w": sd[a_name]}, density=0.3, scale="mean", **NO_DENSE).tensors["w"]
    kept = sd[a_name].reshape(-1)[torch.from_numpy(mean_scale.indices)].abs().double().mean()
    assert mean_scale.scale == pytest.approx(float(kept), rel=1e-6)


def test_alpha_multiplies_fitted_scales_and_rescale_restores_them(tmp_path):
    sd = _lora(5)
    one = cf.compress(sd, density=0.2, **NO_DENSE)
    two = cf.compress(sd, density=0.2, alpha=2.0, **NO_DENSE)
    for n in sd:
        assert two.tensors[n].scale == float(np.float32(2 * one.tensors[n].sigma))
    cf.save(two, tmp_path / "a.cpeft.safetensors")
    back = cf.rescale(cf.read(tmp_path / "a.cpeft.safetensors"), 1.0)
    for n in sd:
        assert back.tensors[n].scale == pytest.approx(one.tensors[n].scale, rel=1e-6)
    assert cf.read(tmp_path / "a.cpeft.safetensors").compression.options == {"balance": "rank", "scale": "norm",
                                                                              "refit": True}


def test_method_names_and_conflicts():
    assert cf.CompeftConfig().method_name == "fit"
    assert cf.CompeftConfig.method("paper").method_name == "paper"
    assert cf.CompeftConfig.method("paper", balance="rank").method_name is None
    with pytest.raises(cf.InvalidArgument, match="method"):
        cf.CompeftConfig.method("best")
    with pytest.raises(cf.InvalidArgument, match="either"):
        cf.compress({"w": torch.ones(4)}, cf.CompeftConfig(), method="paper")
    for bad in (dict(balance="module"), dict(scale="fit"), dict(refit=1)):
        with pytest.raises(cf.InvalidArgument):
            cf.CompeftConfig(**bad)


def test_alpha_search_walks_downhill_to_the_grid_minimum():
    from compeft_format.calibrate import FIT_ALPHAS
    from compeft_format.compress import search_alpha

    for target in FIT_ALPHAS:
        calls: list[float] = []

        def loss(a: float, t: float = target, calls: list[float] = calls) -> float:
            calls.append(a)
            return (math.log(a) - math.log(t)) ** 2

        best, losses = search_alpha(loss, FIT_ALPHAS)
        assert best == target and len(calls) == len(set(calls)) == len(losses)
        assert len(calls) <= 3 + abs(FIT_ALPHAS.index(target) - FIT_ALPHAS.index(1.0))
        assert search_alpha(loss, FIT_ALPHAS, exhaustive=True)[0] == target
    full = search_alpha(lambda a: 1.0, FIT_ALPHAS, exhaustive=True)[1]
    assert sorted(full) == sorted(FIT_ALPHAS)
    # equal losses go to the alpha nearest 1; a diverging candidate never wins
    assert search_alpha(lambda a: 0.0, (0.5, 1.0, 2.0))[0] == 1.0
    assert search_alpha(lambda a: float("nan") if a != 2.0 else 5.0, (0.5, 1.0, 2.0))[0] == 2.0
    with pytest.raises(cf.InvalidArgument):
        search_alpha(lambda a: 0.0, ())


def test_refit_without_a_pair_scale_is_still_the_papers_method():
    """refit only acts with the lsq and norm scales: with sigma it changes nothing, so the config
    is the paper's method and the file records no options."""
    cfg = cf.CompeftConfig.method("paper", refit=True)
    assert cfg.method_name == "paper" and cf.CompeftConfig.method("fit", refit=False).method_name is None
    sd = _lora(2)
    a = cf.compress(sd, cfg, **NO_DENSE)
    b = cf.compress(sd, method="paper", **NO_DENSE)
    assert a.compression.options is None
    assert all(a.tensors[k].indices.tolist() == b.tensors[k].indices.tolist() for k in sd)


@pytest.mark.parametrize("chunk", [7, 64, 1 << 18])
@pytest.mark.parametrize("seed", range(6))
def test_top_k_by_magnitude_is_the_specs_selection(monkeypatch, chunk, seed):
    """The bit-histogram selection equals sorting by (-|x|, index), in chunks or not: ties (many
    equal magnitudes, +0 and -0, subnormals, values one bit apart) go to the lower index."""
    compress_module = importlib.import_module("compeft_format.compress")

    monkeypatch.setattr(compress_module, "CHUNK", chunk)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 600))
    kind = seed % 3
    if kind == 0:  # few distinct magnitudes: ties everywhere
        x = rng.choice(np.array([0.0, -0.0, 1.0, -1.0, 2.0, 1e-40, -1e-40], np.float32), n)
    elif kind == 1:  # neighbours in the bit pattern
        x = (np.float32(1.5) + np.arange(n, dtype=np.float32) % 5 * np.finfo(np.float32).eps).astype(np.float32)
        x *= rng.choice(np.array([-1, 1], np.float32), n)
    else:
        x = rng.standard_normal(n).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30, n).astype(np.float32)
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n, n + 3}):
        expected = np.sort(np.lexsort((np.arange(n), -np.abs(x)))[:max(k, 0)])
        got = compress_module.top_k_by_magnitude(x, k)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected, err_msg=f"k={k}")
        np.testing.assert_array_equal(got, compress_module.top_k_indices(np.abs(x), k))


def test_the_standard_deviation_in_chunks_is_numpys(monkeypatch):
    compress_module = importlib.import_module("compeft_format.compress")

    x = (np.random.default_rng(3).standard_normal(10_001) * 0.02 + 0.003).astype(np.float32)
    whole = compress_module.task_std(x)
    assert whole == float(np.std(x, dtype=np.float64, ddof=1))
    monkeypatch.setattr(compress_module, "STD_CHUNK", 1000)
    assert compress_module.task_std(x) == pytest.approx(whole, rel=1e-12)


def test_compressing_holds_the_task_vector_once(monkeypatch):
    """Peak of the arrays numpy allocates while compressing a 4M-parameter LoRA (tracemalloc sees
    numpy's allocations): about one float32 copy of the task vector, and not the several copies
    (signed, magnitudes, float64 for sigma, unbalanced originals) that a selection over the whole
    vector tends to make."""
    import tracemalloc

    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(16):
        sd[f"base_model.model.layers.{i}.q_proj.lora_A.weight"] = torch.randn(16, 8192, generator=g).bfloat16()
        sd[f"base_model.model.layers.{i}.q_proj.lora_B.weight"] = torch.randn(8192, 16, generator=g).bfloat16()
    params = sum(t.numel() for t in sd.values())
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": ["q_proj"]}
    tracemalloc.start()
    try:
        ca = cf.compress(sd, peft_config=config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ca.compression.candidates == params == 4_194_304
    assert ca.compression.kept == 419_430
    assert peak < 2 * 4 * params, f"{peak / params:.1f} bytes per parameter"


def test_the_compress_benchmark_measures_the_cli(tmp_path):
    """``tools/bench_compress.py`` runs the command in a fresh process and reports its peak."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "tools" / "bench_compress.py"), "--params", "600000", "--rank", "8",
                        "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "compress.json").read_text())
    assert res["rc"] == 0 and res["params"] == 589_824 and res["input_bytes"] > 2 * res["params"]
    assert 0 < res["file_bytes"] < res["input_bytes"] / 10
    assert 0 < res["peak_growth_bytes"] < 2e9 and res["seconds"] > 0


def test_meta_tensors_and_overflowing_deltas_are_typed_errors():
    with pytest.raises(cf.InvalidArgument, match="meta device"):
        cf.compress({"w": torch.empty(4, 4, device="meta")}, **NO_DENSE)
    big = torch.full((8,), 3e38)
    for dense in ((), ("*",)):
        with pytest.raises(cf.NonFiniteInput, match="minus its base weights overflows"):
            cf.compress({"w": big}, reference={"w": -big}, dense_patterns=dense, min_sparse_numel=0)
