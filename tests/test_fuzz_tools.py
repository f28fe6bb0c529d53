"""Short runs of the robustness tools (tools/fuzz.py, tools/mutate.py, tools/crash_save.py), the
checks that make them report a broken reader, and the removal of temporary files that killed
writers leave."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import compeft_format as cf
from compeft_format.fileio import atomic_write, atomic_write_bytes
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import crash_save  # noqa: E402
import fuzz  # noqa: E402
import mutate  # noqa: E402

HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
CODES = set(cf.errors.CODES)


# ---------------------------------------------------------------------------------------------
# fuzz.py
# ---------------------------------------------------------------------------------------------
def run_fuzz(tmp_path: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz.py"), "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    target = args[args.index("--target") + 1]
    return json.loads((tmp_path / f"summary-{target}.json").read_text())


def check_summary(s: dict, runs: int) -> None:
    assert s["complete"] and s["inputs"] == runs
    assert s["accepted"] + sum(s["rejected"].values()) == runs
    assert s["accepted"] > 0 and set(s["rejected"]) <= CODES and len(s["rejected"]) >= 4
    assert s["findings"] == 0 and not s["finding_kinds"]
    assert {k: v for k, v in s["disagreements"].items() if not k.startswith("error codes")} == {}
    assert s["validated_with_cli"] == runs // 50
    assert s["exec_per_s"] > 0 and 0 < s["slowest_input_s"] < 60 and s["peak_rss_mib"] > 50


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is not installed")
@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_coverage_guided_fuzzing_finds_nothing(tmp_path, target):
    s = run_fuzz(tmp_path, "--target", target, "--runs", "400", "--seed", "7")
    check_summary(s, 400)
    assert s["engine"] == "atheris" and s["seeds"] >= 40 and any((tmp_path / f"corpus-{target}").iterdir())


def test_random_engine_runs_the_same_checks(tmp_path):
    s = run_fuzz(tmp_path, "--target", "manifest", "--engine", "random", "--runs", "250", "--seed", "3")
    check_summary(s, 250)
    assert s["engine"] == "random"


@pytest.fixture(scope="module")
def seeds():
    with mutate.scratch_dir() as tmp:
        return fuzz.seed_inputs(Path(tmp))


def test_manifest_mutations_keep_digests_valid(seeds):
    """Changed files pass the manifest digest check, and changed streams their stream digest, so
    that the fuzzer reaches the manifest rules and the decoders (from seeds whose digests hold:
    the vectors of digest defects fail those checks before any change)."""
    codes = []
    with mutate.scratch_dir() as tmp:
        path = Path(tmp) / "m.safetensors"

        def digests_hold(data: bytes) -> bool:
            path.write_bytes(data)
            try:
                cf.verify(path)
            except cf.CompeftError as e:
                return e.code not in ("MANIFEST_DIGEST_MISMATCH", "STREAM_DIGEST_MISMATCH")
            return True

        m = fuzz.Mutator([s for s in seeds if digests_hold(s)])
        rng = random.Random(5)
        for _ in range(300):
            data = m.manifest_input(rng.choice(m.parsed), rng)
            path.write_bytes(data)
            try:
                cf.verify(path)
                codes.append("ok")
            except cf.CompeftError as e:
                codes.append(e.code)
    assert "MANIFEST_DIGEST_MISMATCH" not in codes and "STREAM_DIGEST_MISMATCH" not in codes
    assert codes.count("ok") > 10 and "STREAM_CORRUPT" in codes and "MANIFEST_INVALID" in codes


def test_split_and_join_give_back_the_file(seeds):
    joined = 0
    for data in seeds:
        parts = fuzz.split(data)
        if parts is not None:
            again = fuzz.split(fuzz.join(parts))
            assert again is not None and again.manifest == parts.manifest and again.data == parts.data
            assert again.encoding == parts.encoding
            joined += 1
    assert joined >= 30


def test_harness_reports_exceptions_and_disagreements(tmp_path, monkeypatch):
    data = (ROOT / "spec" / "vectors" / "v1_ternary_golomb.cpeft.safetensors").read_bytes()
    h = fuzz.Harness(tmp_path, "raw", validate_every=1)
    try:
        h(data)
        assert h.stats.findings == 0 and h.stats.accepted == 1 and h.stats.validated == 1
        real = cf.CompeftFile.state_dict

        def broken(self, **kw):
            if os.environ.get("COMPEFT_NATIVE") == "0":
                raise IndexError("a decoder bug")
            return real(self, **kw)

        monkeypatch.setattr(cf.CompeftFile, "state_dict", broken)
        h(data)
        assert h.stats.findings == 1 and h.stats.inputs == 2
        disagreement, exception = sorted(h.stats.finding_kinds)
        assert exception.startswith("exception IndexError in load[torch] at test_fuzz_tools.py:")
        assert disagreement == "disagreement: native and torch decoders"
        assert h.stats.disagreements["native and torch decoders"] == 1
        saved = sorted((tmp_path / "findings").glob("*.bin"))
        assert len(saved) == 2 and all(p.read_bytes() == data for p in saved)
        notes = sorted(p.read_text() for p in (tmp_path / "findings").glob("*.txt"))
        assert notes[0].startswith("disagreement") and "IndexError: a decoder bug" in notes[1]

        def shifted(self, **kw):
            out = real(self, **kw)
            if os.environ.get("COMPEFT_NATIVE") == "0":
                out = {k: v + 1 if v.numel() else v for k, v in out.items()}
            return out

        monkeypatch.setattr(cf.CompeftFile, "state_dict", shifted)
        h(data)
        assert h.stats.disagreements["native and torch tensors"] == 1 and h.stats.findings == 1
        monkeypatch.setattr(cf.CompeftFile, "state_dict", real)
        h(b"short")
        assert h.stats.rejected == {"TRUNCATED": 1} and h.stats.findings == 1
    finally:
        h.close()


# ---------------------------------------------------------------------------------------------
# mutate.py
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_bytes():
    with mutate.scratch_dir() as tmp:
        return mutate.small_file(Path(tmp) / "s.cpeft.safetensors").read_bytes()


def test_every_byte_change_is_refused_or_harmless(small_bytes):
    stride = 7
    r = mutate.run(small_bytes, stride=stride)
    per_kind = math.ceil(len(small_bytes) / stride)
    assert 1500 < len(small_bytes) < 4096
    assert r["mutants"] == 3 * per_kind and all(k["mutants"] == per_kind for k in r["by_kind"].values())
    assert r["identical"] + sum(r["rejected"].values()) == r["mutants"]
    assert r["by_kind"]["truncate"] == {"mutants": per_kind, "identical": 0, "rejected": {"TRUNCATED": per_kind}}
    assert set(r["rejected"]) <= CODES and r["rejected"]["STREAM_DIGEST_MISMATCH"] > 0
    assert r["failures"] == 0 and r["failure_examples"] == []


def test_mutate_reports_a_reader_that_returns_other_tensors(small_bytes, monkeypatch):
    real = cf.load
    calls = []

    with mutate.scratch_dir() as tmp:
        p = Path(tmp) / "o.safetensors"
        p.write_bytes(small_bytes)
        original = real(p)

    def lenient(path, **kw):  # accepts every mutant and returns the original's tensors, changed
        calls.append(path)
        if len(calls) == 1:
            return real(path, **kw)
        return {k: v + 1 if v.numel() else v for k, v in original.items()}

    monkeypatch.setattr(cf, "load", lenient)
    monkeypatch.setattr(cf, "verify", lambda path: None)
    r = mutate.run(small_bytes, stride=97)
    assert r["failures"] == r["mutants"] > 0 and r["identical"] == 0
    assert r["failure_examples"][0]["why"].startswith("decoded tensors differ")


def test_mutate_reports_exceptions_that_are_not_typed(small_bytes, monkeypatch):
    def crashing(path):
        raise KeyError("tensors")

    monkeypatch.setattr(cf, "verify", crashing)
    with pytest.raises(KeyError):  # the original file must verify before mutants are read
        mutate.run(small_bytes, stride=97)
    real_verify = cf.CompeftFile.verify
    seen = []

    def crash_after_first(self):
        seen.append(1)
        if len(seen) > 1:
            raise KeyError("tensors")
        return real_verify(self)

    monkeypatch.undo()
    monkeypatch.setattr(cf.CompeftFile, "verify", crash_after_first)
    r = mutate.run(small_bytes, stride=97)
    opened = r["mutants"] - sum(v for k, v in r["rejected"].items() if k in ("TRUNCATED", "NOT_SAFETENSORS"))
    assert 0 < r["failures"] <= opened
    assert all(ex["why"].startswith("verify: KeyError") for ex in r["failure_examples"])


def test_mutants_are_the_ones_asked_for():
    data = bytes(range(10))
    got = list(mutate.mutants(data, stride=3))
    assert [(k, i) for k, i, _ in got] == [("xor_ff", i) for i in (0, 3, 6, 9)] + [
        ("xor_01", i) for i in (0, 3, 6, 9)] + [("truncate", n) for n in (0, 3, 6, 9)]
    assert got[1][2] == bytes([0, 1, 2, 3 ^ 0xFF, 4, 5, 6, 7, 8, 9]) and got[-1][2] == data[:9]
    assert mutate.bits_equal(torch.tensor([0.0]), torch.tensor([0.0]))
    assert not mutate.bits_equal(torch.tensor([0.0]), torch.tensor([-0.0]))


# ---------------------------------------------------------------------------------------------
# crash_save.py and the temporary files of killed writers
# ---------------------------------------------------------------------------------------------
def test_killed_writers_leave_a_complete_file_or_none(tmp_path):
    r = crash_save.run(3, mb=4, seed=3, folder=tmp_path)
    assert r["trials"] == len(r["rows"]) == sum(r["states"].values()) == 3
    assert set(r["states"]) <= {"absent", "complete"} and r["truncated_or_corrupt"] == 0
    assert r["temp_files_left_after_next_save"] == 0 and r["failures"] == 0
    assert r["file_bytes"] > 4 << 20
    assert list(tmp_path.iterdir()) == []


def _temp_folder_of_a_write(dest: Path) -> str:
    paths = []
    atomic_write(dest, lambda tmp: (paths.append(Path(tmp)), Path(tmp).write_bytes(b"x")))
    assert paths[0].name == f".{dest.name}.tmp" and paths[0].parent.parent == dest.parent
    return paths[0].parent.name


def _exited(reap: bool) -> subprocess.Popen:
    """A process that has exited: reaped, or left a zombie (until the caller waits for it)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    if reap:
        p.wait()
        return p
    for _ in range(1000):
        if Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return p
        time.sleep(0.01)
    raise AssertionError("the child did not exit")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_next_write_removes_temp_files_of_dead_writers_only(tmp_path):
    dest = tmp_path / "f.bin"
    name = _temp_folder_of_a_write(dest)
    m = re.fullmatch(r"\.f\.bin\.([0-9a-f]{8})-(\d+)\.[a-z0-9_]{8}\.tmp", name)
    assert m is not None and int(m[2]) == os.getpid()
    host = m[1]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    zombie_proc = _exited(reap=False)
    try:
        dead, zombie = _exited(reap=True).pid, zombie_proc.pid
        # a killed writer's folder, with what safetensors left in it, and a file as earlier versions named it
        stale = [f".f.bin.{host}-{dead}.abcd1234.tmp", f".f.bin.{host}-{zombie}.zzzz_999.tmp"]
        (tmp_path / stale[0]).mkdir()
        (tmp_path / stale[0] / ".tmpXy12Ab").write_bytes(b"partial")
        kept = [f".f.bin.{host}-{live.pid}.abcd1234.tmp",    # a writer still running
                f".f.bin.{host}-{os.getpid()}.q1w2e3r4.tmp",  # this process
                f".f.bin.{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead}.abcd1234.tmp",  # another host
                f".g.bin.{host}-{dead}.abcd1234.tmp",        # another destination
                ".f.bin.abcd1234.tmp",                       # no pid in the name
                f".f.bin.{host}-{dead}.abcd1234.tmp.keep"]   # not a temporary name
        for n in stale[1:] + kept[1:]:
            (tmp_path / n).write_bytes(b"partial")
        (tmp_path / kept[0]).mkdir()
        (tmp_path / kept[0] / "f.bin").write_bytes(b"half")
        atomic_write_bytes(dest, b"whole")
        assert dest.read_bytes() == b"whole"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["f.bin"])
        assert (tmp_path / kept[0] / "f.bin").read_bytes() == b"half"
    finally:
        live.kill()
        live.wait()
        zombie_proc.wait()
