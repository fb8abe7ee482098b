"""The released `afine.pth`, downloaded on first use (README, "Score your images").

It goes to the torch hub cache (`<torch.hub.get_dir()>/checkpoints/afine.pth`, or the file AFINE_WEIGHTS names)
from where pyiqa gets it (AFINE_WEIGHTS_URL overrides the address). The download streams into a temp file beside
the target, must load strictly as a merged A-FINE checkpoint, and only then is renamed into place: a failed,
cut-short or wrong download is never kept. Processes starting at once wait on a lock file and download once.
`--offline`, AFINE_OFFLINE=1 or HF_HUB_OFFLINE=1 forbid the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import atomic_write, reason
from .checkpoint import read_afine_parts
from .errors import AfineError

RELEASED_URL = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/afine.pth"
OFFLINE_VARIABLES = ("AFINE_OFFLINE", "HF_HUB_OFFLINE")
CHUNK = 1 << 20
TIMEOUT_S = 60  # per connection attempt and per read, not for the whole transfer


def released_url() -> str:
    return os.environ.get("AFINE_WEIGHTS_URL") or RELEASED_URL


def released_path() -> Path:
    """Where the released weights are kept: $AFINE_WEIGHTS, else the torch hub cache."""
    return Path(os.environ.get("AFINE_WEIGHTS") or Path(torch.hub.get_dir()) / "checkpoints" / "afine.pth")


def offline_reason(offline: bool = False) -> str | None:
    """Why the network may not be used (the flag or the variable that says so), or None."""
    if offline:
        return "--offline"
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name}={os.environ[name]}"
    return None


def released_weights(offline: bool = False, progress: bool = True, instead: str = "give --weights FILE",
                     check: Callable[[Path], object] = read_afine_parts) -> Path:
    """The released afine.pth, downloaded first if it is not there yet; AfineError if it cannot be (its message
    ends with `instead`: what else the user can do). A download is kept only if `check` passes on it (an AfineError
    if not): by default it must read as a merged A-FINE checkpoint; scoring passes model.check_weights (it must
    load strictly as a model), which this module cannot import: the model module imports it."""
    path, url = released_path(), released_url()
    if path.exists():
        return path
    why = offline_reason(offline)
    if why:
        raise AfineError(f"{path}: the released A-FINE weights are not there and downloads are off ({why}); "
                         f"download {url} and put it at {path}, or {instead}")
    with download_lock(path, progress):
        if path.exists():  # another process downloaded it while this one waited
            return path
        digest = download(url, path, progress, instead, check)
    print(f"downloaded {url} to {path} (SHA-256 {digest})", file=sys.stderr)
    return path


@contextlib.contextmanager
def download_lock(path: Path, progress: bool) -> Iterator[None]:
    """Hold `<path>.lock` so that concurrent first uses download once (no lock where fcntl is missing: the rename
    alone keeps the file whole)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a")
    except OSError as e:
        raise AfineError(f"{lock}: cannot create ({reason(e)})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process downloading {path}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def download(url: str, path: Path, progress: bool, instead: str = "give --weights FILE",
             check: Callable[[Path], object] = read_afine_parts) -> str:
    """Stream `url` into a temp file beside `path`, `check` it, and rename it to `path`; returns its SHA-256."""
    digest = hashlib.sha256()

    def failed(why: str) -> AfineError:
        return AfineError(f"{url}: cannot download the A-FINE weights ({why}); download the file yourself and put "
                          f"it at {path}, or {instead}")

    def write(f) -> None:
        try:
            response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            raise failed(f"HTTP {e.code} {e.reason}") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise failed(network_reason(e)) from None
        with response:
            length = response.headers.get("Content-Length")
            size = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name, file=sys.stderr,
                      disable=not progress) as bar:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise failed(f"the transfer broke off after {received} bytes: {network_reason(e)}") from None
                    if not chunk:
                        break
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if size is not None and received != size:
            raise failed(f"the transfer stopped after {received} of {size} bytes")

    def verify(tmp: Path) -> None:
        try:
            check(tmp)
        except AfineError as e:
            raise failed(f"what arrived is not a merged A-FINE checkpoint: {str(e).replace(str(tmp), 'afine.pth')}"
                         ) from None

    atomic_write(path, write, verify)
    return digest.hexdigest()


def network_reason(error: BaseException) -> str:
    """A network failure in words (urllib wraps the socket error in URLError.reason)."""
    error = getattr(error, "reason", error)
    return str(error) or type(error).__name__
