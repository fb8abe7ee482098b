"""Atomic writes: file mode from the umask, failures as one-line errors that keep the old file, early checks."""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from afine.atomic import (
    CSV,
    JSON,
    PICTURES,
    atomic_folder,
    atomic_write,
    check_writable,
    destination,
    write_json,
    write_text,
)
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


def test_no_permission_is_a_one_line_error_naming_the_folder(tmp_path, monkeypatch):
    """A read-only folder (simulated: the tests may run as root, who may write anywhere). The message names the
    folder where the new file could not be made: for a link, the target's folder, not the link's."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = tempfile.mkstemp

    def refuse(*args, **kwargs):
        if Path(kwargs["dir"]) == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    (locked / "scores.csv").write_text("old")
    (tmp_path / "link.csv").symlink_to(locked / "scores.csv")
    for path in (locked / "a.txt", locked / "scores.csv", tmp_path / "link.csv"):
        for action in (lambda p: write_text(p, "x"), check_writable):
            with pytest.raises(AfineError) as info:
                action(path)
            assert str(info.value) == f"{path}: cannot write, cannot create a file in {locked} (permission denied)"
    assert (locked / "scores.csv").read_text() == "old" and (tmp_path / "link.csv").is_symlink()


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


# ---------------------------------------------------------------------------------------------- what a name leads to


@pytest.fixture
def deadline():
    """A write that blocks on a FIFO (no reader) fails the test after 20 s instead of hanging it: SIGALRM interrupts
    the blocking call with an exception."""
    def expire(signum, frame):
        raise TimeoutError("blocked for 20 s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 20)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@contextmanager
def fifo_reader(fifo: Path):
    """The reading end of a FIFO, opened at once without waiting for a writer; yields a function returning what was
    written, to call once the writer closed it (the tests write less than the pipe's buffer)."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)

    def read() -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:  # a writer still holds it open: everything written so far is in
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        yield read
    finally:
        os.close(fd)


@pytest.fixture
def made_in(monkeypatch):
    """The folders where temp or probe files were made (tempfile.mkstemp's dir), in order."""
    folders = []
    real = tempfile.mkstemp

    def spy(*args, **kwargs):
        folders.append(Path(kwargs["dir"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    return folders


def test_a_fifo_or_a_link_to_one_is_written_in_place(tmp_path, deadline, made_in):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "scores.csv"
    link.symlink_to(fifo)
    for path in (fifo, link):
        check_writable(path, suffixes=CSV)  # no probe file, and a FIFO's name need not end in .csv
        with fifo_reader(fifo) as read:
            write_text(path, f"dis,ref\n{path.name},r.png\n")
            assert read() == f"dis,ref\n{path.name},r.png\n".encode()
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.readlink(link) == str(fifo)
    assert made_in == [] and sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "scores.csv"]


def test_a_character_device_is_written_in_place_never_replaced(tmp_path, made_in):
    """/dev/null through a link in tmp_path (the test never names /dev/null as an output itself)."""
    null = tmp_path / "null.csv"
    null.symlink_to(os.devnull)
    check_writable(null, suffixes=JSON)  # a device's name says nothing of the format
    check_writable(null, [os.devnull])  # nor does writing it destroy what is read from it (a terminal)
    write_text(null, "x\n")
    write_json(null, {"a": 1})
    atomic_save({"w": torch.zeros(2)}, null)
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode) and os.readlink(null) == os.devnull
    assert made_in == []  # no temp or probe file, in /dev or anywhere
    assert destination(null) == ("in place", null)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_device_that_fails_the_write_is_one_line_and_stays_a_device(tmp_path):
    full = tmp_path / "full.csv"
    full.symlink_to("/dev/full")
    with pytest.raises(AfineError) as info:
        write_text(full, "x\n")
    assert str(info.value) == f"{full}: cannot write (no space left on device)"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode) and full.is_symlink()


def test_a_device_node_named_itself_is_written_in_place(tmp_path):
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # the null device's numbers
        open(node, "wb").close()
    except OSError as e:
        pytest.skip(f"cannot make and open a device node here ({e.strerror}: needs root, not a nodev mount)")
    check_writable(node)
    write_text(node, "x\n")
    assert stat.S_ISCHR(os.lstat(node).st_mode)  # not replaced by a regular file
    assert [p.name for p in tmp_path.iterdir()] == ["null"]


def test_a_link_to_a_regular_file_has_its_target_replaced_and_the_link_kept(tmp_path, made_in):
    (tmp_path / "data").mkdir()
    (tmp_path / "out").mkdir()
    target = tmp_path / "data" / "scores.csv"
    target.write_text("old\n")
    absolute, relative = tmp_path / "out" / "scores.csv", tmp_path / "out" / "rel.csv"
    absolute.symlink_to(target)
    relative.symlink_to(Path("..") / "data" / "scores.csv")
    for link in (absolute, relative):
        before, text = os.readlink(link), os.stat(target).st_ino
        check_writable(link, suffixes=CSV)
        write_text(link, f"new {link.name}\n")
        assert target.read_text() == f"new {link.name}\n"
        assert os.stat(target).st_ino != text  # a new file renamed over the target, not the old one rewritten
        assert link.is_symlink() and os.readlink(link) == before
    assert made_in and all(folder == target.parent for folder in made_in)  # temp and probe beside the target
    assert leftovers(tmp_path / "data") == [] and sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["rel.csv", "scores.csv"]


def test_a_dangling_link_or_a_loop_is_an_error_naming_it(tmp_path):
    dangling = tmp_path / "scores.csv"
    dangling.symlink_to(tmp_path / "gone" / "scores.csv")
    loop = tmp_path / "loop.csv"
    loop.symlink_to(tmp_path / "loop2.csv")
    (tmp_path / "loop2.csv").symlink_to(loop)
    for action in (lambda p: write_text(p, "x"), check_writable):
        with pytest.raises(AfineError) as info:
            action(dangling)
        assert str(info.value) == f"{dangling}: cannot write, it is a symbolic link to " \
                                  f"{tmp_path / 'gone' / 'scores.csv'}, which does not exist"
        with pytest.raises(AfineError) as info:
            action(loop)
        assert str(info.value) == f"{loop}: cannot write (too many levels of symbolic links)"
    assert dangling.is_symlink() and not (tmp_path / "gone").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.csv", "loop2.csv", "scores.csv"]


def test_a_socket_is_refused_and_kept(tmp_path):
    path = tmp_path / "s.csv"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        for action in (lambda: write_text(path, "x"), lambda: check_writable(path)):
            with pytest.raises(AfineError) as info:
                action()
            assert str(info.value) == f"{path}: cannot write, it is a socket"
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_dash_is_standard_output_and_dot_slash_dash_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    print("printed first")
    check_writable("-", [tmp_path / "input.csv"], CSV)
    write_text("-", "a,b\n")
    write_json("-", {"x": 1})
    assert capsys.readouterr().out == 'printed first\na,b\n{\n  "x": 1\n}\n'
    assert list(tmp_path.iterdir()) == []
    write_text("./-", "a file")
    write_text(Path("-"), "a file")  # a Path always names a file
    assert (tmp_path / "-").read_text() == "a file" and capsys.readouterr().out == ""


def test_a_checked_write_to_standard_output_sends_nothing_unchecked(tmp_path, monkeypatch, capsys):
    """download.py's `check` runs on the whole file before anything reaches the output."""
    monkeypatch.chdir(tmp_path)  # a wrong '-' is a file here, not in the repository
    def refuse(path):
        assert path.read_bytes() == b"payload"
        raise ValueError("bad file")

    with pytest.raises(ValueError):
        atomic_write("-", lambda f: f.write(b"payload"), refuse)
    atomic_write("-", lambda f: f.write(b"payload"), lambda path: None)
    assert capsys.readouterr().out == "payload" and list(tmp_path.iterdir()) == []


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Without the fsync, a power cut after the rename can leave an empty or partial file under the old name."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.stat(source).st_ino))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "state.pt"
    for _ in range(2):  # a new file, then one replacing it
        events.clear()
        atomic_save({"w": torch.ones(3)}, path)
        written = os.stat(path).st_ino
        assert ("fsync", written) in events and ("replace", written) in events
        assert events.index(("fsync", written)) < events.index(("replace", written))
        assert events[-1] == ("fsync", os.stat(tmp_path).st_ino)


# ---------------------------------------------------------------------------------------------- what it must not be


@pytest.mark.parametrize("name, suffixes, ends", [("scores.pth", CSV, "ends in '.pth'"),
                                                   ("scores", CSV, "has no suffix"),
                                                   ("r.csv", JSON, "ends in '.csv'"),
                                                   ("curves.xyz", PICTURES, "ends in '.xyz'")])
def test_an_output_must_end_in_the_suffix_of_what_is_written(tmp_path, name, suffixes, ends):
    expected = suffixes[0] if len(suffixes) == 1 else "one of " + ", ".join(suffixes)
    with pytest.raises(AfineError) as info:
        check_writable(tmp_path / name, suffixes=suffixes)
    assert str(info.value) == f"{tmp_path / name}: cannot write, the file name must end in {expected} for what is " \
                              f"written there (it {ends}); choose another output"
    check_writable(tmp_path / name)  # no rule where none is given (outputs whose names the command makes)
    for good in (f"x{suffixes[0]}", f"X{suffixes[-1].upper()}"):
        check_writable(tmp_path / good, suffixes=suffixes)
    (tmp_path / "weights.pth").write_bytes(b"keep")
    (tmp_path / "out.csv").symlink_to(tmp_path / "weights.pth")  # a link's target is what would be written
    (tmp_path / "latest").symlink_to(tmp_path / "x.csv")
    (tmp_path / "x.csv").write_text("")
    with pytest.raises(AfineError, match=r"out.csv \(a link to .*weights.pth\): cannot write, the file name must end"):
        check_writable(tmp_path / "out.csv", suffixes=CSV)
    check_writable(tmp_path / "latest", suffixes=CSV)


def fake_run(folder: Path, *markers: str) -> Path:
    """A folder with config.json and the given files or folders (state/ a folder)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    for name in markers:
        (folder / name).mkdir() if name == "state" else (folder / name).write_text("")
    return folder


@pytest.mark.parametrize("markers", [("built_on.json",), ("log.jsonl",), ("state",)])
def test_a_run_folder_is_known_by_config_json_beside_its_record_log_or_state(tmp_path, markers):
    run = fake_run(tmp_path / "run", *markers)
    with pytest.raises(AfineError, match="it is a file of the training run folder"):
        check_writable(run / "net_qhead.pth")
    check_writable(run / "eval.json")
    plain = fake_run(tmp_path / "configs")  # a config.json alone is no run
    check_writable(plain / "config.json")
    check_writable(plain / "best" / "best.json")


def test_every_file_a_training_run_writes_is_refused_new_names_beside_them_are_not(tmp_path):
    """A real (tiny) run, with validation, every save kept and TensorBoard: so a file a run gains later is caught."""
    import train_stage1
    from afine.distributed import Dist
    from tests.test_train import square_corpus, stage1_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path / "runs" / "s1"
        train_stage1.train(stage1_config(square_corpus(tmp_path / "data"), run, total_iter=2, val_every=1,
                                         save_every=1, keep_saves="true", tensorboard="true"), Dist())
    finally:
        torch.set_num_threads(threads)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {"config.json", "built_on.json", "log.jsonl", "clip_model.pth", "net_qhead.pth", "best.json",
            "step_00000002.pt", "step_00000002.json"} <= {p.name for p in files}
    assert {p.relative_to(run).parts[0] for p in files} >= {"best", "saves", "state", "tb"}
    (tmp_path / "alias").symlink_to(run)
    later = [run / "afine.pth", run / "net_dhead.pth", run / "state" / "step_00000009.pt", run / "best.tmp"]
    for file in files + later:
        for path in (file, tmp_path / "alias" / file.relative_to(run)):
            with pytest.raises(AfineError) as info:
                check_writable(path)
            assert str(info.value) == f"{path}: cannot write, it is a file of the training run folder " \
                                      f"{Path(os.path.realpath(run))}; choose another output"
    for path in (run / "eval.json", run / "curves.png", tmp_path / "alias" / "eval.json", run.parent / "log.jsonl"):
        check_writable(path)
