"""Who may do what on ``compeft hub serve``: tokens and their namespaces, private repositories,
LFS objects scoped to the repository they were uploaded to, and a store that a killed server
leaves clean. Driven with the real huggingface_hub client over 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hfe

import compeft_format as cf
from compeft_format import constants as C
from compeft_format.hub.server import (
    E_LFS_OBJECT_NOT_IN_REPO,
    E_NAMESPACE_FORBIDDEN,
    MAX_TOKEN_FILE,
    TokenTable,
    make_server,
)
from conftest import ROOT

ALICE, BOB, ADMIN = "tok-alice-7f3a9c", "tok-bob-51e0d2", "tok-admin-c94b17"
TOKENS = {"tokens": {ALICE: ["alice", "team"], BOB: ["bob"], ADMIN: ["*"]}}


@contextlib.contextmanager
def serving(root: Path, **kwargs) -> Iterator[str]:
    """An in-process server on 127.0.0.1 (a free port) for the ``with`` block; yields its URL."""
    server = make_server(root, port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A server with alice's, bob's and an admin token that asks for LFS uploads of binary files."""
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # Xet storage is not served
    root = tmp_path / "hub"
    with serving(root, tokens=TokenTable(TOKENS["tokens"]), lfs=True) as endpoint:
        yield endpoint, root


def request(endpoint: str, method: str, path: str, body: bytes = b"", token: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request as given; the answer's status, headers (lower-case names) and body."""
    url = urlsplit(endpoint)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        auth = {} if token is None else {"Authorization": f"Bearer {token}"}
        conn.request(method, path, body=body, headers={**auth, **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def commit_lfs_by_oid(endpoint: str, repo_id: str, path: str, oid: str, size: int, token: str) -> tuple[int, dict]:
    """Commit an lfsFile that names ``oid`` without uploading anything."""
    lines = [{"key": "header", "value": {"summary": "by oid"}},
             {"key": "lfsFile", "value": {"path": path, "algo": "sha256", "oid": oid, "size": size}}]
    body = "\n".join(json.dumps(x) for x in lines).encode()
    status, _, answer = request(endpoint, "POST", f"/api/models/{repo_id}/commit/main", body, token,
                                {"Content-Type": "application/x-ndjson"})
    return status, json.loads(answer)


def lfs_batch(endpoint: str, repo_id: str, oid: str, size: int, token: str) -> dict:
    body = json.dumps({"operation": "upload", "transfers": ["basic"],
                       "objects": [{"oid": oid, "size": size}]}).encode()
    status, _, answer = request(endpoint, "POST", f"/{repo_id}.git/info/lfs/objects/batch", body, token,
                                {"Content-Type": "application/vnd.git-lfs+json"})
    assert status == 200, answer
    return json.loads(answer)["objects"][0]


# --- namespaces ---------------------------------------------------------------------------------
def test_a_token_writes_its_own_namespaces_only(hub):
    endpoint, _ = hub
    alice, bob = HfApi(endpoint=endpoint, token=ALICE), HfApi(endpoint=endpoint, token=BOB)
    alice.create_repo("alice/x")
    alice.create_commit("alice/x", [CommitOperationAdd("a.txt", b"a")], commit_message="a")
    alice.create_repo("team/x")
    assert alice.list_repo_files("alice/x") == ["a.txt"]
    assert alice.whoami()["name"] == "alice" and [o["name"] for o in alice.whoami()["orgs"]] == ["team"]

    with pytest.raises(hfe.HfHubHTTPError) as e:
        alice.create_repo("bob/y")
    assert e.value.response.status_code == 403
    assert e.value.response.headers["X-Error-Code"] == E_NAMESPACE_FORBIDDEN
    assert e.value.response.json()["code"] == E_NAMESPACE_FORBIDDEN
    assert not bob.repo_exists("bob/y")

    bob.create_repo("bob/y")
    bob.create_commit("bob/y", [CommitOperationAdd("b.txt", b"b")], commit_message="b")
    head = bob.model_info("bob/y").sha
    for attempt in (
        lambda: alice.create_commit("bob/y", [CommitOperationAdd("evil.txt", b"x")], commit_message="x"),
        lambda: alice.create_commit("bob/y", [CommitOperationDelete("b.txt")], commit_message="x"),
        lambda: alice.create_branch("bob/y", branch="evil"),
        lambda: alice.create_tag("bob/y", tag="evil"),
        lambda: alice.delete_branch("bob/y", branch="main"),
    ):
        with pytest.raises(hfe.HfHubHTTPError) as e:
            attempt()
        assert e.value.response.status_code == 403
        assert e.value.response.headers["X-Error-Code"] == E_NAMESPACE_FORBIDDEN
    refs = bob.list_repo_refs("bob/y")
    assert [b.name for b in refs.branches] == ["main"] and refs.tags == []
    assert bob.model_info("bob/y").sha == head and bob.list_repo_files("bob/y") == ["b.txt"]

    with pytest.raises(hfe.HfHubHTTPError) as e:
        HfApi(endpoint=endpoint, token=False).create_repo("alice/anon")
    assert e.value.response.status_code == 401
    with pytest.raises(hfe.HfHubHTTPError) as e:
        HfApi(endpoint=endpoint, token="tok-alice-7f3a9").create_repo("alice/prefix")  # a prefix of alice's
    assert e.value.response.status_code == 401
    assert not alice.repo_exists("alice/anon") and not alice.repo_exists("alice/prefix")

    admin = HfApi(endpoint=endpoint, token=ADMIN)
    admin.create_commit("bob/y", [CommitOperationAdd("c.txt", b"c")], commit_message="admin")
    assert bob.list_repo_files("bob/y") == ["b.txt", "c.txt"]


def test_push_to_a_namespace_of_another_token_is_an_auth_error(hub, tmp_path):
    endpoint, _ = hub
    HfApi(endpoint=endpoint, token=BOB).create_repo("bob/adapter")
    from test_hub import adapter_file

    f = adapter_file(tmp_path)
    with pytest.raises(cf.HubAuthError) as e:
        cf.push(f, "bob/adapter", endpoint=endpoint, token=ALICE)
    assert e.value.status == 403
    assert cf.push(f, "alice/adapter", endpoint=endpoint, token=ALICE).files == [f.name]


# --- private repositories -----------------------------------------------------------------------
PRIVATE_READS = [
    ("GET", "/api/models/{r}", b""),
    ("GET", "/api/models/{r}/revision/main", b""),
    ("GET", "/api/models/{r}/tree/main", b""),
    ("POST", "/api/models/{r}/paths-info/main", b'{"paths": ["secret.txt"]}'),
    ("GET", "/api/models/{r}/refs", b""),
    ("GET", "/api/models/{r}/commits/main", b""),
    ("GET", "/{r}/resolve/main/secret.txt", b""),
    ("HEAD", "/{r}/resolve/main/secret.txt", b""),
]


def test_a_private_repository_is_missing_to_other_tokens(hub, tmp_path):
    endpoint, _ = hub
    alice = HfApi(endpoint=endpoint, token=ALICE)
    alice.create_repo("alice/p", private=True)
    alice.create_commit("alice/p", [CommitOperationAdd("secret.txt", b"the secret")], commit_message="s")
    HfApi(endpoint=endpoint, token=ADMIN).create_repo("team/p", private=True)

    assert alice.model_info("alice/p").private is True
    assert Path(alice.hf_hub_download("alice/p", "secret.txt", cache_dir=tmp_path / "a")).read_bytes() == b"the secret"
    assert HfApi(endpoint=endpoint, token=ADMIN).list_repo_files("alice/p") == ["secret.txt"]
    assert alice.model_info("team/p").private is True  # alice may write team/
    for token in (BOB, False, "not-a-token"):
        api = HfApi(endpoint=endpoint, token=token)
        with pytest.raises(hfe.RepositoryNotFoundError):
            api.model_info("alice/p")
        with pytest.raises(hfe.RepositoryNotFoundError):
            api.hf_hub_download("alice/p", "secret.txt", cache_dir=tmp_path / "b")
    with pytest.raises(hfe.RepositoryNotFoundError):
        HfApi(endpoint=endpoint, token=BOB).model_info("team/p")

    # every read answers exactly as for a repository that does not exist
    for method, route, body in PRIVATE_READS:
        for token in (BOB, None):
            hidden = request(endpoint, method, route.format(r="alice/p"), body, token)
            missing = request(endpoint, method, route.format(r="alice/none"), body, token)
            assert hidden[0] == missing[0] == 404, route
            assert hidden[1].get("x-error-code") == missing[1].get("x-error-code") == "RepoNotFound", route
            assert hidden[2].replace(b"alice/p", b"alice/none") == missing[2], route
        assert request(endpoint, method, route.format(r="alice/p"), body, ALICE)[0] == 200, route
    # creating it anew answers as for a missing one too (403); a repository bob can see is a conflict
    create = [request(endpoint, "POST", "/api/repos/create", json.dumps({"name": n, "organization": "alice"}).encode(),
                      BOB, {"Content-Type": "application/json"}) for n in ("p", "none")]
    assert [(s, h.get("x-error-code")) for s, h, _ in create] == [(403, E_NAMESPACE_FORBIDDEN)] * 2
    assert create[0][2].replace(b"alice/p", b"alice/none") == create[1][2]
    alice.create_repo("alice/public")
    with pytest.raises(hfe.HfHubHTTPError) as e:
        HfApi(endpoint=endpoint, token=BOB).create_repo("alice/public")
    assert e.value.response.status_code == 409


def test_a_server_without_tokens_lets_anyone_write_and_shows_private_repositories_to_no_one(tmp_path):
    with serving(tmp_path / "hub") as endpoint:
        anyone = HfApi(endpoint=endpoint, token=False)
        anyone.create_repo("someone/open")
        anyone.create_commit("someone/open", [CommitOperationAdd("a.txt", b"a")], commit_message="a")
        assert HfApi(endpoint=endpoint, token="whatever").list_repo_files("someone/open") == ["a.txt"]
        anyone.create_repo("someone/hidden", private=True)
        for token in (False, "whatever"):
            with pytest.raises(hfe.RepositoryNotFoundError):
                HfApi(endpoint=endpoint, token=token).model_info("someone/hidden")


# --- LFS objects belong to the repositories they were uploaded to ----------------------------------
def test_a_private_blob_cannot_be_republished_by_its_oid(hub, tmp_path):
    endpoint, root = hub
    alice, bob = HfApi(endpoint=endpoint, token=ALICE), HfApi(endpoint=endpoint, token=BOB)
    secret = os.urandom(3000) + b"weights"
    oid, size = hashlib.sha256(secret).hexdigest(), len(secret)
    alice.create_repo("alice/p", private=True)
    alice.create_commit("alice/p", [CommitOperationAdd("w.safetensors", secret)], commit_message="w")
    tree = {e.path: e for e in alice.list_repo_tree("alice/p")}
    assert tree["w.safetensors"].lfs.sha256 == oid and (root / "blobs" / oid).read_bytes() == secret

    bob.create_repo("bob/steal")
    status, answer = commit_lfs_by_oid(endpoint, "bob/steal", "w.safetensors", oid, size, BOB)
    assert (status, answer["code"]) == (422, E_LFS_OBJECT_NOT_IN_REPO)
    # the same answer as for an object stored nowhere: the refusal does not tell that it exists
    other = hashlib.sha256(b"stored nowhere").hexdigest()
    status2, answer2 = commit_lfs_by_oid(endpoint, "bob/steal", "w.safetensors", other, size, BOB)
    assert (status2, answer2["code"]) == (422, E_LFS_OBJECT_NOT_IN_REPO)
    assert answer2["error"].replace(other, oid) == answer["error"]
    assert bob.list_repo_files("bob/steal") == []

    # the batch API asks bob for the bytes, and bytes that are not them are refused
    entry = lfs_batch(endpoint, "bob/steal", oid, size, BOB)
    upload = urlsplit(entry["actions"]["upload"]["href"])
    status, _, _ = request(endpoint, "PUT", f"{upload.path}?{upload.query}", b"\0" * size)
    assert status == 400
    forged = upload.path.replace("/bob/steal/", "/alice/p/")
    assert request(endpoint, "PUT", f"{forged}?{upload.query}", secret)[0] == 403  # signed for bob/steal only
    verify = urlsplit(entry["actions"]["verify"]["href"]).path
    status, h, _ = request(endpoint, "POST", verify, json.dumps({"oid": oid, "size": size}).encode(), BOB)
    assert (status, h["x-error-code"]) == (404, E_LFS_OBJECT_NOT_IN_REPO)
    assert commit_lfs_by_oid(endpoint, "bob/steal", "w.safetensors", oid, size, BOB)[0] == 422

    # ownership is per repository, not per token: alice's other repository cannot name it either
    alice.create_repo("alice/q")
    assert commit_lfs_by_oid(endpoint, "alice/q", "w.safetensors", oid, size, ALICE)[0] == 422
    # in the repository it was uploaded to, it may be named again
    assert commit_lfs_by_oid(endpoint, "alice/p", "copy.safetensors", oid, size, ALICE)[0] == 200
    assert sorted(alice.list_repo_files("alice/p")) == ["copy.safetensors", "w.safetensors"]
    assert lfs_batch(endpoint, "alice/p", oid, size, ALICE).get("actions") is None  # already there

    # whoever holds the bytes may upload them to their own repository; the store keeps one copy
    bob.create_commit("bob/steal", [CommitOperationAdd("mine.safetensors", secret)], commit_message="mine")
    got = Path(bob.hf_hub_download("bob/steal", "mine.safetensors", cache_dir=tmp_path / "c")).read_bytes()
    assert got == secret
    assert [p.name for p in (root / "blobs").iterdir() if p.read_bytes() == secret] == [oid]


def test_upload_urls_follow_the_scheme_a_tls_proxy_forwards(hub):
    endpoint, _ = hub
    HfApi(endpoint=endpoint, token=ALICE).create_repo("alice/tls")
    body = json.dumps({"operation": "upload", "objects": [{"oid": "ab" * 32, "size": 5}]}).encode()
    hrefs = []
    for proto in ("https", "http", None):
        headers = {"Host": "hub.example.org", **({} if proto is None else {"X-Forwarded-Proto": proto})}
        status, _, answer = request(endpoint, "POST", "/alice/tls.git/info/lfs/objects/batch", body, ALICE, headers)
        assert status == 200
        hrefs.append(json.loads(answer)["objects"][0]["actions"]["upload"]["href"])
    assert [h.partition("://")[0] for h in hrefs] == ["https", "http", "http"]
    prefix = "hub.example.org/_lfs/model/alice/tls/" + "ab" * 32 + "?size=5&sig="
    assert all(h.partition("://")[2].startswith(prefix) for h in hrefs)


def test_inline_files_make_their_blob_the_repositorys(hub):
    endpoint, _ = hub
    alice = HfApi(endpoint=endpoint, token=ALICE)
    alice.create_repo("alice/inline")
    alice.create_commit("alice/inline", [CommitOperationAdd("notes.txt", b"plain text")], commit_message="n")
    oid = hashlib.sha256(b"plain text").hexdigest()
    assert commit_lfs_by_oid(endpoint, "alice/inline", "again.bin", oid, 10, ALICE)[0] == 200
    HfApi(endpoint=endpoint, token=BOB).create_repo("bob/inline")
    assert commit_lfs_by_oid(endpoint, "bob/inline", "again.bin", oid, 10, BOB)[0] == 422


# --- token files --------------------------------------------------------------------------------
def test_a_token_file_grants_namespaces(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    table = TokenTable.load(path)
    assert len(table) == 3
    assert table.grant(f"Bearer {ALICE}").namespaces == ("alice", "team")
    assert table.grant(f"bearer  {BOB} ").namespaces == ("bob",)
    assert table.grant(f"Bearer {ADMIN}").may_write("anyone") is True
    assert table.grant(f"Bearer {ALICE}").may_write("bob") is False
    for header in (None, "", ALICE, f"Basic {ALICE}", f"Bearer {ALICE}x", f"Bearer {ALICE[:-1]}", "Bearer "):
        assert table.grant(header) is None, header
    assert [i for i in range(2000) if table.grant(f"Bearer tok-{i}") is not None] == []
    merged = table.with_token(ALICE, ["bob"]).with_token("tok-cli")
    assert merged.grant(f"Bearer {ALICE}").namespaces == ("alice", "team", "bob")
    assert merged.grant("Bearer tok-cli").namespaces == ("*",) and len(table) == 3
    empty = tmp_path / "none.json"
    empty.write_text('{"tokens": {}}')
    assert len(TokenTable.load(empty)) == 0


SECRET = "tok-secret-2b7e15"


def secret_grant(namespaces: str) -> bytes:
    """A token file granting SECRET the JSON text ``namespaces``, as written."""
    return ('{"tokens": {"' + SECRET + '": ' + namespaces + "}}").encode()


@pytest.mark.parametrize("data", [
    b"",
    b"not json",
    b"[]",
    b'{"tokens": []}',
    b'{"tokens": {}, "admins": []}',
    b'{"token": {}}',
    b'{"tokens": {"has space": ["alice"]}}',
    b'{"tokens": {"": ["alice"]}}',
    b'{"tokens": {"tok-\\u00e9t\\u00e9": ["alice"]}}',
    json.dumps({"tokens": {"x" * 1025: ["alice"]}}).encode(),
    secret_grant('"alice"'),
    secret_grant("[]"),
    secret_grant('["../etc"]'),
    secret_grant('["alice", 7]'),
    secret_grant("[null]"),
    secret_grant('["alice\\n"]'),
    secret_grant(f'["alice"], "{SECRET}": ["*"]'),
    secret_grant("[NaN]"),
    b'{"tokens": {"a": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}}",
    b'{"tokens": {"\xff\xfe": ["alice"]}}',
    b" " * MAX_TOKEN_FILE + b'{"tokens": {}}',
])
def test_a_malformed_token_file_is_a_typed_error(tmp_path, data):
    path = tmp_path / "tokens.json"
    path.write_bytes(data)
    with pytest.raises(cf.InvalidArgument) as e:
        TokenTable.load(path)
    assert e.value.code == C.E_INVALID_ARGUMENT and e.value.path == str(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    assert SECRET not in str(e.value)


def test_a_token_file_that_is_no_file_is_a_typed_error(tmp_path):
    with pytest.raises(cf.FileNotFound) as e:
        TokenTable.load(tmp_path / "missing.json")
    assert e.value.path == str(tmp_path / "missing.json")
    with pytest.raises(cf.InvalidArgument, match="not a regular file"):
        TokenTable.load(tmp_path)
    with pytest.raises(cf.InvalidArgument):
        make_server(tmp_path / "hub", token="two words")


def test_serve_reports_a_malformed_token_file_on_one_line(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": {SECRET: ["alice", "bad/name"]}}))
    p = subprocess.run([sys.executable, "-m", "compeft_format.cli", "hub", "serve", "--root", str(tmp_path / "hub"),
                        "--port", "0", "--tokens", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith(f"compeft hub serve: {C.E_INVALID_ARGUMENT}: {path}: token #1: namespace 'bad/name'")
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr and SECRET not in p.stderr


# --- a killed server ----------------------------------------------------------------------------
def start_cli_server(root: Path, tokens: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "compeft_format.cli", "hub", "serve", "--root", str(root),
                             "--port", "0", "--tokens", str(tokens), "--lfs"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    m = re.search(r" on (http://127\.0\.0\.1:\d+) \(writes need one of 3 token\(s\)\)", line)
    if m is None:
        proc.kill()
        proc.wait(timeout=30)
        raise AssertionError(f"serve printed {line!r}; stderr {proc.stderr.read()!r}")
    return proc, m.group(1)


def test_a_killed_server_leaves_no_temporary_files_and_loses_no_acknowledged_commit(tmp_path):
    root, tokens = tmp_path / "hub", tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    proc, endpoint = start_cli_server(root, tokens)
    try:
        alice = HfApi(endpoint=endpoint, token=ALICE)
        alice.create_repo("alice/x")
        acked = alice.create_commit("alice/x", [CommitOperationAdd("a.txt", b"kept")], commit_message="a").oid

        # an LFS upload cut off halfway: its temporary file is in blobs/ when the server dies
        data = os.urandom(3 << 20)
        oid = hashlib.sha256(data).hexdigest()
        href = urlsplit(lfs_batch(endpoint, "alice/x", oid, len(data), ALICE)["actions"]["upload"]["href"])
        url = urlsplit(endpoint)
        sock = socket.create_connection((url.hostname, url.port), timeout=30)
        sock.sendall(f"PUT {href.path}?{href.query} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
                     .encode() + data[: len(data) // 2])
        deadline = time.monotonic() + 30
        while not list((root / "blobs").glob(".*.part")) and time.monotonic() < deadline:
            time.sleep(0.05)
        parts = list((root / "blobs").glob(".*.part"))
        assert len(parts) == 1 and parts[0].name.startswith(f".{oid}.")
        proc.kill()
        proc.wait(timeout=30)
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()

    repo = root / "repos" / "models" / "alice" / "x"
    # fileio.atomic_write's temporary folder, with the file it was writing inside
    folder = repo / ".refs.json.a1b2c3d4-999999.abcdefgh.tmp"
    planted = [folder.with_name(".refs.json.old-999998.tmp"), repo / "commits" / ".x.json.q8w7e6r5.tmp"]
    folder.mkdir()
    planted.append(folder / ".refs.json.tmp")
    for p in planted:
        p.write_bytes(b"half a write")
    keep = [repo / "refs.json", root / "blobs" / hashlib.sha256(b"kept").hexdigest()]
    assert all(p.is_file() for p in keep)

    proc, endpoint = start_cli_server(root, tokens)
    try:
        leftovers = [p for p in root.rglob(".*") if p.name.endswith((".part", ".tmp"))]
        assert leftovers == [] and not parts[0].exists() and not folder.exists()
        assert all(p.is_file() for p in keep) and not (root / "blobs" / oid).exists()
        alice = HfApi(endpoint=endpoint, token=ALICE)
        assert alice.model_info("alice/x").sha == acked
        got = Path(alice.hf_hub_download("alice/x", "a.txt", cache_dir=tmp_path / "c")).read_bytes()
        assert got == b"kept"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def test_two_servers_cannot_share_a_root(tmp_path):
    root = tmp_path / "hub"
    with serving(root, token=ADMIN):
        with pytest.raises(cf.IOFailure, match="another compeft hub server is serving this folder"):
            make_server(root, port=0)
    with serving(root, token=ADMIN) as endpoint:  # the lock went with the first server
        assert HfApi(endpoint=endpoint, token=ADMIN).whoami()["name"] == "local"


def test_if_range_with_another_version_gets_the_whole_file(hub):
    endpoint, _ = hub
    alice = HfApi(endpoint=endpoint, token=ALICE)
    alice.create_repo("alice/ranges")
    data = bytes(range(256)) * 8
    alice.create_commit("alice/ranges", [CommitOperationAdd("f.txt", data)], commit_message="m")
    url = "/alice/ranges/resolve/main/f.txt"
    status, h, _ = request(endpoint, "HEAD", url, token=ALICE)
    etag = h["etag"]
    status, h, body = request(endpoint, "GET", url, token=ALICE, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert status == 206 and body == data[:10]
    for other in ('"0000"', f"W/{etag}", "Sun, 06 Dec 2026 00:00:00 GMT"):
        status, h, body = request(endpoint, "GET", url, token=ALICE, headers={"Range": "bytes=0-9", "If-Range": other})
        assert status == 200 and body == data and "content-range" not in h, other
