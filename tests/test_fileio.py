"""Writing a file whole or not at all: the helper the writer, the PEFT folder writer, pull and the
Hub server share."""

from __future__ import annotations

import os
import stat

import pytest

import compeft_format as cf
from compeft_format.fileio import atomic_write, atomic_write_bytes, file_sha256


def test_replaces_whole_files_with_the_mode_asked_for(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"one")
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_bytes() == b"one" and stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    atomic_write_bytes(path, b"two", mode=0o600)
    assert path.read_bytes() == b"two" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    assert file_sha256(path) == "3fc4ccfe745870e2c0d99f71f30ff0656c8dedd41cc1d7d3d376b0dbe685e2f3"


@pytest.mark.parametrize("error, caught", [
    (OSError(28, "No space left on device"), cf.IOFailure),
    (cf.HubUnreachable("the Hub went away"), cf.HubUnreachable),  # an OSError, but already typed
    (KeyboardInterrupt(), KeyboardInterrupt),
])
def test_a_failed_write_leaves_nothing_and_keeps_typed_errors(tmp_path, error, caught):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise error

    with pytest.raises(caught):
        atomic_write(path, write)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_missing_folder_and_missing_file(tmp_path):
    with pytest.raises(cf.FileNotFound) as e:
        atomic_write_bytes(tmp_path / "no" / "f.bin", b"x")
    assert e.value.path == str(tmp_path / "no")
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "gone")


def test_atomic_folder_publishes_whole_folders_and_leaves_nothing_on_failure(tmp_path):
    from compeft_format.errors import InvalidArgument
    from compeft_format.fileio import atomic_folder

    dest = tmp_path / "model"
    atomic_folder(dest, lambda tmp: (tmp / "a.txt").write_text("one"))
    assert (dest / "a.txt").read_text() == "one" and oct(dest.stat().st_mode & 0o777) != oct(0o700)
    atomic_folder(dest, lambda tmp: (tmp / "b.txt").write_text("two"))  # replaces: a.txt is gone
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    with pytest.raises(InvalidArgument, match="not an empty folder"):
        atomic_folder(dest, lambda tmp: (tmp / "c.txt").write_text("three"), replace=False)

    def fails(tmp):
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_folder(dest, fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    (tmp_path / "empty").mkdir()
    atomic_folder(tmp_path / "empty", lambda tmp: (tmp / "x").write_text("x"), replace=False)
    assert (tmp_path / "empty" / "x").is_file()


def test_atomic_folder_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    from compeft_format import fileio
    from compeft_format.errors import IOFailure

    dest = tmp_path / "model"
    fileio.atomic_folder(dest, lambda tmp: (tmp / "old.txt").write_text("old"))
    real = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder's rename into place
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "rename", rename)
    with pytest.raises(IOFailure):
        fileio.atomic_folder(dest, lambda tmp: (tmp / "new.txt").write_text("new"))
    monkeypatch.undo()
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
