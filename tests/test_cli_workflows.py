"""The command line as a new user meets it: quick help, no silent overwrites, reproducible files,
JSON on every command, and inspect reports that say what they mean."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import compeft_format as cf
from compeft_format.cli import main
from compeft_format.peft_io import read_source
from conftest import VECTORS, write_lora_folder


@pytest.fixture
def lora_dir(tmp_path):
    return write_lora_folder(tmp_path / "my-lora", layers=2, dim=128)


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compeft_format.cli", *args], capture_output=True, text=True,
                          env=env)


def test_help_and_argument_errors_do_not_import_torch():
    code = ("import sys; from compeft_format.cli import build_parser; p = build_parser(); p.format_help(); "
            "[a for a in p._subparsers._group_actions[0].choices.values() if a.format_help()]; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
    p = run("--help")
    assert p.returncode == 0 and "compress" in p.stdout and "cpet" in p.stdout


def test_compress_refuses_to_overwrite_without_force(lora_dir, tmp_path, capsys):
    out = tmp_path / "a.cpeft.safetensors"
    out.write_bytes(b"precious")
    assert main(["compress", str(lora_dir), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "INVALID_ARGUMENT" in err and "--force" in err
    assert out.read_bytes() == b"precious"
    assert main(["compress", str(lora_dir), "-o", str(out), "--force"]) == 0
    cf.verify(out)
    assert main(["compress", str(lora_dir), "-o", str(tmp_path)]) == 1  # a folder is not an output file
    assert "is a folder" in capsys.readouterr().err


def test_source_date_epoch_and_created_at_make_files_reproducible(lora_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b = tmp_path / "a.cpeft.safetensors", tmp_path / "b.cpeft.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(a)]) == 0
    assert main(["compress", str(lora_dir), "-o", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert cf.verify(a).provenance.created_at == "2023-11-14T22:13:20Z"
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    c = tmp_path / "c.cpeft.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(c), "--created-at", "2023-11-14T22:13:20Z"]) == 0
    assert c.read_bytes() == a.read_bytes()
    assert main(["compress", str(lora_dir), "-o", str(c), "--force", "--created-at", "yesterday"]) == 1
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "soon")
    with pytest.raises(cf.InvalidArgument, match="SOURCE_DATE_EPOCH"):
        cf.compress({"w": torch.ones(4)})


def test_decompress_never_leaves_stale_files(lora_dir, tmp_path, capsys):
    packed = tmp_path / "a.cpeft.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(packed)]) == 0
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "adapter_model.bin").write_bytes(b"an older adapter")
    capsys.readouterr()
    assert main(["decompress", str(packed), "-o", str(dest)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_model.bin"]
    assert main(["decompress", str(packed), "-o", str(dest), "--force", "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(written["files"]) == sorted(str(p) for p in dest.iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["decompress", str(packed), "-o", str(empty)]) == 0  # an empty folder is fine


def test_force_never_writes_over_an_input(lora_dir, tmp_path, capsys):
    single = tmp_path / "lora.safetensors"
    single.write_bytes((lora_dir / "adapter_model.safetensors").read_bytes())
    packed = tmp_path / "a.cpeft.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(packed), "--quiet"]) == 0
    before = single.read_bytes(), packed.read_bytes()
    capsys.readouterr()
    for args in (["compress", str(single), "-o", str(single), "--reference", "zero"],
                 ["merge", str(packed), str(lora_dir), "-o", str(packed)],
                 ["decompress", str(packed), "-o", str(packed)]):
        assert main([*args, "--force"]) == 1, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "also an input of this command" in err, args
    assert (single.read_bytes(), packed.read_bytes()) == before


def test_force_never_deletes_the_input_or_files_the_command_did_not_write(lora_dir, tmp_path, capsys):
    """--force replaces a folder whole: only one of the command's own earlier outputs, never a
    folder holding its input or someone's other files."""
    work = tmp_path / "work"
    work.mkdir()
    packed = work / "a.cpeft.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(packed), "--quiet"]) == 0
    (work / "thesis.tex").write_text("years of work")
    (work / "sub").mkdir()
    capsys.readouterr()
    assert main(["decompress", str(packed), "-o", str(work), "--force"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "which this command reads" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    (other / "adapter_config.json").write_text("{}")
    assert main(["decompress", str(packed), "-o", str(other), "--force"]) == 1
    err = capsys.readouterr().err
    assert "did not write" in err and "thesis.tex" in err
    nested = tmp_path / "nested"
    (nested / "sub").mkdir(parents=True)
    assert main(["decompress", str(packed), "-o", str(nested), "--force"]) == 1
    assert sorted(p.name for p in work.iterdir()) == ["a.cpeft.safetensors", "sub", "thesis.tex"]
    assert (other / "thesis.tex").read_text() == "years of work" and (nested / "sub").is_dir()
    cf.verify(packed)


def test_long_lists_are_shown_by_whole_items():
    from compeft_format.report import _short

    assert _short(["q_proj", "v_proj"]) == "[q_proj, v_proj]"
    assert _short([f"model.layers.{i}.self_attn.q_proj" for i in range(3)]) == "[model.layers.0.self_attn.q_proj, +2 more]"
    assert _short([f"m{i}" for i in range(30)]) == "[m0, m1, m2, m3, m4, m5, m6, m7, +22 more]"
    assert _short(["\x1b[31mred"]) == "[\\u001b[31mred]"


def test_inspect_checks_every_file_and_says_what_it_means(lora_dir, tmp_path, capsys):
    good = tmp_path / "a.cpeft.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(good)]) == 0
    bad = VECTORS / "bad_stream_digest.cpeft.safetensors"
    capsys.readouterr()
    assert main(["inspect", str(good), str(bad)]) == 1
    out, err = capsys.readouterr()
    assert "PEFT config: peft_type=LORA, r=8, lora_alpha=16" in out
    assert "base model: org/tiny" in out and " @ -" not in out
    assert err == f"compeft inspect: STREAM_DIGEST_MISMATCH: {bad}: " + err.split(f"{bad}: ", 1)[1]
    assert err.count("\n") == 1
    assert main(["inspect", "--json", str(good), str(bad)]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert [r["valid"] for r in reports] == [True, False] and reports[1]["code"] == "STREAM_DIGEST_MISMATCH"
    assert reports[0]["adapter"]["peft_config"]["r"] == 8

    tiny = tmp_path / "tiny.cpeft.safetensors"  # a few elements: the header outweighs fp16
    cf.save(cf.compress({"w": torch.randn(4)}, min_sparse_numel=0), tiny)
    assert main(["inspect", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "x larger;" in out and "base model: not recorded" in out and "x smaller" not in out.split("vs fp16")[1]


def test_json_on_the_other_commands(lora_dir, tmp_path, capsys):
    key = tmp_path / "k"
    assert main(["keygen", "-o", str(key), "--json"]) == 0
    keys = json.loads(capsys.readouterr().out)
    assert keys["public_key"] == f"{key}.pub" and len(keys["fingerprint"]) > 8
    packed = tmp_path / "a.cpeft.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(packed)]) == 0
    capsys.readouterr()
    assert main(["sign", str(packed), "--key", str(key), "--json"]) == 0
    signed = json.loads(capsys.readouterr().out)
    assert signed == {"path": str(packed), "signature": f"{packed}.sig", "signed_by": keys["fingerprint"]}


def test_options_that_would_be_ignored_or_crash_are_refused(tmp_path):
    p = run("pull", "org/x", "--to-peft")
    assert p.returncode == 1 and "INVALID_ARGUMENT" in p.stderr and "-o" in p.stderr
    p = run("hub", "serve", "--port", "99999", "--root", str(tmp_path))
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "--port" in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.startswith("compeft hub serve: INVALID_ARGUMENT: ")


def _peft_folder_with_two_adapters(path):
    """What peft's save_pretrained writes for a model holding two adapters: "default" at the top,
    "other" in a sub-folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    pm.save_pretrained(path)
    assert (path / "adapter_config.json").is_file() and (path / "other" / "adapter_config.json").is_file()


def test_a_folder_of_several_adapters_compresses_them_all(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    src = tmp_path / "two"
    _peft_folder_with_two_adapters(src)
    assert main(["compress", str(src), "-o", str(tmp_path / "x.cpeft.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "holds 2 adapters (default, other)" in err and not (tmp_path / "x.cpeft.safetensors").exists()
    out = tmp_path / "packed"
    assert main(["compress", str(src), "-o", str(out), "--jobs", "1", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "2 of 2 adapters compressed" in table and "default" in table and "other" in table
    assert sorted(p.name for p in out.iterdir()) == ["default.cpeft.safetensors", "other.cpeft.safetensors"]
    # each as compressing its folder alone makes it
    one = tmp_path / "other.cpeft.safetensors"
    assert main(["compress", str(src / "other"), "-o", str(one)]) == 0
    assert (out / "other.cpeft.safetensors").read_bytes() == one.read_bytes()
    assert cf.verify(out / "other.cpeft.safetensors").adapter.peft_config["target_modules"] == ["k_proj"]


def test_multi_adapter_folders_among_others_keep_every_adapter(tmp_path, capsys, monkeypatch):
    """A multi-adapter folder inside a folder of adapters, and adapters grouped in a plain folder:
    every adapter is compressed (none is dropped), named by its path."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    src = tmp_path / "adapters"
    _peft_folder_with_two_adapters(src / "multi")
    _peft_folder_with_two_adapters(src / "group" / "inner")
    out = tmp_path / "packed"
    assert main(["compress", str(src), "-o", str(out), "--jobs", "1", "--quiet"]) == 0
    assert "4 of 4 adapters compressed" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "group.inner.cpeft.safetensors", "group.inner.other.cpeft.safetensors",
        "multi.cpeft.safetensors", "multi.other.cpeft.safetensors"]
    assert cf.verify(out / "multi.other.cpeft.safetensors").adapter.peft_config["target_modules"] == ["k_proj"]
    # merge takes an adapter folder's top adapter, as peft loads it (a Trainer's output folder holds
    # its checkpoints beside it), and says so; a folder that only holds adapters is refused
    assert main(["merge", str(src / "multi"), str(src / "group" / "inner"), "-o", str(tmp_path / "m.cpeft")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "holds 1 more adapter(s) in sub-folders (other); its top adapter is merged" in err
    assert main(["merge", str(src / "group"), str(src / "multi"), "-o", str(tmp_path / "g.cpeft")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 2 adapters (inner, inner.other)" in err
    assert not (tmp_path / "g.cpeft").exists()


def test_one_failing_adapter_is_named_and_the_others_are_written(tmp_path, capsys):
    src = tmp_path / "many"
    src.mkdir()
    for name in ("a", "b"):
        d = src / name
        d.mkdir()
        save_file({"base_model.model.m.q.lora_A.weight": torch.randn(4, 64),
                   "base_model.model.m.q.lora_B.weight": torch.randn(64, 4)}, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                           "target_modules": ["q"]}))
    (src / "broken").mkdir()
    (src / "broken" / "adapter_config.json").write_text("{not json")
    save_file({"w": torch.tensor([1.0, float("nan")] * 50)}, str(src / "nan.safetensors"))
    out = tmp_path / "out"
    assert main(["compress", str(src), "-o", str(out), "--jobs", "2", "--quiet", "--json", "--reference", "zero"]) == 1
    out_text, err = capsys.readouterr()
    results = {r["name"]: r for r in json.loads(out_text)}
    assert {n: r["ok"] for n, r in results.items()} == {"a": True, "b": True, "broken": False, "nan": False}
    assert results["nan"]["code"] == "NON_FINITE_INPUT" and results["broken"]["code"] == "INVALID_INPUT"
    assert sorted(p.name for p in out.iterdir()) == ["a.cpeft.safetensors", "b.cpeft.safetensors"]
    assert sorted(line.split(": ")[2] for line in err.strip().splitlines()) == [str(src / "broken"),
                                                                                 str(src / "nan.safetensors")]
    assert main(["compress", str(src), "-o", str(out), "--jobs", "1", "--quiet", "--reference", "zero"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert any("a.cpeft.safetensors exists" in line for line in err) and len(err) == 4


def test_a_single_file_lora_keeps_its_metadata_through_compress_and_decompress(tmp_path, capsys):
    """A kohya-style single-file LoRA: its ss_* and modelspec.* metadata is recorded (format 1.5)
    and written back by decompress -o FILE.safetensors."""
    from safetensors import safe_open

    torch.manual_seed(0)
    src = tmp_path / "style.safetensors"
    sd = {}
    for blk in range(2):
        stem = f"lora_unet_down_blocks_0_attentions_{blk}_proj_in"
        sd[f"{stem}.lora_down.weight"] = torch.randn(4, 64, dtype=torch.float16)
        sd[f"{stem}.lora_up.weight"] = torch.randn(64, 4, dtype=torch.float16) * 0.01
        sd[f"{stem}.alpha"] = torch.tensor(4.0, dtype=torch.float16)
    meta = {"ss_network_dim": "4", "ss_network_module": "networks.lora", "modelspec.title": "style",
            "ss_tag_frequency": json.dumps({"set": {"cat": 3}}), "format": "pt"}
    save_file(sd, str(src), metadata=meta)
    packed = tmp_path / "style.cpeft.safetensors"
    assert main(["compress", str(src), "-o", str(packed), "--density", "0.3"]) == 0
    m = cf.verify(packed)
    assert cf.open_file(packed).metadata["compeft.version"] == "1.5"
    assert m.provenance.source_metadata == {k: v for k, v in meta.items() if k != "format"}
    out = tmp_path / "back.safetensors"
    assert main(["decompress", str(packed), "-o", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == meta
        expected = cf.load(packed)
        assert set(f.keys()) == set(sd) and all(torch.equal(f.get_tensor(k), expected[k]) for k in f.keys())
    capsys.readouterr()
    assert main(["inspect", str(packed)]) == 0
    shown = capsys.readouterr().out
    assert "source metadata (written back by decompress -o FILE.safetensors): 4 keys, [modelspec.title, " in shown
    assert main(["inspect", str(packed), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source_metadata"] == m.provenance.source_metadata
    # it has no PEFT config: a folder of it would load nowhere
    assert main(["decompress", str(packed), "-o", str(tmp_path / "folder")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-o NAME.safetensors" in err and not (tmp_path / "folder").exists()
    # a PEFT folder records none, and its files stay version 1.3
    lora = tmp_path / "lora"
    lora.mkdir()
    save_file({"base_model.model.m.q.lora_A.weight": torch.randn(4, 64),
               "base_model.model.m.q.lora_B.weight": torch.randn(64, 4)}, str(lora / "adapter_model.safetensors"))
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q"]}))
    assert main(["compress", str(lora), "-o", str(tmp_path / "l.cpeft.safetensors")]) == 0
    assert cf.open_file(tmp_path / "l.cpeft.safetensors").metadata["compeft.version"] == "1.3"


def test_source_metadata_is_read_only_from_files_of_1_5():
    """The member 1.5 added is an unknown member in a file that says it is 1.4 (spec 8.1), for the
    library and for the second reader."""
    import tempfile
    from pathlib import Path

    from test_recovery import relabelled

    from conftest import VECTORS
    from second_reader import read_manifest

    vector = VECTORS / "v1_5_source_metadata.cpeft.safetensors"
    assert cf.open_file(vector).manifest.provenance.source_metadata["ss_network_dim"] == "8"
    assert read_manifest(vector)[1]["provenance"]["source_metadata"]["ss_network_dim"] == "8"
    with tempfile.TemporaryDirectory() as tmp:
        old = relabelled(vector, Path(tmp) / "old.cpeft.safetensors", "1.4")
        assert cf.open_file(old).manifest.provenance.source_metadata is None
        assert "source_metadata" not in read_manifest(old)[1]["provenance"]


def test_compress_shows_its_stages_on_a_terminal(lora_dir, tmp_path):
    """On a terminal (a pseudo-terminal here, 120 columns) compress shows a progress bar of its
    stages on stderr; --quiet hides it."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    def run_on_terminal(*args: str) -> bytes:
        pid, fd = pty.fork()
        if pid == 0:  # the child: compeft on the terminal
            os.execv(sys.executable, [sys.executable, "-m", "compeft_format.cli", *args])
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        out = b""
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
        assert os.waitpid(pid, 0)[1] == 0
        return out

    out = run_on_terminal("compress", str(lora_dir), "-o", str(tmp_path / "a.cpeft.safetensors"))
    assert b"compressing: 1/4" in out and b"writing: 2/4" in out
    out = run_on_terminal("compress", str(lora_dir), "-o", str(tmp_path / "b.cpeft.safetensors"), "--quiet")
    assert b"compressing" not in out and b"smaller than fp16" in out


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "Model.SafeTensors", "pytorch_lora_weights.safetensors",
                                  "adapter_model-00001-of-00002.safetensors"])
def test_a_compeft_file_is_never_written_under_a_name_peft_loads(lora_dir, tmp_path, capsys, name):
    """peft would load such a file as unknown tensors, warn of missing keys and run the base model."""
    out = tmp_path / "out" / name
    out.parent.mkdir()
    assert main(["compress", str(lora_dir), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "INVALID_ARGUMENT" in err and "NAME.cpeft.safetensors" in err
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert main(["merge", str(lora_dir), str(lora_dir), "-o", str(out)]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err and not out.exists()
    sd, config = read_source(lora_dir)
    ca = cf.compress(sd, peft_config=config)
    with pytest.raises(cf.InvalidArgument, match="loads by itself"):
        cf.save(ca, out)
    assert list(out.parent.iterdir()) == []


def test_a_peft_folder_holding_a_compeft_file_is_named_for_what_it_is(lora_dir, tmp_path, capsys):
    """A compeft file copied into a PEFT folder as adapter_model.safetensors (which peft would load
    as the base model, warning only of missing keys): every command given the folder says so."""
    packed = tmp_path / "a.cpeft.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(packed), "--quiet"]) == 0
    bad = tmp_path / "renamed"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((lora_dir / "adapter_config.json").read_bytes())
    (bad / "adapter_model.safetensors").write_bytes(packed.read_bytes())
    capsys.readouterr()
    for args in (["inspect", str(bad)], ["validate", str(bad)], ["decompress", str(bad), "-o", str(tmp_path / "x")],
                 ["compress", str(bad), "-o", str(tmp_path / "y.cpeft")]):
        assert main(args) == 1, args
        out = capsys.readouterr()
        line = (out.err or out.out).strip()
        assert "\n" not in line and "compeft file" in line, args
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.cpeft").exists()
    with pytest.raises(cf.InputError, match="peft cannot load"):
        cf.load(bad)
    assert main(["inspect", str(lora_dir)]) == 1
    assert "PEFT adapter folder, which `compeft compress` compresses" in capsys.readouterr().err
    trap = bad / "adapter_model.safetensors"
    for command in ("inspect", "validate"):  # the file itself is valid, and its name is a trap
        assert main([command, str(trap)]) == 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "warning" in err and "NAME.cpeft.safetensors" in err
    assert main(["merge", str(bad), str(packed), "-o", str(tmp_path / "m.cpeft")]) == 1
    assert "under a name peft loads by itself" in capsys.readouterr().err
