"""Hub repositories as inputs: compress, inspect, validate and load_adapter take
``namespace/name[@rev]`` and ``hf://`` paths, against ``compeft hub serve`` on 127.0.0.1."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import compeft_format as cf
from compeft_format.cli import main
from compeft_format.hub import source
from compeft_format.hub.server import make_server
from conftest import perturb_trainable

TOKEN = "s3cret"
CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A server on 127.0.0.1, HF_ENDPOINT pointing at it and the cache in tmp_path."""
    server = make_server(tmp_path / "hub", token=TOKEN)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr("compeft_format.hub.download.default_cache", lambda: tmp_path / "cache")
    yield endpoint
    server.shutdown()
    server.server_close()


def base_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(CFG).eval()


def lora_folder(tmp_path, seed: int = 1):
    pm = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(pm, seed).save_pretrained(tmp_path / f"lora{seed}")
    return tmp_path / f"lora{seed}"


def test_what_names_a_repository(tmp_path, monkeypatch):
    assert source.parse(tmp_path) is None  # a path that exists is local
    assert source.parse("me/x") == source.HubRef("me/x", "main")
    assert source.parse("me/x@dev") == source.HubRef("me/x", "dev")
    assert source.parse("hf://me/x@v1/sub/a.cpeft.safetensors") == source.HubRef("me/x", "v1", "sub/a.cpeft.safetensors")
    assert source.parse("./me/x") is None and source.parse("x.cpeft.safetensors") is None
    # a mistyped local path is a missing file, not a repository
    assert source.parse("typo/adapter.cpeft.safetensors") is None and source.parse("me/x.json@dev") is None
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path)
    assert source.parse("here/typo") is None and source.parse("there/typo") == source.HubRef("there/typo", "main")
    assert source.parse("hf://me/x.safetensors") == source.HubRef("me/x.safetensors", "main")
    for bad in ("hf://datasets/me/x", "hf://me/x/../y", "hf://me"):
        with pytest.raises(cf.InvalidArgument):
            source.parse(bad)


def test_a_compeft_repository_is_validated_inspected_and_loaded(hub, tmp_path, capsys):
    files = []
    for seed in (1, 2):
        files.append(tmp_path / f"a{seed}.cpeft.safetensors")
        cf.save(cf.compress_peft(lora_folder(tmp_path, seed)), files[-1])
    cf.push(files, "me/repo", endpoint=hub, token=TOKEN)
    assert main(["validate", "me/repo"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.rsplit("/", 1)[1] for line in lines] == ["a1.cpeft.safetensors: OK", "a2.cpeft.safetensors: OK"]
    assert main(["inspect", "--json", "hf://me/repo/a2.cpeft.safetensors"]) == 0
    assert json.loads(capsys.readouterr().out)["file_bytes"] == files[1].stat().st_size
    with pytest.raises(cf.InvalidArgument, match="holds 2 artifacts"):
        cf.load_adapter(base_model(), "me/repo")
    model = cf.load_adapter(base_model(), "hf://me/repo@main/a1.cpeft.safetensors")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, cf.load_adapter(base_model(), files[0])(ids).logits)
    assert main(["validate", "me/missing"]) == 1
    assert "HUB_REPO_NOT_FOUND" in capsys.readouterr().out


def test_a_peft_repository_is_compressed_from_the_hub(hub, tmp_path, capsys):
    folder = lora_folder(tmp_path)
    api = HfApi(endpoint=hub, token=TOKEN)
    api.create_repo("me/peft")
    api.create_commit("me/peft", [CommitOperationAdd(p.name, str(p)) for p in folder.iterdir()], commit_message="x")
    out = tmp_path / "hub.cpeft.safetensors"
    assert main(["compress", "me/peft", "-o", str(out)]) == 0
    local = tmp_path / "local.cpeft.safetensors"
    assert main(["compress", str(folder), "-o", str(local)]) == 0
    got, want = cf.load(out), cf.load(local)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    assert cf.verify(out).adapter.peft_config["r"] == 4
    # load_adapter takes compressed artifacts: a PEFT repository is named for what it is
    with pytest.raises(cf.HubNoIndex, match="not a compeft repository.*PeftModel.from_pretrained") as e:
        cf.load_adapter(base_model(), "me/peft")
    assert e.value.repo_id == "me/peft"
    # inspect and validate take compeft repositories; a PEFT one is named for what it is
    capsys.readouterr()
    for command in ("inspect", "validate"):
        assert main([command, "me/peft"]) == 1
        out = capsys.readouterr()
        assert "HUB_NO_INDEX" in out.out + out.err and "is not a compeft repository" in out.out + out.err
    # errors in a repository's files name it, not the cache folder it was downloaded into
    api.create_repo("me/badjson")
    api.create_commit("me/badjson", [CommitOperationAdd("adapter_config.json", b"{not json"),
                                     CommitOperationAdd("adapter_model.safetensors", str(folder / "adapter_model.safetensors"))],
                      commit_message="x")
    assert main(["compress", "me/badjson", "-o", str(tmp_path / "b.cpeft.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("compeft compress: INVALID_INPUT: hf://me/badjson@") and "adapter_config.json" in err
    assert "snapshots" not in err
    # only a pickled adapter_model.bin: refused, never unpickled
    api.create_repo("me/pickled")
    api.create_commit("me/pickled", [CommitOperationAdd("adapter_config.json", str(folder / "adapter_config.json")),
                                     CommitOperationAdd("adapter_model.bin", b"\x80\x04pickle")], commit_message="x")
    capsys.readouterr()
    assert main(["compress", "me/pickled", "-o", str(tmp_path / "p.cpeft.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "HUB_ENTRY_NOT_FOUND" in err and "pickle" in err
