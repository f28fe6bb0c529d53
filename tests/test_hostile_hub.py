"""``pull`` against a Hub that lies: hostile ETags, commit ids, sizes, error messages and bodies.

A small server answers each URL as the test says. Whatever it answers, pull may create files only
in its cache and the output folder, never removes a file it did not create, and fails with a
typed error and a one-line message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import compeft_format as cf
from compeft_format import constants as C
from compeft_format.hub.index import Index, IndexEntry

COMMIT = "a" * 40


class Hostile:
    """Routes ``/me/repo/resolve/<rev>/<path>`` to ``(status, headers, body)``; records requests."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.seen: list[str] = []

    def serve(self) -> ThreadingHTTPServer:
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                hostile.seen.append(self.path)
                status, headers, body = hostile.routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # a client that stops reading at its cap hangs up mid-body: that is the point
                with contextlib.suppress(ConnectionError):
                    self.wfile.write(body)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@pytest.fixture
def hostile():
    h = Hostile()
    server = h.serve()
    h.endpoint = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield h
    server.shutdown()
    server.server_close()


def artifact(tmp_path: Path) -> tuple[bytes, bytes]:
    """A real compressed adapter and the index that lists it (as ``adapter.cpeft.safetensors``)."""
    g = torch.Generator().manual_seed(0)
    sd = {f"base_model.model.layers.0.q_proj.lora_{ab}.weight": torch.randn((4, 64) if ab == "A" else (64, 4),
                                                                            generator=g) for ab in "AB"}
    path = tmp_path / "src" / "adapter.cpeft.safetensors"
    path.parent.mkdir()
    cf.save(cf.compress(sd, density=0.2, peft_config={"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                      "target_modules": ["q_proj"]}), path)
    with cf.open_file(path) as f:
        entry = IndexEntry.of(f, path.name, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    return path.read_bytes(), Index([entry]).to_json().encode()


def serve_repo(h: Hostile, data: bytes, index: bytes, *, index_headers: dict[str, str] | None = None,
               file_headers: dict[str, str] | None = None, body: bytes | None = None) -> None:
    h.routes[f"/me/repo/resolve/main/{C.HUB_INDEX_FILE}"] = (200, {"X-Repo-Commit": COMMIT, **(index_headers or {})},
                                                             index)
    h.routes[f"/me/repo/resolve/{COMMIT}/adapter.cpeft.safetensors"] = (
        200, {"X-Repo-Commit": COMMIT, **(file_headers or {})}, data if body is None else body)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


def test_hostile_etags_never_name_a_file(hostile, tmp_path):
    """An absolute or ``../`` ETag (which huggingface_hub's cache would use as a file name) is
    ignored: the download lands in the cache under the index's name and nowhere else."""
    data, index = artifact(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for etag in (f'"{victim}"', '"../../../../victim.txt"', '"/tmp/evil"'):
        serve_repo(hostile, data, index, index_headers={"ETag": etag}, file_headers={"ETag": etag,
                                                                                     "X-Linked-Etag": etag})
        cache = tmp_path / f"cache{len(hostile.seen)}"
        res = cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=cache)
        assert res.commit == COMMIT and res.paths[0].read_bytes() == data
        assert res.paths[0].resolve().is_relative_to(cache.resolve())
    assert victim.read_text() == "keep me" and not Path("/tmp/evil").exists()
    caches = set(tmp_path.glob("cache*"))
    assert files_under(tmp_path) - files_under(tmp_path / "src") - {tmp_path / "src", victim} == {
        p for c in caches for p in files_under(c)} | caches


def test_a_wrong_digest_removes_only_the_download(hostile, tmp_path):
    """Bytes that do not match the index are refused; the user's file the ETag names survives,
    no temporary file stays behind, and a second pull is refused the same way."""
    data, index = artifact(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    bad = bytearray(data)
    bad[-1] ^= 1
    serve_repo(hostile, data, index, file_headers={"ETag": f'"{victim}"'}, body=bytes(bad))
    cache = tmp_path / "cache"
    for _ in range(2):
        with pytest.raises(cf.ArtifactDigestMismatch) as e:
            cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=cache)
        assert e.value.code == C.E_ARTIFACT_DIGEST_MISMATCH
    assert victim.read_text() == "keep me"
    assert not any(p.name.endswith((".part", ".tmp")) for p in files_under(cache))
    assert not any(p.name == "adapter.cpeft.safetensors" for p in files_under(cache))


def test_a_killed_pulls_temporary_file_is_removed_by_the_next_pull(hostile, tmp_path):
    import subprocess
    import sys

    from compeft_format import fileio

    data, index = artifact(tmp_path)
    serve_repo(hostile, data, index)
    cache = tmp_path / "cache"
    first = cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=cache).paths[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    left = first.parent / f".{first.name}.{fileio._host_tag()}-{pid}.a1b2c3d4.tmp"
    live = first.parent / f".{first.name}.{fileio._host_tag()}-{os.getpid()}.e5f6a7b8.tmp"
    left.write_bytes(data[:100])
    live.write_bytes(data[:100])
    first.unlink()
    again = cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=cache).paths[0]
    assert again.read_bytes() == data and not left.exists() and live.exists()


def test_more_bytes_than_declared_stop_the_download(hostile, tmp_path):
    data, index = artifact(tmp_path)
    serve_repo(hostile, data, index, body=data + b"\0" * (4 << 20))
    with pytest.raises(cf.ArtifactDigestMismatch, match="more than"):
        cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=tmp_path / "cache")
    assert not any(p.is_file() and p.name != C.HUB_INDEX_FILE and "refs" not in p.parts
                   for p in files_under(tmp_path / "cache"))


@pytest.mark.parametrize("commit", ["../../../../escape", "/tmp/escape", "A" * 40, "a" * 39, "", "a" * 40 + "/.."])
def test_commit_ids_are_checked_before_they_name_a_folder(hostile, tmp_path, commit):
    data, index = artifact(tmp_path)
    serve_repo(hostile, data, index, index_headers={"X-Repo-Commit": commit})
    before = files_under(tmp_path)
    with pytest.raises(cf.HubError, match="no valid commit") as e:
        cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=tmp_path / "cache")
    assert e.value.code == C.E_HUB_ERROR
    created = files_under(tmp_path) - before
    assert all(p.resolve().is_relative_to((tmp_path / "cache").resolve()) for p in created)
    assert not any(p.is_file() for p in created) and not Path("/tmp/escape").exists()


def test_a_404_naming_a_commit_creates_nothing(hostile, tmp_path):
    hostile.routes[f"/me/repo/resolve/main/{C.HUB_INDEX_FILE}"] = (
        404, {"X-Repo-Commit": "../../../../x", "X-Error-Code": "EntryNotFound"}, b"")
    before = files_under(tmp_path)
    with pytest.raises(cf.HubNoIndex):
        cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=tmp_path / "cache")
    assert not any(p.is_file() for p in files_under(tmp_path) - before)


def test_error_messages_are_one_printable_line_and_bodies_are_not_read(hostile, tmp_path):
    """A header carrying control characters is quoted as printable text; a 500 declaring a huge
    body is answered without reading it."""
    hostile.routes[f"/me/repo/resolve/main/{C.HUB_INDEX_FILE}"] = (
        500, {"X-Error-Message": "boom\x1b[31m\tred" + "x" * 1000, "Content-Length": str(10 ** 12)}, b"partial")
    with pytest.raises(cf.HubError) as e:
        cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "HTTP 500" in msg and "\x1b" not in msg and "\n" not in msg and len(msg) < 400
    for status, code, err in ((401, "", cf.HubAuthError), (404, "RepoNotFound", cf.HubRepoNotFound),
                              (404, "RevisionNotFound", cf.HubRevisionNotFound)):
        hostile.routes[f"/me/repo/resolve/main/{C.HUB_INDEX_FILE}"] = (status, {"X-Error-Code": code}, b"")
        with pytest.raises(err):
            cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=tmp_path / "cache")


def test_hostile_indexes_are_refused(hostile, tmp_path):
    data, index = artifact(tmp_path)
    good = json.loads(index)
    entry = good["artifacts"][0]
    bad_paths = ["../x", "..\\x", "C:x", "\\\\host\\share", "a\0b", "./" + C.HUB_INDEX_FILE, C.HUB_INDEX_FILE,
                 "/etc/passwd", "a//b", "a\x9b2Jb", "a\u2028b", "evil\u202egnp.safetensors", "a\u200bb"]
    bodies = [json.dumps({**good, "artifacts": [{**entry, "path": p}]}).encode() for p in bad_paths]
    text = json.dumps(good)
    bodies += [text.replace('"format": "compeft"', '"format": "compeft", "format": "compeft"').encode(),
               text.replace('"size": ', '"size": 1, "size": ').encode(),
               json.dumps({**good, "artifacts": [{**entry, "note": float("nan")}]}).encode(),
               json.dumps({**good, "artifacts": [{**entry, "note": "\ud800"}]}).encode()]
    bodies += [json.dumps({**good, "artifacts": [{**entry, "size": True}]}).encode(),
               b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe{}", b"{" + b" " * (17 << 20) + b"}"]
    for body in bodies:
        serve_repo(hostile, data, body)
        with pytest.raises(cf.HubNoIndex):
            cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any(
        p.is_file() and p.name != "refs" for p in files_under(tmp_path / "cache") if "snapshots" in p.parts)


def test_local_file_system_errors_are_not_network_errors(hostile, tmp_path):
    data, index = artifact(tmp_path)
    serve_repo(hostile, data, index)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(cf.IOFailure) as e:
        cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=blocker)
    assert e.value.code == C.E_IO


def test_offline_pull_reads_only_the_verified_cache(hostile, tmp_path, monkeypatch):
    data, index = artifact(tmp_path)
    serve_repo(hostile, data, index)
    cache = tmp_path / "cache"
    first = cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=cache)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hostile.seen.clear()
    again = cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=cache)
    assert hostile.seen == [] and again.paths == first.paths and again.commit == COMMIT
    # a cached file changed on disk is not used offline
    os.chmod(first.paths[0], 0o644)
    first.paths[0].write_bytes(b"changed")
    with pytest.raises(cf.HubUnreachable, match="not in the cache"):
        cf.pull("me/repo", endpoint=hostile.endpoint, cache_dir=cache)
    with pytest.raises(cf.HubUnreachable):
        cf.pull("me/repo@other", endpoint=hostile.endpoint, cache_dir=cache)
