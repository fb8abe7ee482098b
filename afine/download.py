"""The released `afine.pth`, downloaded on first use (docs/scoring.md, "Downloads and offline use").

It goes to the torch hub cache (`<torch.hub.get_dir()>/checkpoints/afine.pth`, or the file AFINE_WEIGHTS names)
from where pyiqa gets it (AFINE_WEIGHTS_URL overrides the address). The download streams into a temp file beside
the target, must load strictly as a merged A-FINE checkpoint, and only then is renamed into place: a failed,
cut-short or wrong download is never kept. Processes starting at once wait on a lock file and download once.
`--offline`, AFINE_OFFLINE=1 or HF_HUB_OFFLINE=1 forbid the network.

A server that stops sending, or trickles, is given up on: no response within AFINE_DOWNLOAD_TIMEOUT seconds
(default 60), or fewer than AFINE_DOWNLOAD_MIN_RATE bytes a second (default 10000; 0: no minimum) on average over
any such span, is an error. SIGTERM during the transfer removes the temp file before the process ends (where
SIGTERM has its default action), and a download removes the temp files that earlier downloads on this machine
left when they were killed (their temp file names carry the host and the process id).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import current_umask, reason
from .checkpoint import read_afine_parts
from .errors import AfineError

RELEASED_URL = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/afine.pth"
OFFLINE_VARIABLES = ("AFINE_OFFLINE", "HF_HUB_OFFLINE")
CHUNK = 1 << 20
# The server must answer within TIMEOUT_S and send at least MIN_RATE bytes/s on average over every TIMEOUT_S
# (a stalled or trickling server is given up on); overridden by these variables.
TIMEOUT_S, TIMEOUT_VARIABLE = 60.0, "AFINE_DOWNLOAD_TIMEOUT"
MIN_RATE, MIN_RATE_VARIABLE = 10_000.0, "AFINE_DOWNLOAD_MIN_RATE"


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
    limits = transfer_limits()
    with download_lock(path, progress) as locked:
        if path.exists():  # another process downloaded it while this one waited
            return path
        if locked:  # no other download of this file runs now
            remove_stale_temp_files(path)
        digest = download(url, path, progress, *limits, instead=instead, check=check)
    print(f"downloaded {url} to {path} (SHA-256 {digest})", file=sys.stderr)
    return path


def transfer_limits() -> tuple[float, float]:
    """(timeout in seconds, minimum rate in bytes/s) from AFINE_DOWNLOAD_TIMEOUT and AFINE_DOWNLOAD_MIN_RATE."""
    limits = []
    for name, default, least in ((TIMEOUT_VARIABLE, TIMEOUT_S, "a number of seconds above 0"),
                                 (MIN_RATE_VARIABLE, MIN_RATE, "a number of bytes per second, 0 or more")):
        text = os.environ.get(name, "").strip()
        try:
            value = float(text) if text else default
        except ValueError:
            value = float("nan")
        if not (value > 0 or (value == 0 and name == MIN_RATE_VARIABLE)) or value == float("inf"):
            raise AfineError(f"{name}={os.environ[name]}: expected {least}")
        limits.append(value)
    return limits[0], limits[1]


@contextlib.contextmanager
def download_lock(path: Path, progress: bool) -> Iterator[bool]:
    """Hold `<path>.lock` so that concurrent first uses download once; yields whether the lock is held (no lock
    where fcntl is missing: the rename alone keeps the file whole)."""
    try:
        import fcntl
    except ImportError:
        yield False
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
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def temp_prefix(path: Path) -> str:
    """The start of the name of this process's temp file for `path`: `.afine.pth.dl-<host>-<pid>.`."""
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:64]
    return f".{path.name}.dl-{host}-{os.getpid()}."


def remove_stale_temp_files(path: Path) -> None:
    """Remove the temp files beside `path` of downloads on this machine whose process is gone (killed before it
    could remove its own). Call it holding the download lock: a live download's file is never touched, nor a
    file of another machine (whose process ids mean nothing here)."""
    own = temp_prefix(path).rsplit("-", 1)[0] + "-"
    pattern = re.compile(re.escape(own) + r"(\d+)\.[a-z0-9_]+\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match and not process_exists(int(match[1])):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)


def process_exists(pid: int) -> bool:
    """Whether a process with this id runs on this machine (POSIX; elsewhere: assumed so)."""
    if os.name != "posix" or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def download(url: str, path: Path, progress: bool, timeout: float = TIMEOUT_S, min_rate: float = MIN_RATE,
             instead: str = "give --weights FILE", check: Callable[[Path], object] = read_afine_parts) -> str:
    """Stream `url` into a temp file beside `path`, `check` it, and rename it to `path`; returns its SHA-256.

    The server must answer within `timeout` seconds and then send at least `min_rate` bytes/s on average over every
    `timeout` seconds. Nothing is kept on failure, Ctrl-C included, and on SIGTERM (sigterm_unwinds)."""
    with sigterm_unwinds():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        except OSError as e:
            raise AfineError(f"{path}: cannot write ({reason(e)})") from None
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
                digest = transfer(url, path, f, progress, timeout, min_rate, instead)
                f.flush()
                os.fsync(f.fileno())
            try:
                check(tmp)
            except AfineError as e:
                raise failure(url, path, "what arrived is not a merged A-FINE checkpoint: "
                              f"{str(e).replace(str(tmp), 'afine.pth')}", instead) from None
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):  # writing the file (the network's errors are AfineErrors by now)
                raise AfineError(f"{path}: cannot write ({reason(e)})") from None
            raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return digest


def failure(url: str, path: Path, why: str, instead: str = "give --weights FILE") -> AfineError:
    """The one-line error of a download that failed because of `why`; it ends with `instead`."""
    why = " ".join(why.split())  # one line, whatever the server or the network library said
    return AfineError(f"{url}: cannot download the A-FINE weights ({why}); download the file yourself and put it at "
                      f"{path}, or {instead}")


class Progress:
    """What a transfer has received, shared with its watchdog: bytes, when the response came (time.monotonic()),
    the sockets opened (to shut down), and why the watchdog stopped it."""

    def __init__(self):
        self.received, self.responded, self.sockets, self.stopped = 0, None, [], None


def transfer(url: str, path: Path, f, progress: bool, timeout: float, min_rate: float,
             instead: str = "give --weights FILE") -> str:
    """Write the body of `url` to `f`; its SHA-256. AfineError (failure) when the server refuses, breaks off, sends
    less than it announced, or is too slow (watchdog)."""
    digest, state = hashlib.sha256(), Progress()
    with watchdog(state, timeout, min_rate):
        try:
            response = opener(state.sockets).open(url, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise failure(url, path, state.stopped or http_reason(e), instead) from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise failure(url, path, state.stopped or network_reason(e), instead) from None
        state.responded = time.monotonic()
        with response:
            length = response.headers.get("Content-Length")
            size = int(length) if length and length.isdigit() else None
            with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name, file=sys.stderr,
                      disable=not progress) as bar:
                while True:
                    try:
                        chunk = response.read1(CHUNK)  # what has arrived: the count stays exact when it breaks off
                    except (OSError, http.client.HTTPException) as e:
                        raise failure(url, path, state.stopped or f"the transfer broke off after {state.received} "
                                      f"bytes: {network_reason(e)}", instead) from None
                    if not chunk:
                        break
                    f.write(chunk)
                    digest.update(chunk)
                    state.received += len(chunk)
                    bar.update(len(chunk))
        if state.stopped:
            raise failure(url, path, state.stopped, instead)
        if size is not None and state.received != size:
            raise failure(url, path, f"the transfer stopped after {state.received} of {size} bytes", instead)
    return digest.hexdigest()


@contextlib.contextmanager
def watchdog(state: Progress, timeout: float, min_rate: float) -> Iterator[None]:
    """For the `with` body: a thread that stops the transfer (shuts its sockets down, so that a blocked read
    returns, and says why in `state.stopped`) when no response came within `timeout` seconds, or when fewer than
    `min_rate` bytes/s arrived over a span of `timeout` seconds. Per-read socket timeouts alone never end a
    server that sends a byte every few seconds."""
    stop = threading.Event()

    def watch() -> None:
        start, counted, responded = time.monotonic(), 0, False
        while not stop.wait(min(1.0, timeout / 10)):
            now = time.monotonic()
            if state.responded is not None and not responded:  # the rate is measured from the response on
                start, responded = state.responded, True
            if now - start < timeout:
                continue
            if not responded:
                state.stopped = f"no response within {timeout:g} s ({TIMEOUT_VARIABLE})"
            elif state.received - counted < min_rate * (now - start):
                rate = (state.received - counted) / (now - start)
                state.stopped = (f"the transfer slowed to {rate:.0f} bytes/s over {now - start:.0f} s, under the "
                                 f"minimum of {min_rate:g} ({MIN_RATE_VARIABLE}), after {state.received} bytes")
            else:
                start, counted = now, state.received
                continue
            for sock in list(state.sockets):
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
            return

    thread = threading.Thread(target=watch, name="afine-download-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def opener(sockets: list) -> urllib.request.OpenerDirector:
    """urllib's opener (proxies from the environment, redirects, HTTPS) whose connections add their socket to
    `sockets` once connected, for the watchdog."""

    class Recording:
        def do_open(self, http_class, req, **kwargs):
            class Connection(http_class):
                def connect(self):
                    super().connect()
                    sockets.append(self.sock)

            return super().do_open(Connection, req, **kwargs)

    class HTTP(Recording, urllib.request.HTTPHandler):
        pass

    class HTTPS(Recording, urllib.request.HTTPSHandler):
        pass

    return urllib.request.build_opener(HTTP, HTTPS)


def http_reason(error: urllib.error.HTTPError) -> str:
    """An HTTP error status in words; urllib's redirect loop (three lines) as one."""
    if 300 <= error.code < 400 and "infinite loop" in str(error.reason):
        return f"redirected in a loop or more than 10 times (HTTP {error.code}, last at {error.url})"
    return f"HTTP {error.code} {error.reason}"


class _Terminated(BaseException):
    """SIGTERM during a download, raised to unwind it (sigterm_unwinds)."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """For the `with` body (a download writing its temp file), in a process where SIGTERM has its default action
    (ending the process at once, which would leave the temp file of up to 610 MB): SIGTERM unwinds the body
    first, so that the temp file is removed, then ends the process as SIGTERM does (exit status 143 in a shell).
    A handler the program set is left alone, as is any thread but the main one."""
    try:
        default = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    except ValueError:
        default = False
    if not default or threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not interrupt the clean-up
        raise _Terminated

    terminated = False
    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    except _Terminated:
        terminated = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if terminated:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        signal.raise_signal(signal.SIGTERM)


def network_reason(error: BaseException) -> str:
    """A network failure in words (urllib wraps the socket error in URLError.reason)."""
    error = getattr(error, "reason", error)
    return str(error) or type(error).__name__
