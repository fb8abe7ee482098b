"""Writing the files a command names: regular files atomically, anything else in place, '-' to standard output.

A regular file (or a new name) is written to a temp file beside it, fsynced and renamed over it: a crash or kill
leaves either the old file or the new one, never a half-written file. A symbolic link to a regular file has its
target replaced that way (the temp file beside the target), never the link itself. A device or FIFO, or a link
to one (/dev/null, /dev/stdout, a named pipe), is opened and written in place, as the shell's `> file` does: it
is never replaced by a file of ours. '-' is standard output. A dangling link, or a socket, is an error naming it.

A failed write (disk full, no permission, read-only folder, target is a folder) is a one-line AfineError naming
the file; the old file stays as it was and no temp file is left behind. `check_writable` tells before long work
starts, and refuses an output that is one of the command's inputs, a file of a training run folder, or a name
whose suffix is not the format written (docs/scoring.md, "Output files and file names"). `atomic_folder`
does for a whole new folder what atomic_write does for a file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TextIO

from .errors import AfineError

STDOUT = "-"  # as an output file name: standard output

# Suffixes an output's name must have for the format written (docs/scoring.md, "Output files and file names").
CSV = (".csv",)
JSON = (".json",)
TEXT = (".txt",)  # label lists: MOS lists, triplet lists
PICTURES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".tif", ".tiff", ".eps", ".ps")  # written by matplotlib

# What a training run folder holds (afine/training.py): files at its top level and folders whose whole content is
# the run's. A run folder is recognised by its config.json beside built_on.json, log.jsonl or state/.
RUN_FILES = ("config.json", "built_on.json", "log.jsonl", ".lock", "afine.pth", "clip_model.pth", "net_qhead.pth",
             "net_dhead.pth", "net_scale_fr.pth", "net_scale_nr.pth", "net_finalscore.pth")
RUN_FOLDERS = ("best", "saves", "state", "tb", "best.tmp", "best.old")
RUN_MARKERS = ("built_on.json", "log.jsonl", "state")


def reason(error: OSError) -> str:
    """An OSError's cause in words, e.g. 'no space left on device'."""
    if error.errno == errno.EISDIR:
        return "it is a folder"
    text = error.strerror or str(error) or type(error).__name__
    return text[:1].lower() + text[1:]


def current_umask() -> int:
    """The process umask (from /proc where available, which leaves it untouched)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def nearest_folder(path: Path) -> Path:
    """The nearest existing ancestor of `path`, where the write creates the missing folders; AfineError if it is
    not a folder (a file stands where a folder of the path should be)."""
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise AfineError(f"{path}: cannot write, {folder} is not a folder")
    return folder


def check_not_input(outputs: Iterable[str | Path], inputs: Iterable[str | Path]) -> None:
    """AfineError if one of `outputs` is one of `inputs`, compared by identity (device and inode): another
    spelling, a symbolic link or a hard link to an input counts. A path with no file behind it overwrites nothing.
    The inputs (often every image of a dataset) are looked at once, however many outputs there are."""
    existing = {}
    for path in outputs:
        try:
            st = os.stat(path)
        except OSError:
            continue
        existing.setdefault((st.st_dev, st.st_ino), Path(path))
    if not existing:
        return
    for source in inputs:
        try:
            found = os.stat(source)
        except OSError:
            continue
        path = existing.get((found.st_dev, found.st_ino))
        if path is not None:
            spelling = "" if Path(source) == path else f" (as {source})"
            raise AfineError(f"{path}: cannot write, this command reads that file{spelling}; choose another output")


def is_stdout(path: str | Path | None) -> bool:
    """Whether an output file name means standard output: the string '-', as a command line gives it (a Path, or
    './-', names a file)."""
    return isinstance(path, str) and path == STDOUT


def printout(*outputs: str | Path | None) -> TextIO:
    """Where a command prints its table or summary: standard output, or standard error when one of its output
    files is '-', so that standard output carries that file alone."""
    return sys.stderr if any(is_stdout(o) for o in outputs) else sys.stdout


def destination(path: str | Path) -> tuple[str, Path]:
    """How a write to `path` goes, and the file it writes:

    - ("stdout", path) for '-';
    - ("in place", path) for an existing device or FIFO, or a symbolic link to one, and for a /proc link
      that names no path (/dev/stdout on a pipe or a deleted file): opened and written as `> path` would;
    - ("replace", file) for a regular file or a new name: a temp file beside `file` renamed over it, where `file`
      is the target of a symbolic link, the link itself left as it is.

    AfineError for a folder, a socket (which `> path` cannot open either), a dangling link (naming it) or a link
    loop.
    """
    if is_stdout(path):
        return "stdout", Path(path)
    path = Path(path)
    try:
        found = os.stat(path)
    except OSError as e:
        if os.path.islink(path) and e.errno == errno.ENOENT:
            raise AfineError(f"{path}: cannot write, it is a symbolic link to {os.readlink(path)}, which does not "
                             f"exist") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "replace", path  # a new file (nearest_folder names a file standing where a folder should be)
        raise AfineError(f"{path}: cannot write ({reason(e)})") from None
    if stat.S_ISDIR(found.st_mode):
        raise AfineError(f"{path}: cannot write, it is a folder")
    if stat.S_ISSOCK(found.st_mode):  # `> path` fails too: a socket cannot be opened as a file
        raise AfineError(f"{path}: cannot write, it is a socket")
    if not stat.S_ISREG(found.st_mode):
        return "in place", path
    if not os.path.islink(path):
        return "replace", path
    target = Path(os.path.realpath(path))
    try:
        same = os.path.samestat(os.stat(target), found)
    except OSError:
        same = False
    return ("replace", target) if same else ("in place", path)


def is_run_folder(folder: Path) -> bool:
    """A training run folder (out_dir): its config.json beside built_on.json, log.jsonl or state/."""
    return os.path.isfile(folder / "config.json") and any(os.path.exists(folder / m) for m in RUN_MARKERS)


def run_folder_holding(file: Path) -> Path | None:
    """The training run folder that `file` (existing or not) is a file of, if any: one of the names a run uses at
    its top level (RUN_FILES, RUN_FOLDERS) or anything in one of its folders (best/, saves/, state/, tb/). A new
    name of the user's own in a run folder (runs/s3/eval.json) is none of these."""
    real = Path(os.path.realpath(file))
    for folder in real.parents:
        first = real.relative_to(folder).parts[0]
        if (first in RUN_FOLDERS or (folder == real.parent and first in RUN_FILES)) and is_run_folder(folder):
            return folder
    return None


def check_writable(path: str | Path, inputs: Iterable[str | Path] = (), suffixes: tuple[str, ...] = ()) -> None:
    """AfineError naming `path` unless atomic_write could write it without destroying what it must not: call it
    before long work, not after.

    '-' (standard output) is always writable. Otherwise the path must not be a folder, a socket or a dangling link.
    A device or FIFO (or a link to one) is written in place: it needs write permission, nothing else. A regular
    file or new name (a link's target, for a link) must not be one of `inputs`, the files the command reads (see
    check_not_input), nor a file of a training run folder (run_folder_holding); it must end in one of `suffixes`
    (the format written; any name if none are given), and the nearest existing folder must take a new file, tried
    with a probe file that is removed at once.
    """
    how, target = destination(path)
    if how == "stdout":
        return
    if how == "in place":  # writing a terminal or /dev/null that is also read (--pairs /dev/stdin) destroys nothing
        if not os.access(path, os.W_OK):
            raise AfineError(f"{path}: cannot write (permission denied)")
        return
    check_not_input([path], inputs)
    run = run_folder_holding(target)
    if run is not None:
        raise AfineError(f"{path}: cannot write, it is a file of the training run folder {run}; choose another "
                         f"output")
    if suffixes and target.suffix.lower() not in suffixes:
        name = "" if target == Path(path) else f" (a link to {target})"
        got = f"ends in '{target.suffix}'" if target.suffix else "has no suffix"
        expected = suffixes[0] if len(suffixes) == 1 else "one of " + ", ".join(suffixes)
        raise AfineError(f"{path}{name}: cannot write, the file name must end in {expected} for what is written "
                         f"there (it {got}); choose another output")
    folder = nearest_folder(target)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AfineError(f"{path}: cannot write, cannot create a file in {folder} ({reason(e)})") from None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None],
                 check: Callable[[Path], None] | None = None) -> None:
    """Call `write(f)` on a binary temp file beside `path`, fsync it, and rename it to `path` (for a symbolic link:
    beside its target, renamed to the target); for '-', a device or a FIFO, write there directly (destination).

    The file gets the usual mode for new files, 0666 less the process umask. `check(temp path)`, if given, runs on
    the complete file before the rename; when it raises, nothing is renamed and the temp file is removed.
    """
    how, target = destination(path)
    if how != "replace":
        write_through(Path(path), how, write, check)
        return
    folder = nearest_folder(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise AfineError(f"{path}: cannot write, cannot create a file in {folder} ({reason(e)})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the rename makes it the file
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, target)
    except BaseException as e:
        try:
            Path(tmp).unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise AfineError(f"{path}: cannot write ({reason(e)})") from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write_through(path: Path, how: str, write: Callable[[BinaryIO], None],
                  check: Callable[[Path], None] | None) -> None:
    """`write` straight to standard output ('stdout') or to the device or FIFO at `path` ('in place'), as
    `> path` would. With `check`, the output is first written to a temp file and checked, so nothing unchecked
    goes out."""
    name = "standard output" if how == "stdout" else str(path)
    try:
        with contextlib.ExitStack() as stack:
            staged = None
            if check is not None:
                staged = stack.enter_context(tempfile.NamedTemporaryFile(prefix=".afine.", suffix=".tmp"))
                write(staged)
                staged.flush()
                check(Path(staged.name))
                staged.seek(0)
            if how == "stdout":
                sys.stdout.flush()  # what the command printed before comes first
                sink = sys.stdout.buffer
            else:
                sink = stack.enter_context(open(path, "wb"))
            if staged is None:
                write(sink)
            else:
                shutil.copyfileobj(staged, sink)
            sink.flush()
    except OSError as e:
        raise AfineError(f"{name}: cannot write ({reason(e)})") from None


def write_text(path: str | Path, text: str) -> None:
    """Atomic UTF-8 text write with '\\n' line endings."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def write_json(path: str | Path, obj) -> None:
    """Atomic, indented JSON write; NaN and infinities become null so any JSON reader accepts the file."""
    clean = json.loads(json.dumps(obj), parse_constant=lambda c: None)
    write_text(path, json.dumps(clean, indent=2) + "\n")


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `path` to fill; on success rename it to `path`, which must be absent or an empty
    folder. On any failure (Ctrl-C included) the temp folder is removed and `path` stays as it was.

    The folder gets the usual mode for new folders, 0777 less the process umask.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise AfineError(f"{path}: cannot create folder, a file or symbolic link is in the way")
    nearest_folder(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~current_umask())
    except OSError as e:
        raise AfineError(f"{path}: cannot create folder ({reason(e)})") from None
    emptied = False
    try:
        yield tmp
        if path.is_dir():
            path.rmdir()  # empty, as the caller checked; a folder filled meanwhile fails here and is kept
            emptied = True
        os.rename(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if emptied:
            path.mkdir(exist_ok=True)
        if isinstance(e, OSError):
            raise AfineError(f"{path}: cannot create folder ({reason(e)})") from None
        raise
