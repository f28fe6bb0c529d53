"""The command line: compress, decompress, validate, inspect; one-line errors, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import compeft_format as cf
from compeft_format.cli import main
from conftest import VECTORS, bits_equal, write_lora_folder


@pytest.fixture
def lora_dir(tmp_path):
    return write_lora_folder(tmp_path / "my-lora", layers=4, dim=256)


def test_compress_validate_inspect_decompress(lora_dir, tmp_path, capsys):
    out = tmp_path / "my-lora.cpeft.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(out), "--density", "0.1", "--alpha", "1.0"]) == 0
    line = capsys.readouterr().out
    assert "smaller than fp16" in line
    r = cf.inspect(out)
    assert 10 <= r["ratio_vs_fp16"] <= 30
    assert r["adapter"]["kind"] == "lora" and r["base_model"]["id"] == "org/tiny"
    assert r["compression"]["reference"] == "zero"

    assert main(["validate", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: OK"

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bits/param" in text and "ternary" in text
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["file_bytes"] == out.stat().st_size

    dest = tmp_path / "restored"
    assert main(["decompress", str(out), "-o", str(dest)]) == 0
    restored = load_file(str(dest / "adapter_model.safetensors"))
    expected = cf.load(out)
    assert set(restored) == set(expected)
    for k in expected:
        assert bits_equal(restored[k], expected[k])
    cfg = json.loads((dest / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8

    assert main(["decompress", str(out), "-o", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    assert load_file(str(tmp_path / "f32" / "adapter_model.safetensors"))[k].dtype == torch.float32


@pytest.mark.parametrize("positions", ["golomb", "bitmap"])
def test_positions_option(lora_dir, tmp_path, positions):
    out = tmp_path / "p.cpeft.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(out), "--positions", positions]) == 0
    m = cf.verify(out)
    assert {g.params["positions"] for g in m.groups if g.encoding == "ternary"} == {positions}


def test_ia3_defaults_to_ones_reference(tmp_path):
    d = tmp_path / "ia3"
    d.mkdir()
    save_file({"base_model.model.l.ia3_l": 1 + 0.1 * torch.randn(1, 128)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    out = tmp_path / "ia3.cpeft.safetensors"
    assert main(["compress", str(d), "-o", str(out), "--density", "0.2"]) == 0
    m = cf.verify(out)
    assert m.compression.reference == "ones" and m.tensors[0].offset == 1.0
    dec = cf.load(out)["base_model.model.l.ia3_l"]
    assert int((dec != 1.0).sum()) == round(0.2 * 128)


def test_compress_plain_safetensors_with_base_reference(tmp_path):
    base = {"w": torch.randn(20, 20)}
    ft = {"w": base["w"] + 0.01 * torch.randn(20, 20)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    out = tmp_path / "delta.cpeft.safetensors"
    assert main(["compress", str(tmp_path / "ft.safetensors"), "-o", str(out), "--density", "0.2",
                 "--reference", str(tmp_path / "base.safetensors")]) == 0
    m = cf.verify(out)
    assert m.adapter.representation == "delta" and m.adapter.kind == "full"


def test_validate_many_files_mixed(capsys):
    files = sorted(str(p) for p in VECTORS.glob("*.safetensors"))
    assert main(["validate", *files]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(files)
    index = json.loads((VECTORS / "vectors.json").read_text())
    codes = {v["file"]: v["code"] for v in index["invalid"]}
    for f, line in zip(files, lines, strict=True):
        name = f.rsplit("/", 1)[1]
        if name in codes:
            assert line.startswith(f"{f}: INVALID {codes[name]}: ")
        else:
            assert line == f"{f}: OK"
    assert main(["validate", "--json", files[0]]) in (0, 1)
    assert "valid" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("args, code", [
    (["compress", "/nonexistent/dir", "-o", "x.safetensors"], "FILE_NOT_FOUND"),
    (["compress", "SRC", "-o", "OUT", "--density", "0"], "INVALID_ARGUMENT"),
    (["compress", "SRC", "-o", "OUT", "--density", "1.5"], "INVALID_ARGUMENT"),
    (["decompress", str(VECTORS / "bad_stream_digest.cpeft.safetensors"), "-o", "OUTDIR"], "STREAM_DIGEST_MISMATCH"),
    (["inspect", str(VECTORS / "bad_unknown_major.cpeft.safetensors")], "UNSUPPORTED_VERSION"),
    (["decompress", str(VECTORS / "bad_plain.safetensors"), "-o", "OUTDIR"], "NOT_COMPEFT"),
])
def test_errors_are_one_line_no_traceback(args, code, lora_dir, tmp_path):
    args = [a.replace("SRC", str(lora_dir)).replace("OUTDIR", str(tmp_path / "o")).replace("OUT", str(tmp_path / "o.safetensors"))
            for a in args]
    p = subprocess.run([sys.executable, "-m", "compeft_format.cli", *args], capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f": {code}: " in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o").exists()


def test_non_finite_adapter_refused(tmp_path):
    d = tmp_path / "nan"
    d.mkdir()
    w = torch.randn(64, 8)
    w[3, 3] = float("nan")
    save_file({"x.lora_A.weight": w}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    out = tmp_path / "nan.cpeft.safetensors"
    p = subprocess.run([sys.executable, "-m", "compeft_format.cli", "compress", str(d), "-o", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "NON_FINITE_INPUT" in p.stderr and "Traceback" not in p.stderr
    assert list(tmp_path.glob("nan.cpeft*")) == [] and list(tmp_path.glob(".nan*")) == []


def test_non_float_adapter_refused(tmp_path, capsys):
    src = tmp_path / "ints.safetensors"
    save_file({"w": torch.arange(100)}, str(src))
    assert main(["compress", str(src), "-o", str(tmp_path / "o.safetensors"), "--reference", "zero"]) == 1
    assert "UNSUPPORTED_DTYPE" in capsys.readouterr().err


def test_compressing_a_compeft_file_is_refused(tmp_path, capsys):
    src = VECTORS / "v1_ternary_global.cpeft.safetensors"
    assert main(["compress", str(src), "-o", str(tmp_path / "o.safetensors")]) == 1
    assert "already a compeft file" in capsys.readouterr().err


def test_unknown_peft_type_needs_reference(tmp_path, capsys):
    d = tmp_path / "vera"
    d.mkdir()
    save_file({"w": torch.randn(64)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA"}))
    assert main(["compress", str(d), "-o", str(tmp_path / "o.safetensors")]) == 1
    assert "--reference" in capsys.readouterr().err
    assert main(["compress", str(d), "-o", str(tmp_path / "o.safetensors"), "--reference", "zero"]) == 0


class _Exploit:
    """A pickle payload that would create a file when unpickled by an unrestricted loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_legacy_bin_is_refused_without_running_code(tmp_path, capsys):
    d = tmp_path / "evil"
    d.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"x.lora_A.weight": torch.randn(8, 8), "payload": _Exploit(str(marker))}, str(d / "adapter_model.bin"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert main(["compress", str(d), "-o", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "INVALID_INPUT" in err and "weights-only" in err
    assert not marker.exists()
    assert not (tmp_path / "o.safetensors").exists()


def test_non_factor_tensors_with_glob_characters_in_their_names_stay_dense(tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    save_file({"base_model.model.l.lora_A.weight": torch.randn(4, 64), "base_model.model.l.lora_B.weight": torch.randn(64, 4),
               "base_model.model.head[0].weight": torch.randn(8, 64)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    ca = cf.compress_peft(d, density=0.1)
    assert ca.tensors["base_model.model.head[0].weight"].encoding == "dense"
    assert ca.tensors["base_model.model.l.lora_A.weight"].encoding == "ternary"


def test_record_and_check_a_base_binding(lora_dir, tmp_path, capsys):
    """--base-* options record a binding (the fingerprint read from a sharded checkpoint); check-base
    accepts the same weights in another float dtype only when the float32 fingerprint was asked for."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    model.float().save_pretrained(tmp_path / "base-fp32")
    for fp, fp32_ok in (("stored", False), ("float32", True)):
        out = tmp_path / f"{fp}.cpeft.safetensors"
        assert main(["compress", str(lora_dir), "-o", str(out), "--base-model", "org/tiny", "--base-revision", "r1",
                     "--base-weights", str(tmp_path / "base"), "--fingerprint", fp]) == 0
        algorithm = cf.binding.AS_STORED if fp == "stored" else cf.binding.FLOAT32
        line = capsys.readouterr().out
        assert line.count("\n") == 1 and f"; base org/tiny@r1 (fingerprint {algorithm} " in line
        m = cf.verify(out)
        assert m.base_model.id == "org/tiny" and m.base_model.fingerprint == cf.fingerprint(tmp_path / "base", algorithm)
        assert main(["check-base", str(out), str(tmp_path / "base")]) == 0
        assert "is its base" in capsys.readouterr().out
        assert main(["check-base", str(out), str(tmp_path / "base-fp32")]) == (0 if fp32_ok else 1)
        err = capsys.readouterr().err
        assert ("BASE_MISMATCH" in err) == (not fp32_ok), err
    plain = tmp_path / "plain.cpeft.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(plain)]) == 0
    assert cf.verify(plain).base_model == cf.BaseBinding(id="org/tiny")  # as the PEFT config names it
    capsys.readouterr()
    assert main(["check-base", str(plain), str(tmp_path / "base")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "BASE_MISMATCH" in err and "records no fingerprint" in err
    assert main(["compress", str(lora_dir), "-o", str(plain), "--base-revision", "r2", "--force"]) == 0
    assert cf.verify(plain).base_model == cf.BaseBinding(id="org/tiny", revision="r2")
    assert main(["compress", str(lora_dir), "-o", str(plain), "--base-weights", str(tmp_path / "base"), "--force"]) == 0
    assert cf.verify(plain).base_model.id is None  # bound to weights: the config's name is not theirs


def test_methods_fidelity_json_and_the_emptied_warning(tmp_path, capsys):
    d = tmp_path / "small-b"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(3):
        pre = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        sd[f"{pre}.lora_A.weight"] = torch.randn(8, 64, generator=g)
        sd[f"{pre}.lora_B.weight"] = torch.randn(64, 8, generator=g) * 0.01  # B far smaller than A
    save_file(sd, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                       "target_modules": ["q_proj"]}))
    paper = tmp_path / "paper.cpeft.safetensors"
    assert main(["compress", str(d), "-o", str(paper), "--method", "paper", "--density", "0.2"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and out.endswith("relative error of the weight update 1.000 (worst module 1.000)\n")
    assert err.startswith("compeft compress: warning: 3 of 3 module(s) lost their whole update")
    assert cf.read(paper).compression.options is None
    assert main(["inspect", str(paper)]) == 0
    assert "warning: 3 LoRA module(s) keep no entry in a factor" in capsys.readouterr().out
    many = tmp_path / "many"  # the batch mode warns as well, below its table
    for name in ("one", "two"):
        shutil.copytree(d, many / name)
    assert main(["compress", str(many), "-o", str(tmp_path / "packed"), "--method", "paper", "--density", "0.2",
                 "--jobs", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "warning: one: 3 module(s) lost their whole update" in err

    fit = tmp_path / "fit.cpeft.safetensors"
    assert main(["compress", str(d), "-o", str(fit), "--density", "0.2", "--json"]) == 0
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert err == "" and r["fidelity"]["emptied"] == 0 and len(r["fidelity"]["per_module"]) == 3
    assert r["compression"]["options"] == {"balance": "rank", "scale": "norm", "refit": True}
    assert 0 < r["fidelity"]["relative_error"] < 2
    assert r["fidelity"]["relative_error"] == pytest.approx(r["compression"]["fidelity"]["relative_error"], abs=1e-6)
    assert main(["inspect", str(fit)]) == 0
    text = capsys.readouterr().out
    assert "options: balance=rank scale=norm refit=True" in text and "keep no entry" not in text

    # an override of one option leaves the others of the method
    assert main(["compress", str(d), "-o", str(fit), "--no-refit", "--scale", "mean", "--json", "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["compression"]["options"] == {"balance": "rank", "scale": "mean",
                                                                             "refit": False}


def test_calibrate_picks_alpha_and_density_by_loss(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaForCausalLM

    from conftest import save_tiny_causal_lm

    model_dir = save_tiny_causal_lm(tmp_path / "base")
    texts = [f"the number {i} is followed by {i + 1}, then {i + 2}." for i in range(40)]
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    # a LoRA that lowers the loss on this text: a few steps of training
    pm = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok(t)["input_ids"][:24] for t in texts[:16]])
    for _ in range(15):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    lora = tmp_path / "lora"
    pm.save_pretrained(lora)
    out = tmp_path / "c.cpeft.safetensors"
    argv = ["compress", str(lora), "-o", str(out), "--force", "--calibrate", str(model_dir), "--data", str(data),
            "--alphas", "0.5,1,2", "--max-samples", "12", "--seq-len", "32", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    cal = r["calibration"]
    assert len(cal["candidates"]) == 3 and cal["density"] == r["compression"]["density"]
    best = min(cal["candidates"], key=lambda c: c["loss"])
    assert cal["alpha"] == best["alpha"] == r["compression"]["alpha"]
    assert cal["adapter_loss"] < cal["base_loss"]
    assert cf.verify(out) is not None and len(get_peft_model_state_dict(pm)) == len(cf.load(out))

    # under a byte budget the density is chosen too; every density tried fits or is the first that does not
    budget = out.stat().st_size * 2
    assert main(argv + ["--max-bytes", str(budget)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["file_bytes"] <= budget
    sizes = {float(k): v for k, v in r["calibration"]["sizes"].items()}
    assert sizes[r["calibration"]["density"]] == r["file_bytes"]
    assert all(d == max(sizes) or n <= budget for d, n in sizes.items())

    assert main(argv[:-1] + ["--max-bytes", "10"]) == 1
    assert "INVALID_ARGUMENT: no density fits in 10 bytes" in capsys.readouterr().err
    assert main(["compress", str(lora), "-o", str(out), "--force", "--calibrate", str(model_dir)]) == 1
    assert "needs --data" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": 3}\n')
    assert main(["compress", str(lora), "-o", str(out), "--force", "--calibrate", str(model_dir), "--data", str(bad)]) == 1
    assert capsys.readouterr().err.strip().endswith("bad.jsonl:2: each line must be an object with a string 'text'")
    assert main(["compress", str(lora), "-o", str(out), "--force", "--max-bytes", "100"]) == 1
    assert "--max-bytes needs --calibrate" in capsys.readouterr().err
