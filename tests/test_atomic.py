"""Atomic writes: file mode from the umask, failures as one-line errors that keep the old file, early checks."""

from __future__ import annotations

import errno
import os
import stat
import tempfile

import pytest
import torch

from afine.atomic import atomic_write, check_writable, write_json, write_text
from afine.checkpoint import atomic_save
from afine.errors import AfineError


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_new_files_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    write_text(tmp_path / "a.txt", "x\n")
    atomic_save({"w": torch.zeros(2)}, tmp_path / "b.pth")
    assert mode(tmp_path / "a.txt") == expected and mode(tmp_path / "b.pth") == expected


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def disk_full(f):
    f.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_keeps_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"old": 1})
    with pytest.raises(AfineError) as info:
        atomic_write(path, disk_full)
    assert str(info.value) == f"{path}: cannot write (no space left on device)"
    assert path.read_text() == '{\n  "old": 1\n}\n'
    assert leftovers(tmp_path) == []


def test_target_that_is_a_folder(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(AfineError, match=r"out: cannot write, it is a folder$"):
        write_text(tmp_path / "out", "x")
    assert leftovers(tmp_path) == []


def test_parent_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("keep")
    with pytest.raises(AfineError) as info:
        write_text(tmp_path / "file" / "x.txt", "x")
    assert str(info.value).startswith(f"{tmp_path / 'file' / 'x.txt'}: cannot write (")
    assert (tmp_path / "file").read_text() == "keep"


def test_no_permission_is_a_one_line_error(tmp_path, monkeypatch):
    """A read-only folder (simulated: the tests may run as root, who may write anywhere)."""
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    for action in (lambda: write_text(tmp_path / "a.txt", "x"), lambda: check_writable(tmp_path / "a.txt")):
        with pytest.raises(AfineError) as info:
            action()
        assert str(info.value) == f"{tmp_path / 'a.txt'}: cannot write (permission denied)"


def test_other_errors_in_write_pass_through_and_clean_up(tmp_path):
    def bug(f):
        raise KeyError("not an I/O error")

    with pytest.raises(KeyError):
        atomic_write(tmp_path / "x", bug)
    assert list(tmp_path.iterdir()) == []


def test_check_writable(tmp_path):
    check_writable(tmp_path / "new.json")
    check_writable(tmp_path / "a" / "b" / "new.json")  # missing folders are fine: the write creates them
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # and the check creates nothing
    (tmp_path / "dir").mkdir()
    with pytest.raises(AfineError, match="it is a folder"):
        check_writable(tmp_path / "dir")
    (tmp_path / "file").write_text("")
    with pytest.raises(AfineError, match=r"file is not a folder"):
        check_writable(tmp_path / "file" / "sub" / "x.json")
