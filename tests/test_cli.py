"""The command line: compress, decompress, validate, inspect; one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import compeft_format as cf
from compeft_format.cli import main
from conftest import VECTORS, bits_equal


@pytest.fixture
def lora_dir(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "my-lora"
    d.mkdir()
    sd = {}
    for i in range(4):
        for p in ("q_proj", "v_proj"):
            pre = f"base_model.model.model.layers.{i}.self_attn.{p}"
            sd[f"{pre}.lora_A.weight"] = torch.randn(8, 256, dtype=torch.float16) * 0.02
            sd[f"{pre}.lora_B.weight"] = torch.randn(256, 8, dtype=torch.float16) * 0.02
    save_file(sd, str(d / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
           "base_model_name_or_path": "org/tiny", "revision": None, "task_type": "CAUSAL_LM"}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


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
    assert main(["compress", str(src), "-o", str(tmp_path / "o.safetensors")]) == 1
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
    assert main(["compress", str(lora_dir), "-o", str(plain), "--base-revision", "r2"]) == 0
    assert cf.verify(plain).base_model == cf.BaseBinding(id="org/tiny", revision="r2")
    assert main(["compress", str(lora_dir), "-o", str(plain), "--base-weights", str(tmp_path / "base")]) == 0
    assert cf.verify(plain).base_model.id is None  # bound to weights: the config's name is not theirs
