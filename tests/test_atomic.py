"""Atomic writes: file mode from the umask, failures as one-line errors that keep the old file, early checks."""

from __future__ import annotations

import errno
import os
import stat
import tempfile

import pytest
import torch

from afine.atomic import atomic_folder, atomic_write, check_writable, write_json, write_text
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


@pytest.mark.parametrize("below", [("x.txt",), ("sub", "x.txt")])
def test_parent_that_is_a_file(tmp_path, below):
    """The reason is the file in the way, not the 'file exists' that creating the folder would report."""
    (tmp_path / "file").write_text("keep")
    target = tmp_path.joinpath("file", *below)
    for action in (lambda: write_text(target, "x"), lambda: check_writable(target)):
        with pytest.raises(AfineError) as info:
            action()
        assert str(info.value) == f"{target}: cannot write, {tmp_path / 'file'} is not a folder"
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


def test_an_output_that_is_an_input_is_refused_by_identity(tmp_path):
    """Another spelling, a symbolic link or a hard link to an input is that input; a copy of it is not."""
    (tmp_path / "data").mkdir()
    source = tmp_path / "data" / "weights.pth"
    source.write_bytes(b"keep")
    (tmp_path / "link.pth").symlink_to(source)
    os.link(source, tmp_path / "hard.pth")
    (tmp_path / "copy.pth").write_bytes(b"keep")
    for output in (source, tmp_path / "data" / ".." / "data" / "weights.pth", tmp_path / "link.pth",
                   tmp_path / "hard.pth"):
        with pytest.raises(AfineError) as info:
            check_writable(output, [tmp_path / "other.pth", source])
        spelling = "" if output == source else f" (as {source})"
        assert str(info.value) == f"{output}: cannot write, this command reads that file{spelling}; " \
                                  f"choose another output"
    for output in (tmp_path / "copy.pth", tmp_path / "new.pth"):
        check_writable(output, [source, tmp_path / "missing.pth"])
    assert source.read_bytes() == b"keep"


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_folder_appears_complete_or_not_at_all(tmp_path, umask, existing):
    umask(0o027)
    out = tmp_path / "a" / "Out"
    if existing:
        out.mkdir(parents=True)  # an empty folder is replaced
    with atomic_folder(out) as folder:
        assert not (out / "x.txt").exists() and folder.parent == out.parent
        write_text(folder / "sub" / "x.txt", "x")
    assert (out / "sub" / "x.txt").read_text() == "x" and mode(out) == 0o750
    assert [p.name for p in out.parent.iterdir()] == ["Out"]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_atomic_folder_failure_leaves_the_target_as_it_was(tmp_path, failure, existing):
    out = tmp_path / "Out"
    if existing:
        out.mkdir()
    with pytest.raises(AfineError if isinstance(failure, OSError) else KeyboardInterrupt):
        with atomic_folder(out) as folder:
            write_text(folder / "x.txt", "x")
            raise failure
    assert sorted(p.name for p in tmp_path.iterdir()) == (["Out"] if existing else [])
    assert not existing or list(out.iterdir()) == []
