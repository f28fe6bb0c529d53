"""Push and pull with the real huggingface_hub client against ``compeft hub serve`` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub import errors as hfe

import compeft_format as cf
from compeft_format import constants as C
from compeft_format.hub.server import make_server
from conftest import ROOT, bits_equal, run_in_threads

TOKEN = "s3cret"


def adapter_file(tmp_path: Path, seed: int = 0, name: str = "adapter.cpeft.safetensors") -> Path:
    g = torch.Generator().manual_seed(seed)
    sd = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight":
          torch.randn((8, 256) if ab == "A" else (256, 8), generator=g).half() for i in range(3) for ab in "AB"}
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
           "base_model_name_or_path": "org/tiny-llama"}
    path = tmp_path / name
    cf.save(cf.compress(sd, density=0.1, adapter_kind="lora", peft_config=cfg,
                         base=cf.BaseBinding(id="org/tiny-llama")), path)
    return path


@contextlib.contextmanager
def serving(root: Path, **options):
    """An in-process server with a write token on 127.0.0.1: its endpoint URL and storage root."""
    server = make_server(root, token=TOKEN, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hub(tmp_path):
    with serving(tmp_path / "hub") as served:
        yield served


@pytest.fixture
def lfs_hub(tmp_path):
    """A server that asks for LFS uploads of binary files (``hub serve --lfs``)."""
    with serving(tmp_path / "hub", lfs=True) as served:
        yield served


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "compeft_format.cli", *args], capture_output=True, text=True,
                       env=full_env, cwd=ROOT, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


def test_push_pull_round_trip(hub, tmp_path):
    endpoint, _ = hub
    f = adapter_file(tmp_path)
    r = cf.push(f, "me/adapter", endpoint=endpoint, token=TOKEN)
    assert len(r.commit) == 40 and r.files == [f.name]
    api = HfApi(endpoint=endpoint, token=TOKEN)
    # no adapter_config.json: peft would take the repository for a PEFT adapter and find no weights
    assert sorted(api.list_repo_files("me/adapter")) == sorted([f.name, C.HUB_INDEX_FILE, "README.md"])

    out = tmp_path / "pulled"
    res = cf.pull("me/adapter", local_dir=out, endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    assert res.commit == r.commit and res.paths == [out / f.name]
    assert (out / f.name).read_bytes() == f.read_bytes()
    ours, theirs = cf.load(f), cf.load(out / f.name)
    assert all(bits_equal(ours[k], theirs[k]) for k in ours)
    index = json.loads((out / C.HUB_INDEX_FILE).read_text())
    art = index["artifacts"][0]
    assert art["sha256"] == cf.hub.file_sha256(f) and art["size"] == f.stat().st_size
    assert art["adapter_kind"] == "lora" and art["base_model"]["id"] == "org/tiny-llama"

    card = Path(api.hf_hub_download("me/adapter", "README.md", cache_dir=tmp_path / "c2")).read_text()
    front = card.split("---")[1]
    assert "library_name: compeft" in front and "base_model: org/tiny-llama" in front
    assert "- compeft" in front and "- lora" in front and "- ternary" in front
    assert "bits/param" in card


def test_pull_replaces_only_what_an_earlier_pull_wrote(hub, tmp_path):
    """A second pull into the same folder updates the files of the first; a file of the same name
    that no pull wrote (or a PEFT folder with files) is refused unless overwrite."""
    endpoint, _ = hub
    f = adapter_file(tmp_path, 0, "a.cpeft.safetensors")
    cf.push(f, "me/update", endpoint=endpoint, token=TOKEN)
    out = tmp_path / "pulled"
    kw = dict(endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    cf.pull("me/update", local_dir=out, **kw)
    (tmp_path / "v2").mkdir()
    newer = adapter_file(tmp_path / "v2", 1, "a.cpeft.safetensors")
    cf.push(newer, "me/update", endpoint=endpoint, token=TOKEN)
    cf.pull("me/update", local_dir=out, **kw)  # an update of the earlier pull
    assert (out / "a.cpeft.safetensors").read_bytes() == newer.read_bytes()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.cpeft.safetensors").write_bytes(b"my own file")
    with pytest.raises(cf.InvalidArgument, match="earlier pull"):
        cf.pull("me/update", local_dir=mine, **kw)
    assert (mine / "a.cpeft.safetensors").read_bytes() == b"my own file"
    assert sorted(p.name for p in mine.iterdir()) == ["a.cpeft.safetensors"]
    p = subprocess.run([sys.executable, "-m", "compeft_format.cli", "pull", "me/update", "-o", str(mine),
                        "--endpoint", endpoint, "--token", TOKEN, "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "--force" in p.stderr
    cf.pull("me/update", local_dir=mine, overwrite=True, **kw)
    assert (mine / "a.cpeft.safetensors").read_bytes() == newer.read_bytes()

    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(cf.InvalidArgument, match="earlier pull"):
        cf.pull("me/update", local_dir=folder, to_peft=True, **kw)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    notes = tmp_path / "notes"  # a file of the index's name that is no index
    notes.mkdir()
    (notes / C.HUB_INDEX_FILE).write_text("my notes")
    with pytest.raises(cf.InvalidArgument, match="earlier pull"):
        cf.pull("me/update", local_dir=notes, **kw)
    assert sorted(p.name for p in notes.iterdir()) == [C.HUB_INDEX_FILE]


def test_pull_never_writes_a_file_under_a_name_peft_loads(hub, tmp_path):
    """An index (not made by compeft push, which refuses such names) listing adapter_model.safetensors:
    pull does not write a compeft file under a name peft would load as the base model."""
    endpoint, _ = hub
    f = adapter_file(tmp_path)
    cf.push(f, "me/trap", endpoint=endpoint, token=TOKEN)
    api = HfApi(endpoint=endpoint, token=TOKEN)
    index = json.loads(Path(api.hf_hub_download("me/trap", C.HUB_INDEX_FILE, cache_dir=tmp_path / "c")).read_text())
    index["artifacts"][0]["path"] = "adapter_model.safetensors"
    api.create_commit("me/trap", [CommitOperationAdd("adapter_model.safetensors", str(f)),
                                  CommitOperationAdd(C.HUB_INDEX_FILE, json.dumps(index).encode())],
                      commit_message="renamed")
    out = tmp_path / "out"
    with pytest.raises(cf.HubNoIndex, match="loads by itself"):
        cf.pull("me/trap", local_dir=out, endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    assert not out.exists()


def test_pull_to_peft_and_base_binding(hub, tmp_path):
    endpoint, _ = hub
    f = adapter_file(tmp_path)
    cf.push(f, "me/adapter", endpoint=endpoint, token=TOKEN)
    out = tmp_path / "peft"
    cf.pull("me/adapter", local_dir=out, to_peft=True, base_model="org/tiny-llama", endpoint=endpoint, token=TOKEN,
            cache_dir=tmp_path / "cache")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (out / "adapter_model.safetensors").is_file()
    with pytest.raises(cf.BaseMismatch):
        cf.pull("me/adapter", local_dir=tmp_path / "other", base_model="org/another", endpoint=endpoint,
                token=TOKEN, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "other").exists()


def test_branches_tags_and_index_merging(hub, tmp_path):
    endpoint, _ = hub
    a, b = adapter_file(tmp_path, 0, "a.cpeft.safetensors"), adapter_file(tmp_path, 1, "b.cpeft.safetensors")
    first = cf.push(a, "me/multi", endpoint=endpoint, token=TOKEN)
    cf.push(b, "me/multi", revision="dev", endpoint=endpoint, token=TOKEN)
    api = HfApi(endpoint=endpoint, token=TOKEN)
    api.create_tag("me/multi", tag="v1", revision=first.commit)
    refs = api.list_repo_refs("me/multi")
    assert {x.name for x in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["v1"]

    dev = cf.pull("me/multi@dev", endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in dev.paths) == ["a.cpeft.safetensors", "b.cpeft.safetensors"]
    main = cf.pull("me/multi", endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    assert [p.name for p in main.paths] == ["a.cpeft.safetensors"]
    tagged = cf.pull("me/multi@v1", endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    assert tagged.commit == first.commit
    titles = [c.title for c in api.list_repo_commits("me/multi", revision="dev")]
    assert titles[0].startswith("Upload b.cpeft.safetensors") and titles[-1] == "initial commit"


def test_lfs_upload_path(lfs_hub, tmp_path):
    """Binary files go through the LFS batch API (upload, verify) when the server asks for LFS."""
    endpoint, root = lfs_hub
    f = adapter_file(tmp_path)
    p = cli("push", str(f), "me/lfs", "--endpoint", endpoint, "--token", TOKEN,
            env={"HF_HUB_DISABLE_XET": "1"}, check=True)
    commit = p.stdout.split()[-1]
    files = json.loads((root / "repos" / "models" / "me" / "lfs" / "commits" / f"{commit}.json").read_text())["files"]
    assert files[f.name]["lfs"] is True and files["README.md"]["lfs"] is False
    tree = {e.path: e for e in HfApi(endpoint=endpoint, token=TOKEN).list_repo_tree("me/lfs")}
    assert tree[f.name].lfs.sha256 == cf.hub.file_sha256(f)
    res = cf.pull("me/lfs", endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    assert res.paths[0].read_bytes() == f.read_bytes()


def test_altered_blob_is_caught(hub, tmp_path):
    endpoint, root = hub
    f = adapter_file(tmp_path)
    cf.push(f, "me/adapter", endpoint=endpoint, token=TOKEN)
    blob = root / "blobs" / cf.hub.file_sha256(f)
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(cf.ArtifactDigestMismatch,
                       match=rf"{f.name}: sha256 is [0-9a-f]{{64}}, the index declares [0-9a-f]{{64}} \(\d+ bytes, index \d+\)"):
        cf.pull("me/adapter", local_dir=out, endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    assert not out.exists() or list(out.iterdir()) == []
    p = cli("pull", "me/adapter", "-o", str(out), "--endpoint", endpoint, "--token", TOKEN,
            "--cache-dir", str(tmp_path / "cache2"))
    assert p.returncode == 1 and "ARTIFACT_DIGEST_MISMATCH" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_truncated_blob_is_caught(hub, tmp_path):
    endpoint, root = hub
    f = adapter_file(tmp_path)
    cf.push(f, "me/adapter", endpoint=endpoint, token=TOKEN)
    blob = root / "blobs" / cf.hub.file_sha256(f)
    blob.write_bytes(blob.read_bytes()[:-100])
    out = tmp_path / "out"
    with pytest.raises(cf.CompeftError) as e:
        cf.pull("me/adapter", local_dir=out, endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    assert e.value.code in (C.E_ARTIFACT_DIGEST_MISMATCH, C.E_HUB_ERROR)
    assert not out.exists() or list(out.iterdir()) == []


def test_writes_need_the_token(hub, tmp_path):
    endpoint, _ = hub
    f = adapter_file(tmp_path)
    with pytest.raises(cf.HubAuthError):
        cf.push(f, "me/adapter", endpoint=endpoint, token="wrong")
    p = cli("push", str(f), "me/adapter", "--endpoint", endpoint, env={"HF_TOKEN": ""})
    assert p.returncode == 1 and ": HUB_AUTH: " in p.stderr and "Traceback" not in p.stderr
    cf.push(f, "me/adapter", endpoint=endpoint, token=TOKEN)


def test_pushing_to_a_public_repository_without_its_token_is_an_auth_error(hub, tmp_path):
    # huggingface_hub answers a refused create_repo of an existing repository by building the
    # repository's URL, which it cannot do for an endpoint other than huggingface.co
    endpoint, root = hub
    f = adapter_file(tmp_path)
    cf.push(f, "me/public", endpoint=endpoint, token=TOKEN)
    before = sorted(p.name for p in (root / "blobs").iterdir())
    for token in ("wrong", None):
        with pytest.raises(cf.HubAuthError) as e:
            cf.push(adapter_file(tmp_path, 1, "b.cpeft.safetensors"), "me/public", endpoint=endpoint, token=token)
        assert e.value.status == 401
    p = cli("push", str(f), "me/public", "--endpoint", endpoint, env={"HF_TOKEN": ""})
    assert p.returncode == 1 and ": HUB_AUTH: " in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (root / "blobs").iterdir()) == before


@pytest.mark.parametrize("repo", ["adapter", "me/adapter@main", "a/b/c", "/x"])
def test_push_needs_a_namespace_and_a_name(hub, tmp_path, repo):
    endpoint, root = hub
    with pytest.raises(cf.InvalidArgument):
        cf.push(adapter_file(tmp_path), repo, endpoint=endpoint, token=TOKEN)
    assert not (root / "blobs").exists() or list((root / "blobs").iterdir()) == []


def test_stale_parent_commit_is_refused(hub, tmp_path):
    endpoint, _ = hub
    api = HfApi(endpoint=endpoint, token=TOKEN)
    api.create_repo("me/race")
    base = api.create_commit("me/race", operations=[CommitOperationAdd("a.txt", b"1")], commit_message="a")
    api.create_commit("me/race", operations=[CommitOperationAdd("b.txt", b"2")], commit_message="b",
                      parent_commit=base.oid)
    with pytest.raises(hfe.HfHubHTTPError) as e:
        api.create_commit("me/race", operations=[CommitOperationAdd("c.txt", b"3")], commit_message="c",
                          parent_commit=base.oid)
    assert e.value.response.status_code == 412
    assert sorted(api.list_repo_files("me/race")) == ["a.txt", "b.txt"]


def test_concurrent_commits_are_serialised(hub, tmp_path):
    endpoint, _ = hub
    api = HfApi(endpoint=endpoint, token=TOKEN)
    api.create_repo("me/many")

    def commit(i):
        HfApi(endpoint=endpoint, token=TOKEN).create_commit(
            "me/many", operations=[CommitOperationAdd(f"f{i}.txt", str(i).encode())], commit_message=f"c{i}")

    assert run_in_threads(commit) == []
    assert sorted(api.list_repo_files("me/many")) == sorted(f"f{i}.txt" for i in range(8))
    assert len(api.list_repo_commits("me/many")) == 9


def test_parallel_pulls_into_one_cache(hub, tmp_path):
    endpoint, _ = hub
    f = adapter_file(tmp_path)
    cf.push(f, "me/adapter", endpoint=endpoint, token=TOKEN)
    cache = tmp_path / "shared-cache"
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "compeft_format.cli", "pull", "me/adapter", "-o",
                               str(tmp_path / f"out{i}"), "--endpoint", endpoint, "--token", TOKEN,
                               "--cache-dir", str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT) for i in range(4)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), [e for _, e, _ in results]
    for i in range(4):
        assert (tmp_path / f"out{i}" / f.name).read_bytes() == f.read_bytes()


def test_server_restart_keeps_everything(tmp_path):
    root, port = tmp_path / "hub", free_port()
    endpoint = f"http://127.0.0.1:{port}"

    def start():
        proc = subprocess.Popen([sys.executable, "-m", "compeft_format.cli", "hub", "serve", "--root", str(root),
                                 "--port", str(port), "--token", TOKEN], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert "serving" in proc.stdout.readline()
        return proc

    server = start()
    try:
        f = adapter_file(tmp_path)
        pushed = cf.push(f, "me/adapter", endpoint=endpoint, token=TOKEN)
    finally:
        server.terminate()
        server.wait(timeout=30)
    p = cli("pull", "me/adapter", "--endpoint", endpoint, "--token", TOKEN, "--cache-dir", str(tmp_path / "c"))
    assert p.returncode == 1 and ": HUB_UNREACHABLE: " in p.stderr  # the server is down
    server = start()
    try:
        res = cf.pull("me/adapter", endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
        assert res.commit == pushed.commit and res.paths[0].read_bytes() == f.read_bytes()
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("target, code", [
    ("me/nothing", "HUB_REPO_NOT_FOUND"),
    ("me/adapter@nobranch", "HUB_REVISION_NOT_FOUND"),
    ("me/plain", "HUB_NO_INDEX"),
])
def test_pull_errors_are_typed_one_line(hub, tmp_path, target, code):
    endpoint, _ = hub
    cf.push(adapter_file(tmp_path), "me/adapter", endpoint=endpoint, token=TOKEN)
    api = HfApi(endpoint=endpoint, token=TOKEN)
    api.create_repo("me/plain")
    api.create_commit("me/plain", operations=[CommitOperationAdd("x.txt", b"x")], commit_message="x")
    out = tmp_path / "out"
    p = cli("pull", target, "-o", str(out), "--endpoint", endpoint, "--token", TOKEN,
            "--cache-dir", str(tmp_path / "cache"))
    assert p.returncode == 1 and f": {code}: " in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert not out.exists()


def test_offline_mode_uses_the_verified_cache(hub, tmp_path):
    endpoint, _ = hub
    f = adapter_file(tmp_path)
    cf.push(f, "me/adapter", endpoint=endpoint, token=TOKEN)
    cache = tmp_path / "cache"
    cf.pull("me/adapter", endpoint=endpoint, token=TOKEN, cache_dir=cache)
    p = cli("pull", "me/adapter", "-o", str(tmp_path / "off"), "--endpoint", endpoint, "--cache-dir", str(cache),
            env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "off" / f.name).read_bytes() == f.read_bytes()


def test_serve_listens_on_loopback_by_default():
    from compeft_format.cli import build_parser

    a = build_parser().parse_args(["hub", "serve"])
    assert a.host == "127.0.0.1"


def test_push_refuses_invalid_files(hub, tmp_path):
    endpoint, _ = hub
    bad = ROOT / "spec" / "vectors" / "bad_stream_digest.cpeft.safetensors"
    with pytest.raises(cf.StreamDigestMismatch):
        cf.push(bad, "me/bad", endpoint=endpoint, token=TOKEN)
    with pytest.raises(hfe.RepositoryNotFoundError):
        HfApi(endpoint=endpoint, token=TOKEN).model_info("me/bad")
    time.sleep(0)


def test_index_naming_a_missing_file(hub, tmp_path):
    endpoint, _ = hub
    f = adapter_file(tmp_path)
    cf.push(f, "me/adapter", endpoint=endpoint, token=TOKEN)
    api = HfApi(endpoint=endpoint, token=TOKEN)
    index = json.loads(Path(api.hf_hub_download("me/adapter", C.HUB_INDEX_FILE, cache_dir=tmp_path / "c")).read_text())
    index["artifacts"].append({**index["artifacts"][0], "path": "gone.cpeft.safetensors"})
    api.create_commit("me/adapter", operations=[CommitOperationAdd(C.HUB_INDEX_FILE, json.dumps(index).encode())],
                      commit_message="index names a file that is not there")
    out = tmp_path / "out"
    with pytest.raises(cf.HubEntryNotFound) as e:
        cf.pull("me/adapter", local_dir=out, endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    assert e.value.code == "HUB_ENTRY_NOT_FOUND" and not out.exists()


def test_repository_ids_cannot_leave_the_storage_root(hub, tmp_path):
    import urllib.error
    import urllib.request

    endpoint, root = hub
    HfApi(endpoint=endpoint, token=TOKEN).create_repo("me/real")  # so that repos/models/ exists
    outside = root / "repos" / "x"  # where "models/../x" would lead
    outside.mkdir(parents=True)
    (outside / "repo.json").write_text("{}")
    for path in ("/api/models/../x", "/api/models/%2E%2E/x/revision/main", "/%2E%2E/x/resolve/main/repo.json"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(endpoint + path)
        assert e.value.code == 404, path


def _raw_http(endpoint: str, payload: bytes) -> bytes:
    host, port = endpoint.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_refused_request_bodies_are_never_read_as_requests(hub):
    endpoint, _ = hub
    smuggled = b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
    first = (b"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: " + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled)
    reply = _raw_http(endpoint, first)
    assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(b"HTTP/1.1 401")


@pytest.mark.parametrize("path, body", [
    ("/api/repos/create", b"[]"),
    ("/api/models/me/typed/commit/main", b"[1]\n"),
    ("/api/models/me/typed/commit/main", b'{"key":"file","value":"x"}\n'),
    ("/api/models/me/typed/commit/main", b'{"key":"lfsFile","value":{"path":"a","oid":"' + b"0" * 64 + b'"}}\n'),
])
def test_malformed_bodies_get_400(hub, path, body):
    endpoint, _ = hub
    HfApi(endpoint=endpoint, token=TOKEN).create_repo("me/typed", exist_ok=True)
    req = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    assert _raw_http(endpoint, req).startswith(b"HTTP/1.1 400")


def test_concurrent_pushes_keep_every_artifact_in_the_index(hub, tmp_path):
    endpoint, _ = hub
    files = [adapter_file(tmp_path, i, f"a{i}.cpeft.safetensors") for i in range(4)]
    cf.push(files[0], "me/shared", endpoint=endpoint, token=TOKEN)
    threads = [threading.Thread(target=cf.push, args=(f, "me/shared"), kwargs={"endpoint": endpoint, "token": TOKEN})
               for f in files[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res = cf.pull("me/shared", endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in res.paths) == sorted(f.name for f in files)


def test_pull_to_peft_gives_each_artifact_its_own_folder(hub, tmp_path):
    endpoint, _ = hub
    a = adapter_file(tmp_path, 0, "math.v1.cpeft.safetensors")
    b = adapter_file(tmp_path, 1, "math.v2.cpeft.safetensors")
    cf.push([a, b], "me/versions", endpoint=endpoint, token=TOKEN)
    res = cf.pull("me/versions", local_dir=tmp_path / "out", to_peft=True, endpoint=endpoint, token=TOKEN,
                  cache_dir=tmp_path / "cache")
    assert [p.name for p in res.paths] == ["math.v1", "math.v2"]
    assert all((p / "adapter_model.safetensors").is_file() for p in res.paths)


@pytest.mark.parametrize("index", [b"[]", b'"x"', b'{"format": "compeft", "artifacts": [{"path": "", "sha256": "a", "size": 1}]}'])
def test_malformed_index_is_no_index(hub, tmp_path, index):
    endpoint, _ = hub
    api = HfApi(endpoint=endpoint, token=TOKEN)
    api.create_repo("me/badindex")
    api.create_commit("me/badindex", operations=[CommitOperationAdd(C.HUB_INDEX_FILE, index)], commit_message="x")
    with pytest.raises(cf.HubNoIndex):
        cf.pull("me/badindex", endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")


def test_push_opens_each_file_once_and_indexes_it_typed(hub, tmp_path, monkeypatch):
    from compeft_format import container

    endpoint, _ = hub
    files = [adapter_file(tmp_path, i, f"a{i}.cpeft.safetensors") for i in range(2)]
    opened = []
    real = container.open_regular
    monkeypatch.setattr(container, "open_regular", lambda path: opened.append(str(path)) or real(path))
    cf.push(files, "me/typed", endpoint=endpoint, token=TOKEN)
    assert sorted(opened) == sorted(str(f) for f in files)
    res = cf.pull("me/typed", endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    entry = res.index.artifacts[0]
    assert isinstance(entry, cf.IndexEntry) and entry.kind == "adapter" and entry.requires == ()
    assert entry.base_model == cf.BaseBinding(id="org/tiny-llama") and entry.peft_type == "LORA"
    assert entry.sha256 == cf.hub.file_sha256(files[0]) and entry.format_version == C.FORMAT_VERSION_WITHOUT_RECOVERY


@pytest.mark.parametrize("path", ["..\\x.safetensors", "C:x.safetensors", "\\\\host\\share", "a\x00b",
                                  "./compeft-index.json", "a//b", "a/../b", "/abs"])
def test_index_paths_that_could_leave_the_folder_are_refused(hub, tmp_path, path):
    endpoint, _ = hub
    api = HfApi(endpoint=endpoint, token=TOKEN)
    api.create_repo("me/paths", exist_ok=True)
    index = {"format": "compeft", "artifacts": [{"path": path, "sha256": "0" * 64, "size": 1}]}
    api.create_commit("me/paths", operations=[CommitOperationAdd(C.HUB_INDEX_FILE, json.dumps(index).encode())],
                      commit_message="x")
    with pytest.raises(cf.HubNoIndex, match="unsafe path"):
        cf.pull("me/paths", local_dir=tmp_path / "out", endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "c")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", [
    {"path": "a.cpeft.safetensors", "sha256": "A" * 64, "size": 1},
    {"path": "a.cpeft.safetensors", "sha256": "0" * 64, "size": True},
    {"path": "a.cpeft.safetensors", "sha256": "0" * 64, "size": -1},
    {"path": "a.cpeft.safetensors", "sha256": "0" * 64, "size": 1, "requires": ["../b"]},
    {"path": "a.cpeft.safetensors", "sha256": "0" * 64, "size": 1, "requires": ["b.cpeft.safetensors"]},
    {"path": "a.cpeft.safetensors", "sha256": "0" * 64, "size": 1, "base_model": {"fingerprint": "x"}},
])
def test_malformed_index_entries_are_no_index(entry):
    from compeft_format.hub.index import Index

    with pytest.raises(cf.HubNoIndex):
        Index.parse(json.dumps({"format": "compeft", "artifacts": [entry]}).encode(), "me/x")
    with pytest.raises(cf.HubNoIndex, match="twice"):
        ok = {"path": "a.cpeft.safetensors", "sha256": "0" * 64, "size": 1}
        Index.parse(json.dumps({"format": "compeft", "artifacts": [ok, ok]}), "me/x")
    with pytest.raises(cf.HubNoIndex):
        Index.parse(b"\xff\xfe not utf-8", "me/x")


def test_pull_checks_artifacts_against_base_weights(hub, tmp_path):
    """``pull --base PATH``: every artifact must record the fingerprint of those weights."""
    from safetensors.torch import save_file

    endpoint, _ = hub
    base = {"model.w": torch.randn(4, 4)}
    save_file(base, str(tmp_path / "base.safetensors"))
    sd = {f"base_model.model.l{i}.lora_{ab}.weight": torch.randn(8, 64) for i in range(2) for ab in "AB"}
    bound = tmp_path / "bound.cpeft.safetensors"
    cf.save(cf.compress(sd, density=0.2, base=cf.BaseBinding(fingerprint=cf.fingerprint(base))), bound)
    cf.push(bound, "me/bound", endpoint=endpoint, token=TOKEN)
    res = cf.pull("me/bound", base=tmp_path / "base.safetensors", endpoint=endpoint, token=TOKEN,
                  cache_dir=tmp_path / "c")
    assert [p.name for p in res.paths] == ["bound.cpeft.safetensors"]
    save_file({"model.w": torch.zeros(4, 4)}, str(tmp_path / "other.safetensors"))
    p = cli("pull", "me/bound", "--base", str(tmp_path / "other.safetensors"), "-o", str(tmp_path / "o"),
            "--cache-dir", str(tmp_path / "c"), env={"HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN})
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "BASE_MISMATCH" in p.stderr, p.stderr
    assert "fingerprint differs" in p.stderr and not (tmp_path / "o").exists()
    cf.push(adapter_file(tmp_path), "me/unbound", endpoint=endpoint, token=TOKEN)
    with pytest.raises(cf.BaseMismatch, match="records no fingerprint"):
        cf.pull("me/unbound", base=tmp_path / "base.safetensors", endpoint=endpoint, token=TOKEN,
                cache_dir=tmp_path / "c")


def test_the_server_stores_files_for_its_user_only(hub, tmp_path):
    import stat

    endpoint, root = hub
    cf.push(adapter_file(tmp_path), "me/adapter", endpoint=endpoint, token=TOKEN, private=True)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), [
        (str(p), oct(p.stat().st_mode)) for p in files]


def test_push_keeps_what_it_does_not_know_and_refuses_to_overwrite_a_broken_index(hub, tmp_path):
    endpoint, _ = hub
    api = HfApi(endpoint=endpoint, token=TOKEN)
    cf.push(adapter_file(tmp_path, 0, "a.cpeft.safetensors"), "me/keep", endpoint=endpoint, token=TOKEN)
    index = json.loads(Path(api.hf_hub_download("me/keep", C.HUB_INDEX_FILE, cache_dir=tmp_path / "c")).read_text())
    index["artifacts"][0]["signed_by"] = {"key": "k1"}  # a member a later version may write
    api.create_commit("me/keep", operations=[CommitOperationAdd(C.HUB_INDEX_FILE, json.dumps(index).encode())],
                      commit_message="a member this version does not know")
    cf.push(adapter_file(tmp_path, 1, "b.cpeft.safetensors"), "me/keep", endpoint=endpoint, token=TOKEN)
    after = json.loads(Path(api.hf_hub_download("me/keep", C.HUB_INDEX_FILE, cache_dir=tmp_path / "c2")).read_text())
    assert [a["path"] for a in after["artifacts"]] == ["a.cpeft.safetensors", "b.cpeft.safetensors"]
    assert after["artifacts"][0]["signed_by"] == {"key": "k1"} and "signed_by" not in after["artifacts"][1]

    index["artifacts"][0]["base_model"] = {"id": 123}
    api.create_commit("me/keep", operations=[CommitOperationAdd(C.HUB_INDEX_FILE, json.dumps(index).encode())],
                      commit_message="break the index")
    head = api.model_info("me/keep").sha
    with pytest.raises(cf.HubNoIndex, match="the repository's index"):
        cf.push(adapter_file(tmp_path, 2, "c.cpeft.safetensors"), "me/keep", endpoint=endpoint, token=TOKEN)
    assert api.model_info("me/keep").sha == head


def test_private_repositories_stay_private_end_to_end(hub, tmp_path):
    """``push --private`` through huggingface_hub (which sends ``"visibility": "private"``) makes a
    repository that anonymous clients cannot see or pull, and the token holder can."""
    endpoint, _ = hub
    f = adapter_file(tmp_path)
    p = cli("push", str(f), "me/secret", "--private", "--endpoint", endpoint, "--token", TOKEN)
    assert p.returncode == 0, p.stderr
    assert HfApi(endpoint=endpoint, token=TOKEN).model_info("me/secret").private is True
    with pytest.raises(hfe.RepositoryNotFoundError):
        HfApi(endpoint=endpoint, token=False).model_info("me/secret")
    with pytest.raises(cf.HubRepoNotFound):
        cf.pull("me/secret", endpoint=endpoint, token=False, cache_dir=tmp_path / "anon")
    with pytest.raises(cf.HubRepoNotFound):
        cf.pull("me/secret", endpoint=endpoint, token="wrong", cache_dir=tmp_path / "anon")
    res = cf.pull("me/secret", endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "owner")
    assert res.paths[0].read_bytes() == f.read_bytes()
    cf.push(f, "me/open", endpoint=endpoint, token=TOKEN)
    assert HfApi(endpoint=endpoint, token=False).model_info("me/open").private is False


def test_error_headers_cannot_be_injected(hub):
    """A path with CR LF or characters outside Latin-1 is echoed in X-Error-Message as printable
    ASCII: no header is added and the connection answers."""
    import http.client

    endpoint, _ = hub
    host, port = endpoint.removeprefix("http://").split(":")
    for path in ("/me/x%0d%0aSet-Cookie:%20evil=1/resolve/main/f", "/me/%E2%98%83%F0%9F%92%A5/resolve/main/f",
                 "/api/models/me/x%0aX-Injected:%201"):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        assert r.status == 404 and r.getheader("Set-Cookie") is None and r.getheader("X-Injected") is None
        msg = r.getheader("X-Error-Message")
        assert msg and all(32 <= ord(c) < 127 for c in msg)
        conn.close()


def _raw(endpoint: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One request on its own socket, headers exactly as given (no Content-Length added)."""
    host, port = endpoint.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    top, _, payload = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), hdrs, payload


def test_server_refuses_bad_and_oversized_bodies_before_reading_them(hub):
    endpoint, _ = hub
    t0 = time.perf_counter()
    status, h, body = _raw(endpoint, "POST", "/api/validate-yaml", headers={"Content-Length": str(10 ** 12)})
    assert status == 413 and json.loads(body)["error"].startswith("request body of")
    assert _raw(endpoint, "POST", "/api/validate-yaml", headers={"Content-Length": "-1"})[0] == 400
    assert _raw(endpoint, "POST", "/api/validate-yaml", headers={"Content-Length": "12abc"})[0] == 400
    assert _raw(endpoint, "POST", "/api/validate-yaml", b"0\r\n\r\n", {"Transfer-Encoding": "chunked"})[0] == 411
    deep = b"[" * 200_000 + b"]" * 200_000
    status, _, body = _raw(endpoint, "POST", "/api/models/me/x/paths-info/main", deep,
                           {"Content-Length": str(len(deep)), "Content-Type": "application/json"})
    assert status in (400, 404) and "error" in json.loads(body)
    assert time.perf_counter() - t0 < 5


def test_server_refuses_hostile_commit_paths_and_content(hub, tmp_path):
    endpoint, _ = hub
    api = HfApi(endpoint=endpoint, token=TOKEN)
    api.create_repo("me/paths-srv")

    def commit(path: str, content: str = "MQ==") -> tuple[int, str]:
        line = json.dumps({"key": "file", "value": {"path": path, "content": content, "encoding": "base64"}})
        body = (json.dumps({"key": "header", "value": {"summary": "m"}}) + "\n" + line).encode()
        status, _, answer = _raw(endpoint, "POST", "/api/models/me/paths-srv/commit/main", body,
                                 {"Content-Length": str(len(body)), "Authorization": f"Bearer {TOKEN}",
                                  "Content-Type": "application/x-ndjson"})
        return status, json.loads(answer).get("error", "")

    for path in ["..\\..\\x", "C:\\x", ".", "a//b", "a\0b", "x" * 5000, "a/../b", "/".join(["d"] * 600), ""]:
        assert commit(path)[0] == 400, path
    assert commit("a")[0] == 200
    assert commit("a/b") == (400, "'a' would be both a file and a folder")
    status, error = commit("f", "!!not base64!!")
    assert status == 400 and "not valid base64" in error
    assert [f.rfilename for f in api.model_info("me/paths-srv").siblings] == ["a"]


def test_server_ranges_follow_the_http_rules(hub):
    endpoint, _ = hub
    api = HfApi(endpoint=endpoint, token=TOKEN)
    api.create_repo("me/ranges")
    data = bytes(range(256)) * 40
    api.create_commit("me/ranges", [CommitOperationAdd("f.bin", data)], commit_message="m")
    url = "/me/ranges/resolve/main/f.bin"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert _raw(endpoint, "GET", url, headers=auth)[2] == data
    for rng, want in (("bytes=10-19", data[10:20]), ("bytes=10200-", data[10200:]), ("bytes=-7", data[-7:]),
                      ("bytes=10230-99999", data[10230:])):
        status, h, body = _raw(endpoint, "GET", url, headers={**auth, "Range": rng})
        assert status == 206 and body == want, rng
        start = len(data) - len(want) if rng.startswith("bytes=-") else int(rng[6:].split("-")[0])
        assert h["content-range"] == f"bytes {start}-{start + len(want) - 1}/{len(data)}"
    for rng in ("bytes=20-10", f"bytes={len(data)}-", "bytes=-0", "bytes=-"):
        status, h, _ = _raw(endpoint, "GET", url, headers={**auth, "Range": rng})
        assert status == 416 and h["content-range"] == f"bytes */{len(data)}", rng


def test_server_bounds_its_connections_and_drops_idle_ones(tmp_path):
    server = make_server(tmp_path / "hub", token=TOKEN, max_workers=2, timeout=1.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        idle = [socket.create_connection(server.server_address[:2]) for _ in range(2)]
        time.sleep(0.3)
        status, h, _ = _raw(endpoint, "GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 503 and h["retry-after"] == "1"
        time.sleep(1.5)  # the idle connections time out and give their slots back
        status, _, body = _raw(endpoint, "GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["name"] == "local"
        for s in idle:
            assert s.recv(10) == b""  # closed by the server
            s.close()
    finally:
        server.shutdown()
        server.server_close()


# --- recovery artifacts and the artifacts that require them (spec 3.6) -------------------------------
def cpet_files(folder: Path, base: dict[str, torch.Tensor], seed: int = 0) -> tuple[Path, Path]:
    """A recovery artifact and a task LoRA that requires it, both bound to the compressed base
    ``base`` (weights)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    binding = cf.binding.compute(base, id="org/tiny-int4", derived_from=cf.ModelRef(id="org/tiny"),
                                 recipe={"name": "int4:g32", "library": "cpet", "params": {"bits": 4}})
    rec_sd = {}
    for i in range(2):
        a1, a2 = cf.recovery.tensor_names(f"model.layers.{i}.self_attn.q_proj")
        rec_sd[a1], rec_sd[a2] = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
    rec = folder / "recovery.cpeft.safetensors"
    cf.save(cf.compress(rec_sd, recovery=cf.recovery.RecoveryConfig(r=4, alpha=8.0), base=binding, density=0.5), rec)
    lora = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight":
            torch.randn((4, 64) if ab == "A" else (64, 4), generator=g) for i in range(2) for ab in "AB"}
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    task = folder / "task.cpeft.safetensors"
    cf.save(cf.compress(lora, peft_config=cfg, base=binding, density=0.3, training={"steps": 5},
                        requires=[cf.requirements.requirement(rec)]), task)
    return rec, task


def test_push_pull_keeps_kinds_and_requirements(hub, tmp_path):
    endpoint, _ = hub
    base = {"model.w": torch.randn(8, 8)}
    rec, task = cpet_files(tmp_path / "run", base)
    cf.push([task, rec], "me/cpet", endpoint=endpoint, token=TOKEN)
    out = tmp_path / "pulled"
    res = cf.pull("me/cpet", local_dir=out, base=base, endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "c")
    entries = {a.path: a for a in res.index.artifacts}
    assert entries["recovery.cpeft.safetensors"].kind == "recovery"
    assert entries["recovery.cpeft.safetensors"].adapter_kind == "recovery"
    assert entries["recovery.cpeft.safetensors"].format_version == "1.4"
    assert entries["task.cpeft.safetensors"].kind == "adapter"
    assert entries["task.cpeft.safetensors"].requires == ("recovery.cpeft.safetensors",)
    index = json.loads((out / C.HUB_INDEX_FILE).read_text())
    assert [a.get("requires") for a in index["artifacts"]] == [None, ["recovery.cpeft.safetensors"]]
    # the pulled task finds its recovery artifact beside it
    (req,) = cf.verify(out / "task.cpeft.safetensors").requires
    assert cf.requirements.find(req, folder=out) == out / "recovery.cpeft.safetensors"
    api = HfApi(endpoint=endpoint, token=TOKEN)
    card = Path(api.hf_hub_download("me/cpet", "README.md", cache_dir=tmp_path / "c2")).read_text()
    assert "- recovery" in card.split("---")[1] and "**recovery**: recovery modules" in card
    assert "## task.cpeft.safetensors needs" in card and "`recovery.cpeft.safetensors` applied first" in card
    fp = cf.fingerprint(base)
    assert f"fingerprint ({fp.algorithm}): `{fp.value}`" in card
    assert "- derived from: org/tiny" in card and '- recipe: int4:g32 `{"bits": 4}`' in card
    assert 'files.paths[0].parent / "task.cpeft.safetensors"' in card

    # pull --base of another base refuses both artifacts, and writes nothing
    from safetensors.torch import save_file

    save_file({"model.w": torch.zeros(8, 8)}, str(tmp_path / "other.safetensors"))
    p = cli("pull", "me/cpet", "--base", str(tmp_path / "other.safetensors"), "-o", str(tmp_path / "o"),
            "--cache-dir", str(tmp_path / "c"), env={"HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN})
    assert p.returncode == 1 and "BASE_MISMATCH" in p.stderr and "recovery.cpeft.safetensors" in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()
    save_file(base, str(tmp_path / "base.safetensors"))
    p = cli("pull", "me/cpet", "--base", str(tmp_path / "base.safetensors"), "-o", str(tmp_path / "o"),
            "--cache-dir", str(tmp_path / "c"), env={"HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN})
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in (tmp_path / "o").glob("*.cpeft.safetensors")) == [
        "recovery.cpeft.safetensors", "task.cpeft.safetensors"]


def test_push_refuses_an_artifact_whose_requirement_is_missing(hub, tmp_path):
    endpoint, _ = hub
    api = HfApi(endpoint=endpoint, token=TOKEN)
    base = {"model.w": torch.randn(8, 8)}
    rec, task = cpet_files(tmp_path / "run", base)
    with pytest.raises(cf.RequirementMissing, match="neither in this push nor in the repository") as e:
        cf.push(task, "me/alone", endpoint=endpoint, token=TOKEN)
    assert e.value.code == "REQUIREMENT_MISSING" and e.value.manifest_sha256 == cf.requirements.manifest_digest(rec)
    assert not api.repo_exists("me/alone")  # refused before the repository was created
    p = cli("push", str(task), "me/alone", "--endpoint", endpoint, "--token", TOKEN)
    assert p.returncode == 1 and "REQUIREMENT_MISSING: " in p.stderr and p.stderr.count("\n") == 1, p.stderr
    # pushed one after the other: the task's requirement is found in the repository's index
    cf.push(rec, "me/alone", endpoint=endpoint, token=TOKEN)
    cf.push(task, "me/alone", endpoint=endpoint, token=TOKEN)
    res = cf.pull("me/alone", endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "c")
    assert {a.path: a.requires for a in res.index.artifacts} == {
        "recovery.cpeft.safetensors": (), "task.cpeft.safetensors": ("recovery.cpeft.safetensors",)}
    # another branch starts from main, which holds the recovery artifact
    cf.push(task, "me/alone", revision="dev", endpoint=endpoint, token=TOKEN)
    # replacing the required artifact with other content would leave the task without it
    other_rec, _ = cpet_files(tmp_path / "other", base, seed=3)
    head = api.model_info("me/alone").sha
    with pytest.raises(cf.RequirementMissing, match="would replace"):
        cf.push(other_rec, "me/alone", endpoint=endpoint, token=TOKEN)
    assert api.model_info("me/alone").sha == head


def test_push_into_a_peft_repository_keeps_its_files_and_its_card(hub, tmp_path):
    """A push merges its section into the card the owner wrote (licence, evaluation results and
    text kept), adds its tags, and leaves the PEFT adapter's files as they were; the card lists
    every artifact of the index, the earlier pushes' too."""
    endpoint, _ = hub
    api = HfApi(endpoint=endpoint, token=TOKEN)
    api.create_repo("me/peft")
    card = ("---\nlicense: apache-2.0\nlibrary_name: peft\nbase_model: org/tiny-llama\ntags:\n- lora\n"
            "model-index:\n- name: peft\n  results: []\n---\n\n# My adapter\n\nTrained with care.\n")
    peft_files = {"README.md": card.encode(), "adapter_config.json": b'{"peft_type": "LORA", "r": 8}',
                  "adapter_model.safetensors": b"weights peft reads"}
    api.create_commit("me/peft", [CommitOperationAdd(k, v) for k, v in peft_files.items()], commit_message="peft")
    first = adapter_file(tmp_path, 0, "a.cpeft.safetensors")
    cf.push(first, "me/peft", endpoint=endpoint, token=TOKEN)
    second = tmp_path / "b.cpeft.safetensors"
    cf.save(cf.compress({"w": torch.randn(64, 64)}, density=0.1, created_at="2020-01-01T00:00:00Z"), second)
    cf.push(second, "me/peft", endpoint=endpoint, token=TOKEN)

    def read(name: str) -> bytes:
        return Path(api.hf_hub_download("me/peft", name, cache_dir=tmp_path / f"c-{name}")).read_bytes()

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert read(name) == peft_files[name]
    text = read("README.md").decode()
    front = text.split("---")[1]
    assert "license: apache-2.0" in front and "library_name: peft" in front and "model-index:" in front
    assert "base_model: org/tiny-llama" in front and "- lora" in front and "- compeft" in front
    assert "# My adapter" in text and "Trained with care." in text
    assert text.count("compeft:begin") == 1 and text.count("compeft:end") == 1  # replaced, not appended
    section = text.split("compeft:begin")[1]
    assert "| a.cpeft.safetensors |" in section and "| b.cpeft.safetensors |" in section


def test_a_card_whose_front_matter_cannot_be_read_is_left_alone(hub, tmp_path):
    endpoint, _ = hub
    api = HfApi(endpoint=endpoint, token=TOKEN)
    api.create_repo("me/odd")
    odd = b"---\nlicense: [unclosed\n---\nhand-written\n"
    api.create_commit("me/odd", [CommitOperationAdd("README.md", odd)], commit_message="card")
    cf.push(adapter_file(tmp_path), "me/odd", endpoint=endpoint, token=TOKEN)
    assert Path(api.hf_hub_download("me/odd", "README.md", cache_dir=tmp_path / "c")).read_bytes() == odd
    assert C.HUB_INDEX_FILE in api.list_repo_files("me/odd")


def test_files_named_as_peft_or_transformers_files_are_not_pushed(hub, tmp_path):
    endpoint, _ = hub
    for name in ("adapter_model.safetensors", "model-00001-of-00002.safetensors", "config.json"):
        f = adapter_file(tmp_path)  # save refuses the names peft loads: a user renames the file afterwards
        renamed = f.rename(f.with_name(name))
        with pytest.raises(cf.InvalidArgument, match="rename it"):
            cf.push(renamed, "me/x", endpoint=endpoint, token=TOKEN)


@pytest.mark.parametrize("xet", ["1", ""], ids=["xet-disabled", "xet-as-installed"])
def test_compeft_push_uploads_to_an_lfs_server_whether_or_not_xet_is_on(lfs_hub, tmp_path, xet):
    """huggingface_hub uploads through Xet when hf_xet is installed, which this server does not
    serve: push falls back to the LFS batch API by itself."""
    from huggingface_hub.utils import is_package_available

    assert xet or is_package_available("hf_xet")  # the case is real: the client would try Xet
    endpoint, _ = lfs_hub
    f = adapter_file(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"} | ({"HF_HUB_DISABLE_XET": xet} if xet else {})
    p = subprocess.run([sys.executable, "-m", "compeft_format.cli", "push", str(f), "me/lfs", "--endpoint", endpoint,
                        "--token", TOKEN], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # no progress bars or warnings when stderr is not a terminal
    res = cf.pull("me/lfs", endpoint=endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    assert res.paths[0].read_bytes() == f.read_bytes()


def test_a_push_without_a_token_says_so(hub, tmp_path):
    endpoint, _ = hub
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    p = subprocess.run([sys.executable, "-m", "compeft_format.cli", "push", str(adapter_file(tmp_path)), "me/x",
                        "--endpoint", endpoint], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**env, "HF_HOME": str(tmp_path / "hf-home")})
    assert p.returncode == 1 and "HUB_AUTH" in p.stderr and "none was given" in p.stderr
    p = cli("push", str(adapter_file(tmp_path)), "me/x", "--endpoint", endpoint, "--token", "wrong")
    assert p.returncode == 1 and "refused the token" in p.stderr


@pytest.mark.parametrize("front", ["[" * 5000 + "]" * 5000, "a: &a [1]\nb: [*a, *a]\nc: !!python/object:os.system x",
                                   "- just\n- a list"])
def test_hostile_card_front_matter_is_left_alone(front):
    """A card's front matter is a stranger's YAML: deeply nested, tagged for code, or not a
    mapping, the card is not touched (and nothing is run)."""
    from compeft_format.hub.card import merge_card

    text = f"---\n{front}\n---\nbody\n"
    assert merge_card(text, "me/x", {"tags": ["compeft"]}, "section") is None


def test_a_local_base_path_is_not_the_cards_base_model(hub, tmp_path):
    """A PEFT config's base_model_name_or_path may be a local folder: the card's front matter
    names only Hub model ids (the Hub refuses others), the table still shows what was recorded."""
    endpoint, _ = hub
    g = torch.Generator().manual_seed(0)
    sd = {f"base_model.model.layers.0.q_proj.lora_{ab}.weight":
          torch.randn((8, 64) if ab == "A" else (64, 8), generator=g) for ab in "AB"}
    f = tmp_path / "local.cpeft.safetensors"
    cf.save(cf.compress(sd, peft_config={"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]},
                        base=cf.BaseBinding(id="/home/me/models/base")), f)
    cf.push(f, "me/local-base", endpoint=endpoint, token=TOKEN)
    card = Path(HfApi(endpoint=endpoint, token=TOKEN).hf_hub_download("me/local-base", "README.md",
                                                                      cache_dir=tmp_path / "c")).read_text()
    front = card.split("---")[1]
    assert "base_model" not in front and "library_name: compeft" in front
    assert "/home/me/models/base" in card.split("---", 2)[2]


def test_an_lfs_server_answers_a_xet_token_request_with_what_to_set(lfs_hub, tmp_path):
    """huggingface_hub with hf_xet installed asks for a Xet token before uploading; hf_xet shows
    only the status, so the answer's message is for whoever reads the server's reply or logs."""
    import urllib.error
    import urllib.request

    endpoint, _ = lfs_hub
    cf.push(adapter_file(tmp_path), "me/lfs", endpoint=endpoint, token=TOKEN)
    req = urllib.request.Request(f"{endpoint}/api/models/me/lfs/xet-write-token/main",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 404 and "HF_HUB_DISABLE_XET=1" in e.value.headers["X-Error-Message"]
