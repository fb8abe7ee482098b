"""Atomic file writes: a temp file in the same folder, fsync, then rename over the target.

A crash or kill leaves either the old file or the new one, never a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a binary temp file beside `path`, fsync it, and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
