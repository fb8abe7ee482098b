"""Atomic file writes: a temp file in the same folder, fsync, then rename over the target.

A crash or kill leaves either the old file or the new one, never a half-written file. A failed write (disk
full, no permission, read-only folder, target is a folder) is a one-line AfineError naming the file; the old
file stays as it was and no temp file is left behind. `check_writable` tells before long work starts, and
refuses an output that is one of the command's inputs (docs/scoring.md, "Output files and file names").
`atomic_folder` does for a whole new folder what atomic_write does for a file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import AfineError


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


def check_writable(path: str | Path, inputs: Iterable[str | Path] = ()) -> None:
    """AfineError naming `path` unless atomic_write could write it without destroying an input: call it before
    long work, not after.

    The path must not be a folder nor one of `inputs`, the files the command reads (see check_not_input); its
    nearest existing ancestor must be a folder (missing ones are created by the write) where a file can be
    created, tried with a probe file that is removed at once.
    """
    path = Path(path)
    if path.is_dir():
        raise AfineError(f"{path}: cannot write, it is a folder")
    check_not_input([path], inputs)
    folder = nearest_folder(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AfineError(f"{path}: cannot write ({reason(e)})") from None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None],
                 check: Callable[[Path], None] | None = None) -> None:
    """Call `write(f)` on a binary temp file beside `path`, fsync it, and rename it to `path`.

    The file gets the usual mode for new files, 0666 less the process umask. `check(temp path)`, if given, runs on
    the complete file before the rename; when it raises, nothing is renamed and the temp file is removed.
    """
    path = Path(path)
    if path.is_dir():
        raise AfineError(f"{path}: cannot write, it is a folder")
    nearest_folder(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise AfineError(f"{path}: cannot write ({reason(e)})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        try:
            Path(tmp).unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise AfineError(f"{path}: cannot write ({reason(e)})") from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


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
