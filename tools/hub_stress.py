#!/usr/bin/env python3
"""Stress ``compeft hub serve`` on 127.0.0.1, started here as a child process and stopped by its id.

    python tools/hub_stress.py load   [--clients 200] [--seconds 60]      # requests/s, p50/p99, errors
    python tools/hub_stress.py memory [--clients 20] [--size-mib 256]    # server RSS serving one large file
    python tools/hub_stress.py crash  [--trials 50]                      # SIGKILL during commits
    python tools/hub_stress.py commit [--files 2000]                     # a large commit and one beside it

``load``: clients on keep-alive connections, spread over worker processes, each looping over a
repository-info request, a 64 KiB download and a Range request; any status other than 200/206 or
any connection error counts as an error. ``memory``: one large file downloaded by every client at
once, the server's resident memory sampled from /proc every 20 ms; the figure is the peak over the
idle baseline in units of the server's read buffer (``server.CHUNK``). ``crash``: a client commits
files of 64 KiB to 12 MiB through the real ``huggingface_hub`` client while the server is killed
with SIGKILL at a random moment; after each restart every acknowledged commit must be there with
its bytes, and no temporary file may remain. Every mode writes ``<out>/<mode>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKEN = "stress-token"
REPO = "stress/adapter"


class Server:
    """``compeft hub serve`` as a child process on 127.0.0.1 and a free port."""

    def __init__(self, root: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "compeft_format.cli", "hub", "serve", "--root", str(root), "--host", "127.0.0.1",
               "--port", "0", "--token", TOKEN, "--lfs", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if " on http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.url = line.split(" on ", 1)[1].split()[0]
        self.port = int(self.url.rsplit(":", 1)[1])

    def rss(self) -> int:
        """Resident memory of the server process in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def api(server: Server):
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    from huggingface_hub import HfApi

    return HfApi(endpoint=server.url, token=TOKEN)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


# --- load -------------------------------------------------------------------------------------
def _client_batch(port: int, threads: int, seconds: float, paths: list[str]) -> tuple[list[float], int, dict[str, int]]:
    latencies: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def one() -> None:
        nonlocal errors
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        bad = 0
        seen: dict[str, int] = {}
        i = 0
        while time.monotonic() < deadline:
            path, headers = paths[i % len(paths)], {}
            if i % len(paths) == 2:
                headers["Range"] = "bytes=1000-4999"
            i += 1
            t0 = time.perf_counter()
            try:
                conn.request("GET", path, headers=headers)
                r = conn.getresponse()
                r.read()
                ok = r.status in (200, 206)
                key = str(r.status)
            except (OSError, http.client.HTTPException) as e:
                ok, key = False, type(e).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            mine.append(time.perf_counter() - t0)
            seen[key] = seen.get(key, 0) + 1
            bad += not ok
        conn.close()
        with lock:
            latencies.extend(mine)
            errors += bad
            for k, v in seen.items():
                kinds[k] = kinds.get(k, 0) + v

    ts = [threading.Thread(target=one) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return latencies, errors, kinds


def cmd_load(a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp) / "hub", "--max-workers", str(a.clients + 16))
        try:
            hf = api(server)
            hf.create_repo(REPO)
            payload = os.urandom(64 << 10)
            hf.upload_file(path_or_fileobj=payload, path_in_repo="adapter.bin", repo_id=REPO)
            paths = [f"/api/models/{REPO}", f"/{REPO}/resolve/main/adapter.bin", f"/{REPO}/resolve/main/adapter.bin"]
            procs = max(1, min(a.processes, a.clients))
            per = [a.clients // procs + (i < a.clients % procs) for i in range(procs)]
            rss0 = server.rss()
            peak = [rss0]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.05):
                    peak[0] = max(peak[0], server.rss())
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            with ProcessPoolExecutor(procs) as ex:
                results = list(ex.map(_client_batch, [server.port] * procs, per, [a.seconds] * procs, [paths] * procs))
            wall = time.perf_counter() - t0
            stop.set()
        finally:
            server.stop()
    lat = [x for r in results for x in r[0]]
    kinds: dict[str, int] = {}
    for r in results:
        for k, v in r[2].items():
            kinds[k] = kinds.get(k, 0) + v
    return {"clients": a.clients, "processes": procs, "seconds": round(wall, 1), "requests": len(lat),
            "requests_per_s": round(len(lat) / wall, 1), "p50_ms": round(1000 * percentile(lat, 0.5), 2),
            "p99_ms": round(1000 * percentile(lat, 0.99), 2), "max_ms": round(1000 * max(lat), 1),
            "errors": sum(r[1] for r in results), "statuses": kinds,
            "server_rss_mib": {"idle": round(rss0 / 2**20, 1), "peak": round(peak[0] / 2**20, 1)}}


# --- memory -----------------------------------------------------------------------------------
def cmd_memory(a: argparse.Namespace) -> dict:
    from compeft_format.hub.server import CHUNK

    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.bin"
        with open(big, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(a.size_mib):
                f.write(block)
        digest = hashlib.sha256(big.read_bytes()).hexdigest()
        server = Server(Path(tmp) / "hub", "--max-workers", str(a.clients + 8))
        try:
            hf = api(server)
            hf.create_repo(REPO)
            hf.upload_file(path_or_fileobj=str(big), path_in_repo="big.bin", repo_id=REPO)
            big.unlink()
            time.sleep(0.5)
            rss0 = server.rss()
            peak = [rss0]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.02):
                    peak[0] = max(peak[0], server.rss())
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            digests: list[str] = []
            lock = threading.Lock()

            def download(i: int) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
                headers = {} if i % 2 == 0 else {"Range": f"bytes={1 << 20}-"}
                conn.request("GET", f"/{REPO}/resolve/main/big.bin", headers=headers)
                r = conn.getresponse()
                h = hashlib.sha256()
                while chunk := r.read(1 << 16):
                    h.update(chunk)
                    time.sleep(0.0005)  # slow readers: the server must not buffer ahead of them
                conn.close()
                with lock:
                    digests.append(h.hexdigest() if i % 2 == 0 else f"range:{r.status}")
            t0 = time.perf_counter()
            ts = [threading.Thread(target=download, args=(i,)) for i in range(a.clients)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            wall = time.perf_counter() - t0
            stop.set()
        finally:
            server.stop()
    full = [d for d in digests if not d.startswith("range:")]
    grown = peak[0] - rss0
    return {"clients": a.clients, "file_mib": a.size_mib, "seconds": round(wall, 1),
            "full_downloads_correct": sum(d == digest for d in full), "full_downloads": len(full),
            "range_statuses": sorted({d for d in digests if d.startswith("range:")}),
            "server_rss_mib": {"idle": round(rss0 / 2**20, 1), "peak": round(peak[0] / 2**20, 1)},
            "buffer_bytes": CHUNK, "growth_in_buffers": round(grown / CHUNK, 1),
            "growth_in_buffers_per_client": round(grown / CHUNK / a.clients, 2)}


# --- crash ------------------------------------------------------------------------------------
def _leftovers(root: Path) -> list[str]:
    """Temporary files in the server's folder: the store names them with a leading dot and a
    ``.part`` or ``.tmp`` suffix."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if p.is_file()
                  and (p.name.endswith(".part") or p.name.endswith(".tmp")))


def cmd_crash(a: argparse.Namespace) -> dict:
    rng = random.Random(a.seed)
    acknowledged: dict[str, str] = {}  # path in repo -> sha256 of what the server acknowledged
    lost: list[str] = []
    corrupt: list[str] = []
    leftovers_after_restart = 0
    leftovers_seen_after_kill = 0
    kills_mid_request = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "hub"
        for trial in range(a.trials):
            server = Server(root, "--max-workers", "16")
            leftovers_after_restart += len(_leftovers(root))
            hf = api(server)
            if trial == 0:
                hf.create_repo(REPO)
            # everything acknowledged so far is there, byte for byte
            for path, sha in acknowledged.items():
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                conn.request("GET", f"/{REPO}/resolve/main/{path}")
                r = conn.getresponse()
                body = r.read()
                conn.close()
                if r.status != 200:
                    lost.append(path)
                elif hashlib.sha256(body).hexdigest() != sha:
                    corrupt.append(path)
            stop = threading.Event()
            in_flight = threading.Event()

            def commit_loop(trial: int = trial, hf=hf, stop=stop, in_flight=in_flight) -> None:
                i = 0
                while not stop.is_set():
                    size = rng.choice([64 << 10, 1 << 20, 12 << 20])
                    data = os.urandom(size)
                    path = f"t{trial:03d}/f{i:03d}.bin"
                    in_flight.set()
                    try:
                        hf.upload_file(path_or_fileobj=data, path_in_repo=path, repo_id=REPO)
                    except Exception:  # noqa: BLE001 - the server was killed under this request
                        return
                    finally:
                        in_flight.clear()
                    if stop.is_set():  # answered after the kill: only by another server on a reused port
                        return
                    acknowledged[path] = hashlib.sha256(data).hexdigest()
                    i += 1
            client = threading.Thread(target=commit_loop, daemon=True)
            client.start()
            time.sleep(rng.uniform(0.05, a.max_delay))
            kills_mid_request += in_flight.is_set()
            stop.set()
            server.kill()
            client.join(0.5)  # a client still retrying against the dead port gives up on its own
            leftovers_seen_after_kill += len(_leftovers(root))
        server = Server(root)
        leftovers_after_restart += len(_leftovers(root))
        hf = api(server)
        files = set(hf.list_repo_files(REPO))
        server.stop()
    missing_at_end = sorted(set(acknowledged) - files)
    return {"trials": a.trials, "acknowledged_commits": len(acknowledged),
            "kills_during_a_request": kills_mid_request, "lost_acknowledged": len(lost) + len(missing_at_end),
            "corrupt": len(corrupt), "temp_files_seen_right_after_a_kill": leftovers_seen_after_kill,
            "temp_files_after_restart": leftovers_after_restart}


# --- commit ------------------------------------------------------------------------------------
def cmd_commit(a: argparse.Namespace) -> dict:
    """One commit of ``--files`` small inline files through the real client, and, while it is being
    stored, a one-file commit and a repository-info request to the same repository: how long the
    large commit holds the repository."""
    from huggingface_hub import CommitOperationAdd

    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp) / "hub")
        try:
            hf = api(server)
            hf.create_repo(REPO)
            ops = [CommitOperationAdd(f"d{i // 100:03d}/f{i:05d}.txt", f"file {i}\n".encode()) for i in range(a.files)]
            other: dict[str, float] = {}

            def meanwhile() -> None:
                time.sleep(a.delay)
                t = time.perf_counter()
                hf.model_info(REPO)
                other["info_s"] = time.perf_counter() - t
                t = time.perf_counter()
                hf.create_commit(REPO, [CommitOperationAdd("other.txt", b"other")], commit_message="other")
                other["small_commit_s"] = time.perf_counter() - t
            th = threading.Thread(target=meanwhile)
            t0 = time.perf_counter()
            th.start()
            hf.create_commit(REPO, operations=ops, commit_message=f"{a.files} files")
            big = time.perf_counter() - t0
            th.join()
            files = len(hf.list_repo_files(REPO))
        finally:
            server.stop()
    return {"files": a.files, "commit_s": round(big, 2), "started_meanwhile_after_s": a.delay,
            "repo_info_meanwhile_s": round(other["info_s"], 3),
            "small_commit_meanwhile_s": round(other["small_commit_s"], 3), "files_in_repo": files}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/hub-stress")
    sub = p.add_subparsers(dest="mode", required=True)
    lo = sub.add_parser("load")
    lo.add_argument("--clients", type=int, default=200)
    lo.add_argument("--seconds", type=float, default=60.0)
    lo.add_argument("--processes", type=int, default=4, help="client processes the clients are spread over")
    me = sub.add_parser("memory")
    me.add_argument("--clients", type=int, default=20)
    me.add_argument("--size-mib", type=int, default=256)
    cr = sub.add_parser("crash")
    cr.add_argument("--trials", type=int, default=50)
    cr.add_argument("--max-delay", type=float, default=2.0, help="latest kill, seconds after the commits start")
    cr.add_argument("--seed", type=int, default=0)
    co = sub.add_parser("commit")
    co.add_argument("--files", type=int, default=2000)
    co.add_argument("--delay", type=float, default=0.3, help="seconds after the large commit starts")
    a = p.parse_args()
    result = {"load": cmd_load, "memory": cmd_memory, "crash": cmd_crash, "commit": cmd_commit}[a.mode](a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.mode}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
