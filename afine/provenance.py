"""What produced a set of numbers: the project's version, the weights and their SHA-256, torch and the device
(`afine --version`, and the files `afine compare` writes; docs/compare.md, "What produced the numbers").

A weights file is hundreds of megabytes, and hashing it takes seconds, so its SHA-256 is kept in a small cache
(`<torch hub dir>/afine-sha256.json`, beside the downloaded weights) keyed by the file's absolute path with its
device, inode, size, modification and change times: any rewrite, rename over it or copy into its place changes
one of them (the change time cannot be set back by a program), and the digest is then computed afresh. A cache
that cannot be read or written only costs the hashing again: it is never an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import __version__
from .atomic import reason, write_text
from .checkpoint import sha256
from .errors import AfineError, printable

CACHED = 64  # files remembered; the least recently hashed are forgotten first


def cache_file() -> Path:
    return Path(torch.hub.get_dir()) / "afine-sha256.json"


def identity(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, from the cache while the file is unchanged, else computed and remembered."""
    path = Path(path).absolute()
    key = str(path)  # JSON keeps the lone surrogates of a name that is not UTF-8 (as \udcXX escapes)
    try:
        cache = json.loads(cache_file().read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    try:
        before = identity(path)
        entry = cache.get(key)
        if isinstance(entry, dict) and entry.get("identity") == before and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        digest = sha256(path)
        after = identity(path)
    except OSError as e:
        raise AfineError(f"{path}: cannot read ({reason(e)})") from None
    if after != before:  # written while it was read: a digest of no version of the file, not kept
        return digest
    cache.pop(key, None)
    cache[key] = {"identity": before, "sha256": digest}
    try:
        write_text(cache_file(), json.dumps(dict(list(cache.items())[-CACHED:]), indent=1) + "\n")
    except Exception:  # a cache that cannot be written costs time, not correctness
        pass
    return digest


def device_name(device: torch.device | str) -> str:
    """'cpu', or the accelerator's type and model ('cuda (NVIDIA H200)'): the same for every process of a run."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def facts(weights: list[Path], clip: Path | None, device: torch.device | str) -> dict:
    """The facts every output of `afine compare` states: version, weights files with their SHA-256, the CLIP
    checkpoint if one was read, torch and the device."""
    return {"afine": __version__,
            "weights": [{"file": printable(p), "sha256": file_sha256(p)} for p in weights],
            "clip": None if clip is None else {"file": printable(clip), "sha256": file_sha256(clip)},
            "torch": torch.__version__, "device": device_name(device)}


def version_text() -> str:
    """`afine --version`: the version, the weights a command would use with no --weights (the released file,
    with its SHA-256 once it is there), torch and the default device."""
    from .download import released_path, released_url

    path = released_path()
    if path.is_file():
        weights = f"weights {printable(path)}\n  sha256 {file_sha256(path)}"
    else:
        weights = f"weights {printable(path)} (not there yet: downloaded from {released_url()} on first use)"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"afine {__version__}\n{weights}\ntorch {torch.__version__}\ndevice {device_name(device)}"
