"""Detached Ed25519 signatures: keys, signing, verification, hostile signature files, the CLI, and
push / pull --require-signature with the real huggingface_hub client against ``compeft hub serve``."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from huggingface_hub import CommitOperationAdd, HfApi

import compeft_format as cf
from compeft_format import constants as C
from compeft_format import signing
from compeft_format.cli import main
from compeft_format.fileio import file_sha256
from compeft_format.hub.index import Index, IndexEntry
from compeft_format.hub.server import make_server
from conftest import ROOT

TOKEN = "s3cret"


def adapter_file(folder: Path, seed: int = 0, name: str = "adapter.cpeft.safetensors") -> Path:
    g = torch.Generator().manual_seed(seed)
    sd = {f"base_model.model.layers.{i}.q_proj.lora_{ab}.weight":
          torch.randn((4, 64) if ab == "A" else (64, 4), generator=g).half() for i in range(2) for ab in "AB"}
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
           "base_model_name_or_path": "org/tiny"}
    path = folder / name
    cf.save(cf.compress(sd, density=0.2, adapter_kind="lora", peft_config=cfg), path)
    return path


@pytest.fixture
def keys(tmp_path):
    """A key pair made by ``generate_keys``: (private key path, public key path)."""
    return signing.generate_keys(tmp_path / "publisher.key")


@pytest.fixture
def other_keys(tmp_path):
    return signing.generate_keys(tmp_path / "other.key")


@pytest.fixture
def signed(tmp_path, keys):
    f = adapter_file(tmp_path)
    signing.sign(f, keys[0])
    return f


def sig_json(f: Path) -> dict:
    return json.loads(signing.signature_path(f).read_text())


def write_sig(f: Path, obj: object) -> None:
    signing.signature_path(f).write_text(obj if isinstance(obj, str) else json.dumps(obj))


# --- keys, signing, verifying ---------------------------------------------------------------------
def test_keygen_sign_verify_round_trip(tmp_path, keys, signed):
    private, public = keys
    assert public == tmp_path / "publisher.key.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----\n")
    pub = signing.load_public_key(public)
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    fingerprint = hashlib.sha256(raw).hexdigest()
    assert signing.key_fingerprint(signing.load_private_key(private)) == fingerprint

    sig_file = tmp_path / "adapter.cpeft.safetensors.sig"
    obj = json.loads(sig_file.read_text())
    with cf.open_file(signed) as f:
        manifest_sha256 = f.metadata[C.META_MANIFEST_SHA256]
    assert obj == {"format": "compeft-signature", "version": 1, "algorithm": "ed25519",
                   "key_fingerprint": fingerprint, "artifact_sha256": file_sha256(signed),
                   "artifact_size": signed.stat().st_size, "manifest_sha256": manifest_sha256,
                   "signature": obj["signature"]}
    assert len(sig_file.read_bytes()) <= C.MAX_SIGNATURE_BYTES
    # the signed message is every other member as JSON with sorted keys and no whitespace
    statement = json.dumps({k: v for k, v in obj.items() if k != "signature"}, sort_keys=True,
                           separators=(",", ":")).encode()
    pub.verify(base64.b64decode(obj["signature"]), statement)  # raises when it does not verify

    got = signing.verify_signed(signed, public)
    assert got.key_fingerprint == fingerprint and got.artifact_sha256 == file_sha256(signed)
    # the name is not signed: a renamed file and its renamed signature still verify
    moved = tmp_path / "renamed.bin"
    signed.rename(moved)
    sig_file.rename(tmp_path / "renamed.bin.sig")
    assert signing.verify_signed(moved, public).key_fingerprint == fingerprint


def test_keygen_never_overwrites(tmp_path, keys):
    private, public = keys
    before = private.read_bytes(), public.read_bytes()
    with pytest.raises(cf.InvalidArgument, match="exists"):
        signing.generate_keys(private)
    public.unlink()
    with pytest.raises(cf.InvalidArgument, match="exists"):  # the private key alone blocks it too
        signing.generate_keys(private)
    assert private.read_bytes() == before[0] and not public.exists()
    (tmp_path / "lonely.key.pub").write_text("mine")
    with pytest.raises(cf.InvalidArgument):
        signing.generate_keys(tmp_path / "lonely.key")
    assert not (tmp_path / "lonely.key").exists() and (tmp_path / "lonely.key.pub").read_text() == "mine"
    with pytest.raises(cf.FileNotFound):
        signing.generate_keys(tmp_path / "no" / "such" / "key")


def test_tampered_file_is_invalid(keys, signed):
    expected = file_sha256(signed)
    data = bytearray(signed.read_bytes())
    data[-3] ^= 0x01  # a stream byte: the file's own digests would catch it too, but later
    signed.write_bytes(bytes(data))
    with pytest.raises(cf.SignatureInvalid, match="the signature is for other bytes") as e:
        signing.verify_signed(signed, keys[1])
    assert e.value.code == C.E_SIGNATURE_INVALID
    assert e.value.expected == expected and e.value.actual == file_sha256(signed) != expected


def test_signature_by_another_key_is_invalid(tmp_path, keys, other_keys):
    f = adapter_file(tmp_path)
    signing.sign(f, other_keys[0])
    theirs = signing.key_fingerprint(signing.load_public_key(other_keys[1]))
    with pytest.raises(cf.SignatureInvalid, match="not a trusted key") as e:
        signing.verify_signed(f, keys[1])
    assert e.value.key_fingerprint == theirs
    # trusting either key accepts it
    assert signing.verify_signed(f, [keys[1], other_keys[1]]).key_fingerprint == theirs


def test_signature_naming_a_trusted_key_but_made_by_another_does_not_verify(tmp_path, keys, other_keys):
    f = adapter_file(tmp_path)
    signing.sign(f, other_keys[0])
    obj = sig_json(f)
    obj["key_fingerprint"] = signing.key_fingerprint(signing.load_public_key(keys[1]))
    write_sig(f, obj)
    with pytest.raises(cf.SignatureInvalid, match="does not verify"):
        signing.verify_signed(f, keys[1])


def test_changed_signed_members_do_not_verify(keys, signed):
    obj = sig_json(signed)
    sig = bytearray(base64.b64decode(obj["signature"]))
    sig[0] ^= 0x01
    obj["signature"] = base64.b64encode(bytes(sig)).decode()
    write_sig(signed, obj)
    with pytest.raises(cf.SignatureInvalid, match="does not verify"):
        signing.verify_signed(signed, keys[1])
    signing.sign(signed, keys[0])
    obj = sig_json(signed)
    obj["manifest_sha256"] = "0" * 64
    write_sig(signed, obj)
    with pytest.raises(cf.SignatureInvalid, match="manifest") as e:
        signing.verify_signed(signed, keys[1])
    assert e.value.expected == "0" * 64 and e.value.actual != e.value.expected


def test_missing_signature(tmp_path, keys):
    f = adapter_file(tmp_path)
    with pytest.raises(cf.SignatureMissing) as e:
        signing.verify_signed(f, keys[1])
    assert e.value.code == C.E_SIGNATURE_MISSING and e.value.path == str(signing.signature_path(f))


def _valid() -> dict:
    return {"format": "compeft-signature", "version": 1, "algorithm": "ed25519", "key_fingerprint": "a" * 64,
            "artifact_sha256": "b" * 64, "artifact_size": 10, "manifest_sha256": "c" * 64,
            "signature": base64.b64encode(bytes(64)).decode()}


def _with(**changes):
    obj = _valid()
    for k, v in changes.items():
        if v is _DROP:
            del obj[k]
        else:
            obj[k] = v
    return json.dumps(obj).encode()


_DROP = object()


@pytest.mark.parametrize("data, reason", [
    (b" " * (C.MAX_SIGNATURE_BYTES + 1), "over 4,096 bytes"),
    (json.dumps(_valid()).encode() + b" " * C.MAX_SIGNATURE_BYTES, "over 4,096 bytes"),
    (b"{not json", "not UTF-8 JSON"),
    (b"\xff\xfe{}", "not UTF-8 JSON"),
    (b"[" * 3000 + b"]" * 3000, "over 4,096 bytes"),
    (b"[" * 2000 + b"]" * 2000, "not UTF-8 JSON"),
    (b"[1, 2]", "not a JSON object"),
    (_with(signature=_DROP), "missing signature"),
    (_with(extra="x"), "unknown member"),
    (b'{"format": "compeft-signature", "format": "compeft-signature"}', "appears twice"),
    (_with(format="other"), "format must be"),
    (_with(version="1"), "version must be an integer"),
    (_with(version=True), "version must be an integer"),
    (_with(version=2), "version 2 is not supported"),
    (_with(algorithm="rsa"), "algorithm must be"),
    (_with(key_fingerprint="A" * 64), "key_fingerprint must be 64 lowercase hex"),
    (_with(artifact_sha256=None), "artifact_sha256 must be"),
    (_with(manifest_sha256=["c" * 64]), "manifest_sha256 must be"),
    (_with(artifact_size="10"), "artifact_size must be an integer"),
    (_with(artifact_size=10.0), "artifact_size must be an integer"),
    (_with(artifact_size=-1), "artifact_size must be an integer"),
    (_with(artifact_size=1 << 63), "artifact_size must be an integer"),
    (_with(signature=123), "standard base64"),
    (_with(signature="!" * 88), "standard base64"),
    (_with(signature=base64.urlsafe_b64encode(b"\xfb" * 64).decode()), "standard base64"),
    (_with(signature=base64.b64encode(bytes(63)).decode()), "base64 of 64 bytes"),
    (_with(signature=base64.b64encode(bytes(64)).decode()[:-3] + "B=="), "base64 of 64 bytes"),
])
def test_malformed_signature_files_are_typed_errors(tmp_path, keys, data, reason):
    assert signing.Signature.parse(_with(), "x") == signing.Signature("a" * 64, "b" * 64, 10, "c" * 64, bytes(64))
    with pytest.raises(cf.SignatureMalformed) as e:
        signing.Signature.parse(data, "the.sig")
    assert e.value.code == C.E_SIGNATURE_MALFORMED and reason in str(e.value) and str(e.value).startswith("the.sig: ")
    f = adapter_file(tmp_path)
    signing.signature_path(f).write_bytes(data)
    with pytest.raises(cf.SignatureMalformed):
        signing.verify_signed(f, keys[1])


def test_key_files_of_the_wrong_kind_are_refused(tmp_path, keys, signed):
    private, public = keys
    with pytest.raises(cf.KeyInvalid, match="is a public key"):
        signing.sign(signed, public)
    with pytest.raises(cf.KeyInvalid, match="is a private key"):
        signing.verify_signed(signed, private)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    ec_pub = tmp_path / "ec.pub"
    ec_pub.write_bytes(ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(cf.KeyInvalid, match="not an Ed25519 key"):
        signing.load_private_key(ec_pem)
    with pytest.raises(cf.KeyInvalid, match="not an Ed25519 key"):
        signing.load_public_key(ec_pub)
    locked = tmp_path / "locked.pem"
    locked.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(cf.KeyInvalid, match="encrypted"):
        signing.load_private_key(locked)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a key")
    with pytest.raises(cf.KeyInvalid) as e:
        signing.load_public_key(junk)
    assert e.value.code == C.E_KEY_INVALID and isinstance(e.value, ValueError)
    junk.write_bytes(b"-" * (signing.MAX_KEY_BYTES + 1))
    with pytest.raises(cf.KeyInvalid, match="over"):
        signing.load_public_key(junk)
    with pytest.raises(cf.FileNotFound):
        signing.load_public_key(tmp_path / "absent.pub")
    with pytest.raises(cf.InvalidArgument):
        signing.trusted_keys([])
    assert isinstance(signing.load_public_key(public), Ed25519PublicKey)


def test_an_invalid_file_is_not_signed(tmp_path, keys):
    f = adapter_file(tmp_path)
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(cf.StreamDigestMismatch):
        signing.sign(f, keys[0])
    assert not signing.signature_path(f).exists()


def test_signing_again_replaces_the_signature(tmp_path, keys, other_keys, signed):
    """The same key's signature is written again; another key's replaces it
    only when told (overwrite, --force)."""
    before = signing.signature_path(signed).read_bytes()
    signing.sign(signed, keys[0])
    assert signing.signature_path(signed).read_bytes() == before
    with pytest.raises(cf.InvalidArgument, match="--force"):
        signing.sign(signed, other_keys[0])
    assert signing.signature_path(signed).read_bytes() == before
    signing.sign(signed, other_keys[0], overwrite=True)
    assert sig_json(signed)["key_fingerprint"] == signing.key_fingerprint(signing.load_public_key(other_keys[1]))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# --- the command line -----------------------------------------------------------------------------
def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compeft_format.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}, cwd=ROOT, timeout=120)


def test_cli_keygen_sign_verify(tmp_path, other_keys, capsys):
    key = tmp_path / "me.key"
    assert main(["keygen", "-o", str(key)]) == 0
    out = capsys.readouterr().out.splitlines()
    fp = signing.key_fingerprint(signing.load_public_key(f"{key}.pub"))
    assert out == [f"{key}: private key (keep it secret)", f"{key}.pub: public key {fp}"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    a, b = adapter_file(tmp_path, 0, "a.cpeft.safetensors"), adapter_file(tmp_path, 1, "b.cpeft.safetensors")
    assert main(["sign", str(a), str(b), "--key", str(key)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{a}.sig: {a} signed by key {fp}", f"{b}.sig: {b} signed by key {fp}"]

    assert main(["verify", str(a), str(b), "--key", f"{key}.pub"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{a}: OK, signed by key {fp}", f"{b}: OK, signed by key {fp}"]
    assert main(["validate", str(a), "--key", f"{key}.pub", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(a), "valid": True, "signed_by": fp}
    assert main(["validate", str(a)]) == 0  # without --key: integrity only, as before
    assert capsys.readouterr().out.strip() == f"{a}: OK"

    # refusals: one line per file, the code, exit 1
    signing.signature_path(b).unlink()
    assert main(["verify", str(a), str(b), "--key", str(other_keys[1])]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{a}: INVALID SIGNATURE_INVALID: {a}: signed by key {fp}, which is not a trusted key")
    assert lines[1] == f"{b}: INVALID SIGNATURE_MISSING: {b}.sig: no signature (the file is not signed)"
    assert main(["verify", str(a), "--key", str(other_keys[1]), "--key", f"{key}.pub"]) == 0
    capsys.readouterr()

    assert main(["keygen", "-o", str(key)]) == 1
    assert capsys.readouterr().err.strip() == f"compeft keygen: INVALID_ARGUMENT: {key} exists; keys are never overwritten"
    assert main(["sign", str(a), "--key", f"{key}.pub"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("compeft sign: KEY_INVALID: ") and len(err.strip().splitlines()) == 1
    assert main(["verify", str(a), "--key", str(key)]) == 1
    assert capsys.readouterr().err.startswith("compeft verify: KEY_INVALID: ")


def test_cli_errors_are_one_line_without_traceback(tmp_path, keys):
    f = adapter_file(tmp_path)
    signing.signature_path(f).write_text('{"format": "compeft-signature"')
    p = cli("verify", str(f), "--key", str(keys[1]))
    assert p.returncode == 1 and p.stderr == ""
    assert p.stdout.splitlines() == [f"{f}: INVALID SIGNATURE_MALFORMED: {f}.sig: not UTF-8 JSON"]
    p = cli("sign", str(f), "--key", str(tmp_path / "absent.key"))
    assert p.returncode == 1 and p.stderr.strip().startswith("compeft sign: FILE_NOT_FOUND: ")
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


# --- the index ------------------------------------------------------------------------------------
def test_index_names_signatures_beside_their_artifacts(signed):
    with cf.open_file(signed) as f:
        entry = IndexEntry.of(f, "a.safetensors", sha256=file_sha256(signed), signature="a.safetensors.sig")
    text = Index([entry]).to_json()
    assert json.loads(text)["artifacts"][0]["signature"] == "a.safetensors.sig"
    assert Index.parse(text, "x").artifacts[0].signature == "a.safetensors.sig"
    plain = json.loads(text)
    del plain["artifacts"][0]["signature"]  # an index of before signatures
    assert Index.parse(json.dumps(plain), "x").artifacts[0].signature is None
    for bad in ("other.sig", "a.safetensors", "../a.safetensors.sig", 5):
        obj = json.loads(text)
        obj["artifacts"][0]["signature"] = bad
        with pytest.raises(cf.HubNoIndex):
            Index.parse(json.dumps(obj), "x")
    obj = json.loads(text)
    obj["artifacts"].append({**obj["artifacts"][0], "path": "a.safetensors.sig", "signature": None})
    with pytest.raises(cf.HubNoIndex, match="signature as an artifact"):
        Index.parse(json.dumps(obj), "x")


# --- push and pull --------------------------------------------------------------------------------
@pytest.fixture
def hub(tmp_path):
    """An in-process ``compeft hub serve`` on 127.0.0.1 with a write token: (endpoint, root)."""
    root = tmp_path / "hub"
    server = make_server(root, token=TOKEN)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_push_signed_then_pull_requiring_the_signature(hub, tmp_path, keys, signed, capsys):
    endpoint, _ = hub
    r = cf.push(signed, "me/signed", endpoint=endpoint, token=TOKEN)
    api = HfApi(endpoint=endpoint, token=TOKEN)
    sig_name = signed.name + ".sig"
    assert sig_name in api.list_repo_files("me/signed")
    assert Path(api.hf_hub_download("me/signed", sig_name, cache_dir=tmp_path / "c")).read_bytes() == \
        signing.signature_path(signed).read_bytes()

    out = tmp_path / "pulled"
    res = cf.pull("me/signed", local_dir=out, require_signature=keys[1], endpoint=endpoint, token=TOKEN,
                  cache_dir=tmp_path / "cache")
    fp = signing.key_fingerprint(signing.load_public_key(keys[1]))
    assert res.commit == r.commit and res.signers == {signed.name: fp}
    assert res.index.artifacts[0].signature == sig_name
    assert (out / signed.name).read_bytes() == signed.read_bytes()
    assert (out / sig_name).read_bytes() == signing.signature_path(signed).read_bytes()
    assert signing.verify_signed(out / signed.name, keys[1]).key_fingerprint == fp  # checkable again later

    assert main(["pull", "me/signed", "-o", str(tmp_path / "cli"), "--require-signature", str(keys[1]),
                 "--endpoint", endpoint, "--token", TOKEN, "--cache-dir", str(tmp_path / "cache2")]) == 0
    assert capsys.readouterr().out.strip() == (f"{tmp_path / 'cli' / signed.name}: verified "
                                               f"(me/signed@{r.commit[:12]}), signed by key {fp}")
    # offline, the signature comes from the verified cache
    p = cli("pull", "me/signed", "-o", str(tmp_path / "off"), "--require-signature", str(keys[1]),
            "--endpoint", endpoint, "--cache-dir", str(tmp_path / "cache"), env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "off" / sig_name).read_bytes() == signing.signature_path(signed).read_bytes()


def test_pull_refuses_an_unsigned_artifact_and_writes_nothing(hub, tmp_path, keys, capsys):
    endpoint, _ = hub
    f = adapter_file(tmp_path)
    cf.push(f, "me/plain", endpoint=endpoint, token=TOKEN)
    out = tmp_path / "out"
    with pytest.raises(cf.SignatureMissing, match="not signed"):
        cf.pull("me/plain", local_dir=out, require_signature=keys[1], endpoint=endpoint, token=TOKEN,
                cache_dir=tmp_path / "cache")
    assert not out.exists()
    assert main(["pull", "me/plain", "-o", str(out), "--require-signature", str(keys[1]), "--endpoint", endpoint,
                 "--token", TOKEN, "--cache-dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert err == (f"compeft pull: SIGNATURE_MISSING: me/plain@main: {f.name}: not signed (the index names no "
                   "signature)\n")
    assert not out.exists()
    # without --require-signature the same pull succeeds
    assert cf.pull("me/plain", local_dir=out, endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache").signers == {}


def test_pull_refuses_a_signature_by_another_key(hub, tmp_path, keys, other_keys, signed):
    endpoint, _ = hub
    cf.push(signed, "me/signed", endpoint=endpoint, token=TOKEN)
    out = tmp_path / "out"
    with pytest.raises(cf.SignatureInvalid, match="not a trusted key"):
        cf.pull("me/signed", local_dir=out, require_signature=other_keys[1], endpoint=endpoint, token=TOKEN,
                cache_dir=tmp_path / "cache")
    assert not out.exists()
    commit = cf.pull("me/signed", endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache").commit
    snapshot = next((tmp_path / "cache").glob(f"*/me--signed/snapshots/{commit}"))
    assert sorted(p.name for p in snapshot.iterdir()) == sorted([C.HUB_INDEX_FILE, signed.name])  # not cached


@pytest.mark.parametrize("replacement, error", [
    (b"{}", cf.SignatureMalformed),
    (b"x" * (C.MAX_SIGNATURE_BYTES + 1), cf.SignatureMalformed),
    (None, cf.SignatureInvalid),  # a valid signature of another file by the trusted key
])
def test_pull_refuses_a_replaced_signature(hub, tmp_path, keys, signed, replacement, error):
    endpoint, _ = hub
    cf.push(signed, "me/signed", endpoint=endpoint, token=TOKEN)
    if replacement is None:
        (tmp_path / "other").mkdir()
        replacement = signing.sign(adapter_file(tmp_path / "other", seed=5), keys[0]).read_bytes()
    api = HfApi(endpoint=endpoint, token=TOKEN)
    api.create_commit("me/signed", operations=[CommitOperationAdd(signed.name + ".sig", replacement)],
                      commit_message="replace the signature")
    out = tmp_path / "out"
    with pytest.raises(error):
        cf.pull("me/signed", local_dir=out, require_signature=keys[1], endpoint=endpoint, token=TOKEN,
                cache_dir=tmp_path / "cache")
    assert not out.exists()


def test_pull_refuses_a_signature_the_repository_lacks(hub, tmp_path, keys, signed):
    endpoint, _ = hub
    cf.push(signed, "me/signed", endpoint=endpoint, token=TOKEN)
    api = HfApi(endpoint=endpoint, token=TOKEN)
    from huggingface_hub import CommitOperationDelete

    api.create_commit("me/signed", operations=[CommitOperationDelete(signed.name + ".sig")], commit_message="rm")
    with pytest.raises(cf.SignatureMissing, match="which the repository does not hold"):
        cf.pull("me/signed", local_dir=tmp_path / "out", require_signature=keys[1], endpoint=endpoint, token=TOKEN,
                cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_push_refuses_a_stale_signature(hub, tmp_path, keys, signed):
    endpoint, _ = hub
    stale = signing.signature_path(signed).read_bytes()
    adapter_file(tmp_path, seed=7)  # the file is made again; its old signature is left beside it
    signing.signature_path(signed).write_bytes(stale)
    with pytest.raises(cf.SignatureInvalid, match="for other bytes"):
        cf.push(signed, "me/stale", endpoint=endpoint, token=TOKEN)
    assert not HfApi(endpoint=endpoint, token=TOKEN).repo_exists("me/stale")
    signing.signature_path(signed).write_text("junk")
    with pytest.raises(cf.SignatureMalformed):
        cf.push(signed, "me/stale", endpoint=endpoint, token=TOKEN)
