"""The released weights on first use, served by a local HTTP server: download, reuse, bad transfers, slow and
stalled servers, SIGTERM, stale temp files, offline."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from afine import AFINELoss
from afine.__main__ import main
from afine.download import released_weights, temp_prefix
from afine.errors import AfineError
from tests import procs
from tests.tiny import random_afine, tiny_clip, write_checkpoints

ROOT = Path(__file__).resolve().parents[1]
HANG_S = 60  # a command under test that runs longer is taken to hang: killed, and the test fails


class Served:
    """What the local server answers for GET /afine.pth: status, body, the Content-Length it declares (None: the
    body's), and a delay before the body; `mode` other ways to answer (see Handler); `requests` counts the GETs.
    `stop` ends every answer still being sent (the fixture's finalizer sets it)."""

    def __init__(self):
        self.status, self.body, self.length, self.delay, self.requests = 200, b"", None, 0.0, 0
        self.mode, self.stall_after, self.stop, self.answered = "normal", 0, threading.Event(), 0

    def wait_answered(self) -> None:
        """Until every GET so far has been answered (or given up on)."""
        deadline = time.monotonic() + 30
        while self.answered < self.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.answered == self.requests


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("download")
    paths = write_checkpoints(folder / "ckpt", random_afine(tiny_clip(seed=4)))
    rng = np.random.default_rng(0)
    for name in ("dis", "ref"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return paths["afine"], folder / "dis.png", folder / "ref.png"


class QuietServer(ThreadingHTTPServer):
    """A test server that prints nothing: a client hanging up mid-answer (as every failing download does) is
    not an error of the code under test, and a traceback from this thread would land in its captured stderr.
    Its request threads are joined when it closes."""

    daemon_threads = False
    block_on_close = True

    def handle_error(self, request, client_address):
        pass


@pytest.fixture
def server(files, monkeypatch):
    served = Served()
    served.body = files[0].read_bytes()

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a client that stops reading cannot hold a request thread for long

        def do_GET(self):
            served.requests += 1
            try:
                self.answer()
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass  # the client gave up: what it reports is the test's business, not the server's
            finally:
                served.answered += 1

        def answer(self):
            if served.mode == "redirect loop":
                self.send_response(302)
                self.send_header("Location", self.path)
                self.end_headers()
                return
            if self.path != "/afine.pth":
                self.send_error(404)
                return
            if served.mode == "trickled headers":  # the status line, a byte at a time
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n" * 1000:
                    if served.stop.wait(0.2):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            self.send_response(served.status)
            self.send_header("Content-Length", str(len(served.body) if served.length is None else served.length))
            self.end_headers()
            time.sleep(served.delay)
            if served.mode == "normal":
                self.wfile.write(served.body)
                return
            self.wfile.write(served.body[:served.stall_after])  # then a byte every 0.2 s, or nothing ("stall")
            self.wfile.flush()
            for byte in served.body[served.stall_after:]:
                if served.stop.wait(0.2 if served.mode == "trickle" else 60):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()

        def log_message(self, *args):
            pass

    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    for name in ("no_proxy", "NO_PROXY"):  # a proxy from the environment must not carry requests to 127.0.0.1
        monkeypatch.setenv(name, "127.0.0.1")
    monkeypatch.setenv("AFINE_WEIGHTS_URL", f"http://127.0.0.1:{httpd.server_address[1]}/afine.pth")
    yield served
    served.stop.set()
    httpd.shutdown()
    httpd.server_close()  # joins the request threads
    thread.join(timeout=30)
    assert not thread.is_alive()


def cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / "afine.pth"


def server_url() -> str:
    return os.environ["AFINE_WEIGHTS_URL"]


def score(capsys, *args):
    code = main(["score", "--json", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_first_use_downloads_once_prints_the_digest_then_reuses(files, server, capsys):
    weights, dis, ref = files
    code, out, err = score(capsys, dis, ref)
    assert code == 0, err
    assert cache_path().read_bytes() == weights.read_bytes()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f"to {cache_path()} (SHA-256 {digest})" in err
    assert "afine.pth" in err and "B/s" in err  # the progress bar, on stderr
    code, explicit, _ = score(capsys, "--weights", weights, "--no-progress", dis, ref)
    assert code == 0 and json.loads(out) == json.loads(explicit)
    code, again, err = score(capsys, dis, ref)
    assert code == 0 and again == out
    assert server.requests == 1  # the second use never contacted the server
    assert "SHA-256" not in err and "B/s" not in err
    assert sorted(p.name for p in cache_path().parent.iterdir()) == ["afine.pth", "afine.pth.lock"]


def test_afine_weights_names_the_file(files, server, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AFINE_WEIGHTS", str(tmp_path / "mine" / "afine.pth"))
    code, _, err = score(capsys, "--no-progress", *files[1:])
    assert code == 0, err
    assert (tmp_path / "mine" / "afine.pth").read_bytes() == files[0].read_bytes()
    assert not cache_path().exists()


@pytest.mark.parametrize("case, reason", [
    ("truncated", "the transfer stopped after"),
    ("not_a_checkpoint", "what arrived is not a merged A-FINE checkpoint: afine.pth: cannot read checkpoint"),
    ("wrong_keys", "what arrived is not a merged A-FINE checkpoint: afine.pth[natural]: wrong keys"),
    ("404", "HTTP 404"),
    ("500", "HTTP 500"),
])
def test_a_bad_download_is_one_error_line_and_never_kept(files, server, tmp_path, capsys, case, reason):
    if case == "truncated":
        server.length, server.body = len(server.body), server.body[: len(server.body) // 2]
    elif case == "not_a_checkpoint":
        server.body = b"<html>rate limited</html>"
    elif case == "wrong_keys":
        parts = torch.load(files[0], weights_only=True)
        parts["natural"]["proj_feat.weights"] = parts["natural"].pop("proj_feat.weight")
        torch.save(parts, tmp_path / "wrong.pth")
        server.body = (tmp_path / "wrong.pth").read_bytes()
    else:  # an error page too long to be read: the client hangs up while the server still writes it
        server.status, server.body = int(case), bytes(16 << 20)
    code, out, err = score(capsys, "--no-progress", *files[1:])
    server.wait_answered()
    err += capsys.readouterr().err  # the server thread prints nothing there, even once the client has hung up
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {server_url()}: cannot download the A-FINE weights ("), err
    assert reason in err and f"put it at {cache_path()}, or give --weights FILE" in err
    assert [p.name for p in cache_path().parent.iterdir()] == ["afine.pth.lock"]  # no file, no temp file left
    server.status, server.length, server.body = 200, None, files[0].read_bytes()
    assert score(capsys, "--no-progress", *files[1:])[0] == 0  # the next use downloads it afresh


def test_no_network_is_one_error_line(files, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AFINE_WEIGHTS_URL", f"http://127.0.0.1:{port}/afine.pth")
    code, out, err = score(capsys, "--no-progress", *files[1:])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: http://127.0.0.1:{port}/afine.pth: cannot download the A-FINE weights (")
    assert f"put it at {cache_path()}" in err


@pytest.mark.parametrize("switch", ["--offline", "AFINE_OFFLINE=1", "HF_HUB_OFFLINE=1"])
def test_offline_never_downloads_but_uses_the_cache(files, server, monkeypatch, capsys, switch):
    args = [switch] if switch.startswith("--") else []
    if not args:
        monkeypatch.setenv(*switch.split("="))
    code, out, err = score(capsys, "--no-progress", *args, *files[1:])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err == (f"error: {cache_path()}: the released A-FINE weights are not there and downloads are off "
                   f"({switch}); download {server_url()} and put it at {cache_path()}, or give --weights FILE\n")
    assert server.requests == 0
    cache_path().parent.mkdir(parents=True)
    cache_path().write_bytes(files[0].read_bytes())
    assert score(capsys, "--no-progress", *args, *files[1:])[0] == 0
    assert server.requests == 0


def test_concurrent_first_uses_download_once_and_agree(files, server):
    server.delay = 0.5  # both start while the first download is under way
    results, errors = [], []

    def first_use():
        try:
            results.append(released_weights(progress=False))
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and results == [cache_path(), cache_path()]
    assert server.requests == 1
    assert cache_path().read_bytes() == files[0].read_bytes()


def command(*args: str) -> subprocess.Popen:
    """`python -m afine score --no-progress ARGS` started through tests/procs.py: whatever happens, nothing of it
    outlives the test."""
    return procs.start([sys.executable, "-m", "afine", "score", "--no-progress", *args], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def score_or_hang(capsys, *args) -> tuple[int, str, str]:
    """score(), in a thread: one still running after HANG_S fails the test (the server fixture's finalizer then
    closes the connection it waits on, so that it ends)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(score(capsys, *args)), daemon=True)
    thread.start()
    thread.join(HANG_S)
    if thread.is_alive():
        pytest.fail(f"the download still ran after {HANG_S} s")
    return result[0]


def finished(proc: subprocess.Popen) -> tuple[int, str, str]:
    """The command's exit code, stdout and stderr; a command still running after HANG_S, or a process of it left
    once it ended, fails the test."""
    out, err = procs.finish(proc, HANG_S)
    return proc.returncode, out, err


def assert_failed_download(code: int, out: str, err: str, *reasons: str) -> None:
    assert code == 2 and out == "", err
    assert err.count("\n") == 1 and err.startswith(f"error: {server_url()}: cannot download the A-FINE weights ("), err
    assert all(reason in err for reason in reasons), err
    assert [p.name for p in cache_path().parent.iterdir()] == ["afine.pth.lock"]


@pytest.mark.parametrize("mode, stall_after, reasons", [
    ("trickle", 0, ("(the transfer slowed to ", " bytes/s over ", " s, under the minimum of 1000 "
                    "(AFINE_DOWNLOAD_MIN_RATE), after ", " bytes); download the file yourself")),
    ("trickle", 300_000, ("the transfer slowed to ", "(AFINE_DOWNLOAD_MIN_RATE), after 3000")),
    ("stall", 300_000, ("after 300000 bytes",)),
    ("trickled headers", 0, ("(no response within 2 s (AFINE_DOWNLOAD_TIMEOUT)); download",)),
])
def test_a_slow_or_stalled_server_is_given_up_on(files, server, monkeypatch, capsys, mode, stall_after, reasons):
    """A byte every 0.2 s (before: never timed out), 300 kB then nothing (before: "after 0 bytes"), or response
    headers trickled: one error line within seconds (AFINE_DOWNLOAD_TIMEOUT=2), with the real byte count."""
    server.mode, server.stall_after = mode, stall_after
    monkeypatch.setenv("AFINE_DOWNLOAD_TIMEOUT", "2")
    monkeypatch.setenv("AFINE_DOWNLOAD_MIN_RATE", "1000")
    assert_failed_download(*score_or_hang(capsys, "--no-progress", *files[1:]), *reasons)


def test_a_redirect_loop_is_one_error_line(files, server, capsys):
    server.mode = "redirect loop"
    code, out, err = score(capsys, "--no-progress", *files[1:])
    assert_failed_download(code, out, err, f"redirected in a loop or more than 10 times (HTTP 302, last at "
                                           f"{server_url()})")


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_bad_download_settings_are_one_error_line(files, server, monkeypatch, capsys, value):
    for name in ("AFINE_DOWNLOAD_TIMEOUT", "AFINE_DOWNLOAD_MIN_RATE"):
        if name == "AFINE_DOWNLOAD_MIN_RATE" and value == "0":
            continue  # 0: no minimum rate
        monkeypatch.setenv(name, value)
        code, out, err = score(capsys, "--no-progress", *files[1:])
        assert code == 2 and out == "" and err.startswith(f"error: {name}={value}: expected a number") and \
            err.count("\n") == 1, err
        monkeypatch.delenv(name)
    assert server.requests == 0


def test_sigterm_mid_download_leaves_no_temp_file(files, server):
    """Before: the hidden temp file (up to 610 MB) stayed. Now the command removes it, then ends as SIGTERM ends a
    process (exit status 143 in a shell), printing nothing."""
    server.mode, server.stall_after = "trickle", 100_000
    folder = cache_path().parent
    proc = command(*map(str, files[1:]))
    deadline = time.monotonic() + HANG_S
    while not list(folder.glob(".afine.pth.*.tmp")):  # the download is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    while os.path.getsize(next(folder.glob(".afine.pth.*.tmp"))) < 50_000:  # the file object buffers 8 kB
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finished(proc)
    assert code == -signal.SIGTERM and out == "" and err == ""
    assert [p.name for p in folder.iterdir()] == ["afine.pth.lock"]


def test_the_next_download_removes_temp_files_of_dead_downloads_only(files, server, capsys):
    """A download killed outright (SIGKILL, a power cut) leaves its temp file; the next download removes those of
    this machine's processes that are gone, never one of a live process (however old), of another machine, or a
    file that is not a download's."""
    folder = cache_path().parent
    folder.mkdir(parents=True)
    gone = procs.start([sys.executable, "-c", "pass"])
    procs.finish(gone, HANG_S)
    prefix = temp_prefix(cache_path())
    this_host = prefix.rsplit("-", 1)[0]
    dead = f"{this_host}-{gone.pid}.k3x_a9z0.tmp"
    live = f"{this_host}-{os.getppid()}.q8w7e6r5.tmp"
    other = prefix.replace(".dl-", ".dl-elsewhere") + "abcdefgh.tmp"
    foreign = [live, other, ".afine.pth.abcdefgh.tmp", f"{this_host}-{gone.pid}.notes"]
    for name in [dead, *foreign]:
        (folder / name).write_bytes(b"partial")
    code, _, err = score(capsys, "--no-progress", *files[1:])
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == sorted(["afine.pth", "afine.pth.lock", *foreign])


def test_a_damaged_cached_file_says_to_delete_it(files, server, capsys):
    """A cached afine.pth cut short (a copy interrupted, a disk error): before, the error named the file but gave
    no remedy; now it says to delete it and run again, which downloads it afresh."""
    cache_path().parent.mkdir(parents=True)
    cache_path().write_bytes(files[0].read_bytes()[:100_000])
    code, out, err = score(capsys, "--no-progress", *files[1:])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {cache_path()}")
    assert err.endswith(f"(the released weights downloaded to {cache_path()} are damaged: delete that file and run "
                        "again to download them afresh)\n")
    assert server.requests == 0
    with pytest.raises(AfineError, match="are damaged: delete that file"):
        AFINELoss(cache_path())
    copy = cache_path().with_name("copy.pth")
    copy.write_bytes(cache_path().read_bytes())
    with pytest.raises(AfineError) as other:  # a damaged file of the user's own: no such advice
        AFINELoss(copy)
    assert "delete" not in str(other.value)
    cache_path().unlink()
    copy.unlink()
    code, _, err = score(capsys, "--no-progress", *files[1:])
    assert code == 0 and server.requests == 1, err
