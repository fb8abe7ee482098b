"""`afine --version` and the SHA-256 of weights files: computed once, reused while the file is unchanged."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from afine import __version__, provenance
from afine.__main__ import main


def version(capsys) -> list[str]:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    return capsys.readouterr().out.splitlines()


def test_version_names_the_weights_it_would_use_with_their_digest(capsys, tmp_path, monkeypatch):
    weights = tmp_path / "afine.pth"
    monkeypatch.setenv("AFINE_WEIGHTS", str(weights))
    lines = version(capsys)
    assert lines[0] == f"afine {__version__}" and __version__ == "0.1.0"
    assert lines[1].startswith(f"weights {weights} (not there yet: downloaded from ")
    device = provenance.device_name("cuda" if torch.cuda.is_available() else "cpu")
    assert lines[2:] == [f"torch {torch.__version__}", f"device {device}"]
    weights.write_bytes(b"weights" * 1000)
    lines = version(capsys)
    assert lines[1:3] == [f"weights {weights}", f"  sha256 {hashlib.sha256(weights.read_bytes()).hexdigest()}"]


def test_a_digest_is_computed_once_while_the_file_is_unchanged(tmp_path, monkeypatch):
    hashed = []
    sha256 = provenance.sha256
    monkeypatch.setattr(provenance, "sha256", lambda path: hashed.append(path) or sha256(path))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"a" * 4096)
    first = provenance.file_sha256(weights)
    assert first == hashlib.sha256(b"a" * 4096).hexdigest() and len(hashed) == 1
    assert provenance.file_sha256(weights) == first and len(hashed) == 1  # from the cache (another process too)
    stat = weights.stat()
    while weights.stat().st_ctime_ns == stat.st_ctime_ns:  # rewritten in place, until the file clock has moved
        weights.write_bytes(b"b" * 4096)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same inode and size, modification time set back
    assert weights.stat().st_ino == stat.st_ino
    assert provenance.file_sha256(weights) == hashlib.sha256(b"b" * 4096).hexdigest() and len(hashed) == 2
    assert provenance.file_sha256(weights) == hashlib.sha256(b"b" * 4096).hexdigest() and len(hashed) == 2
    replaced = tmp_path / "new"
    replaced.write_bytes(b"c" * 4096)
    os.replace(replaced, weights)  # another file renamed over it
    assert provenance.file_sha256(weights) == hashlib.sha256(b"c" * 4096).hexdigest() and len(hashed) == 3
    provenance.cache_file().write_text("{not json")  # a broken cache costs the hashing again, nothing else
    assert provenance.file_sha256(weights) == hashlib.sha256(b"c" * 4096).hexdigest() and len(hashed) == 4
    assert provenance.file_sha256(weights) == hashlib.sha256(b"c" * 4096).hexdigest() and len(hashed) == 4
