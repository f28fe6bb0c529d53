"""The whole CPET pipeline on a 2-layer Llama built from a config: compress the base, train a LoRA
on the original, inherit it on the compressed base with recovery modules and distillation, export,
push and pull over loopback with the real huggingface_hub client, load the pulled artifacts into
the compressed base, and refuse any other base."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from safetensors.torch import load_file

import compeft_format as cf
from compeft_format.hub.server import make_server
from conftest import ROOT, save_tiny_causal_lm, write_task
from cpet_adapters.base import compress_base
from cpet_adapters.export import RECOVERY_FILE, TASK_FILE, export, load_into
from cpet_adapters.train import ADAPTER_DIR, FINAL, RECOVERY_WEIGHTS, TrainConfig, load_causal_lm, train

TOKEN = "cpet-token"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    original = save_tiny_causal_lm(root / "original")
    data, held_out = write_task(root / "train.jsonl", 48), write_task(root / "eval.jsonl", 16, seed=1)
    common = {"data": str(data), "eval": str(held_out), "max_len": 32, "batch_size": 4, "save_every": 0}
    train(TrainConfig(base=str(original), output=str(root / "orig-run"), max_steps=15, lr=2e-2, lora_r=4,
                      lora_alpha=8, target_modules=("q_proj", "v_proj"), **common))
    inherited = root / "orig-run" / FINAL / ADAPTER_DIR
    compressed = compress_base(original, root / "int3", "int3:g32", source_id="org/tiny-llama").path
    cfg = TrainConfig(base=str(compressed), output=str(root / "run"), teacher=str(original), inherit=str(inherited),
                      recovery=True, recovery_r=4, distill=1.0, max_steps=10, lr=1e-2, **common)
    result = train(cfg)
    arts = export(root / "run", root / "out", density=0.5)
    return {"root": root, "original": original, "compressed": compressed, "inherited": inherited, "cfg": cfg,
            "result": result, "arts": arts}


def probe() -> torch.Tensor:
    return torch.tensor([[5, 17, 99, 3, 200, 41, 7, 8]])


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe()).logits


def trained_model(p):
    """The run's student as training left it: compressed base, LoRA folder, recovery weights."""
    from peft import PeftModel

    from compeft_format.recovery import RecoveryConfig, add_recovery

    model = PeftModel.from_pretrained(load_causal_lm(p["compressed"]), str(p["root"] / "run" / FINAL / ADAPTER_DIR))
    rc = json.loads((p["root"] / "run" / FINAL / "recovery.json").read_text())
    handle = add_recovery(model, RecoveryConfig(r=rc["r"], alpha=rc["alpha"], target_modules=tuple(rc["target_modules"])),
                          init=False)
    handle.load_state_dict(load_file(str(p["root"] / "run" / FINAL / RECOVERY_WEIGHTS)))
    return model


def test_export_binds_both_artifacts_to_the_compressed_base(pipeline):
    rec, task = pipeline["arts"]
    assert rec.path.name == RECOVERY_FILE and rec.kind == "recovery"
    assert task.path.name == TASK_FILE and task.kind == "lora"
    base_fp = cf.fingerprint(pipeline["compressed"], cf.binding.FLOAT32).value
    assert rec.base_fingerprint == task.base_fingerprint == base_fp
    orig_fp = cf.fingerprint(pipeline["original"], cf.binding.FLOAT32).value
    with cf.open_file(task.path) as f:
        m = f.manifest
        assert m.base_model.fingerprint.value == base_fp
        assert m.base_model.derived_from.fingerprint.value == orig_fp
        assert m.base_model.derived_from.id == "org/tiny-llama" and m.base_model.recipe["name"] == "int3:g32"
        assert [r.manifest_sha256 for r in m.requires] == [rec.manifest_sha256]
        training = m.provenance.training
        assert training["inheritance"]["source"] == str(pipeline["inherited"])
        assert training["settings"]["distill"] == 1.0 and training["steps"] == 10
    with cf.open_file(rec.path) as f:
        assert f.manifest.adapter.kind == "recovery" and f.manifest.adapter.recovery.r == 4
        assert f.manifest.base_model.fingerprint.value == base_fp


def test_the_recovery_artifact_stored_dense_reproduces_the_trained_modules(pipeline):
    rec = pipeline["arts"][0]
    stored = load_file(str(pipeline["root"] / "run" / FINAL / RECOVERY_WEIGHTS))
    decoded = cf.load(rec.path, dtype="float32")
    assert decoded.keys() == stored.keys() and all(torch.equal(decoded[k], stored[k]) for k in stored)
    assert any(float(v.abs().sum()) > 0 for k, v in stored.items() if k.endswith("recovery_A2.weight"))


def test_pulled_artifacts_reproduce_the_trained_model_up_to_compression(pipeline, tmp_path):
    server = make_server(tmp_path / "hub", token=TOKEN)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        cf.push([a.path for a in pipeline["arts"]], "me/tiny-int3-task", endpoint=endpoint, token=TOKEN)
        pulled = cf.pull("me/tiny-int3-task", local_dir=tmp_path / "pulled", endpoint=endpoint, token=TOKEN,
                         cache_dir=tmp_path / "cache")
        kinds = {e.path: (e.kind, e.requires) for e in pulled.index.artifacts}
        assert kinds[RECOVERY_FILE][0] == "recovery" and kinds[TASK_FILE][1] == (RECOVERY_FILE,)
        # refused for any other base: the original weights are not the compressed base
        with pytest.raises(cf.BaseMismatch):
            cf.pull("me/tiny-int3-task", local_dir=tmp_path / "other", endpoint=endpoint, token=TOKEN,
                    cache_dir=tmp_path / "cache", base=str(pipeline["original"]))
        assert not (tmp_path / "other").exists()
    finally:
        server.shutdown()
        server.server_close()

    loaded = load_into(pipeline["compressed"], tmp_path / "pulled" / TASK_FILE)
    got = logits(loaded)

    # exactly the trained model with the LoRA's tensors as the file decodes them
    from peft import set_peft_model_state_dict

    reference = trained_model(pipeline)
    want_uncompressed = logits(reference)
    set_peft_model_state_dict(reference, cf.load(tmp_path / "pulled" / TASK_FILE, dtype="float32"))
    torch.testing.assert_close(got, logits(reference), rtol=1e-5, atol=1e-5)
    # and close to the trained model: ComPEFT at density 0.5 moves the outputs far less than the
    # task LoRA itself does
    with reference.disable_adapter():
        without_lora = logits(reference)
    moved = float((got - want_uncompressed).norm())
    assert 0 < moved < 0.5 * float((without_lora - want_uncompressed).norm()), (
        moved, float((without_lora - want_uncompressed).norm()))
    # without the recovery modules the outputs differ: the task artifact brought them
    from compeft_format.recovery import get_recovery

    handle = get_recovery(loaded)
    assert handle is not None and len(handle.config.target_modules) == len(pipeline["cfg"].recovery_targets or
                                                                          handle.config.target_modules)
    handle.remove()
    assert not torch.allclose(logits(loaded), got)


def test_another_base_is_refused_naming_both_fingerprints_and_the_override_warns(pipeline):
    task = pipeline["arts"][1].path
    with pytest.raises(cf.BaseMismatch) as e:
        load_into(pipeline["original"], task)
    message = str(e.value)
    base_fp = pipeline["arts"][1].base_fingerprint
    orig_fp = cf.fingerprint(pipeline["original"], cf.binding.FLOAT32).value
    assert base_fp[:12] in message and orig_fp[:12] in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_into(pipeline["original"], task, check_base=False)
    assert any("base" in str(w.message).lower() for w in caught)


def test_the_cli_runs_the_pipeline(pipeline, tmp_path):
    root = pipeline["root"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "compeft_format.cli", "cpet", *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=300)

    p = cli("compress-base", str(pipeline["original"]), "-o", str(tmp_path / "nf4"), "--recipe", "2:4+int8")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "nf4" / "compressed_base.json").is_file() and "fingerprint" in p.stdout
    p = cli("train", str(tmp_path / "nf4"), "--data", str(root / "train.jsonl"), "-o", str(tmp_path / "run"),
            "--teacher", str(pipeline["original"]), "--inherit", str(pipeline["inherited"]), "--recovery",
            "--recovery-r", "2", "--distill", "0.5", "--max-steps", "2", "--max-len", "32", "--save-every", "1")
    assert p.returncode == 0, p.stderr
    assert "2 steps, done" in p.stdout
    p = cli("export", str(tmp_path / "run"), "-o", str(tmp_path / "out"), "--density", "0.2")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(str(tmp_path / "out")) == 2 and "recovery" in p.stdout
    p = cli("export", str(tmp_path / "missing"), "-o", str(tmp_path / "out2"))
    assert p.returncode == 1 and p.stderr.startswith("compeft cpet: FILE_NOT_FOUND:") and "Traceback" not in p.stderr
    p = cli("compress-base", str(pipeline["original"]), "-o", str(tmp_path / "x"), "--recipe", "int9")
    assert p.returncode == 1 and "INVALID_ARGUMENT" in p.stderr and len(p.stderr.strip().splitlines()) == 1
