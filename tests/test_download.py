"""The released weights on first use, served by a local HTTP server: download, reuse, bad transfers, offline."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from afine.__main__ import main
from afine.download import released_weights
from tests.tiny import random_afine, tiny_clip, write_checkpoints


class Served:
    """What the local server answers for GET /afine.pth: status, body, the Content-Length it declares (None: the
    body's), and a delay before the body; `requests` counts the GETs."""

    def __init__(self):
        self.status, self.body, self.length, self.delay, self.requests = 200, b"", None, 0.0, 0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("download")
    paths = write_checkpoints(folder / "ckpt", random_afine(tiny_clip(seed=4)))
    rng = np.random.default_rng(0)
    for name in ("dis", "ref"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return paths["afine"], folder / "dis.png", folder / "ref.png"


@pytest.fixture
def server(files, monkeypatch):
    served = Served()
    served.body = files[0].read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            served.requests += 1
            if self.path != "/afine.pth":
                self.send_error(404)
                return
            self.send_response(served.status)
            self.send_header("Content-Length", str(len(served.body) if served.length is None else served.length))
            self.end_headers()
            time.sleep(served.delay)
            self.wfile.write(served.body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    for name in ("no_proxy", "NO_PROXY"):  # a proxy from the environment must not carry requests to 127.0.0.1
        monkeypatch.setenv(name, "127.0.0.1")
    monkeypatch.setenv("AFINE_WEIGHTS_URL", f"http://127.0.0.1:{httpd.server_address[1]}/afine.pth")
    yield served
    httpd.shutdown()
    httpd.server_close()


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
    else:
        server.status = int(case)
    code, out, err = score(capsys, "--no-progress", *files[1:])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {server_url()}: cannot download the A-FINE weights (")
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
