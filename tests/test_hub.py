"""hubconf.py: torch.hub.load gives the scoring model and the loss, with the released weights (downloaded on first
use, here from a local server) or weights of one's own; torch.hub.list and help show the two entry points."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from afine.afine_loss import AFINELoss
from afine.errors import AfineError
from afine.model import AFINE, TERMS, load_afine
from tests import procs
from tests.tiny import random_afine, tiny_clip, write_checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("hub") / "ckpt", random_afine(tiny_clip(seed=6)))["afine"]


def images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    ref = rng.random((2, 3, 40, 56), dtype=np.float32)
    dis = np.clip(ref + rng.normal(0, 0.1, ref.shape), 0, 1).astype(np.float32)
    return torch.from_numpy(dis), torch.from_numpy(ref)


def test_afine_entry_point_is_the_scoring_model(weights):
    model = torch.hub.load(str(ROOT), "afine", source="local", weights=weights)
    assert isinstance(model, AFINE) and not model.training
    dis, ref = images()
    with torch.no_grad():
        got, expected = model(dis, ref), load_afine(weights)(dis, ref)
    assert list(got) == list(TERMS)
    for term in TERMS:
        torch.testing.assert_close(got[term], expected[term], rtol=0, atol=0)


def test_afine_loss_entry_point_is_the_loss(weights):
    criterion = torch.hub.load(str(ROOT), "afine_loss", source="local", term="afine_fr", weights=weights,
                               reduction="none")
    assert isinstance(criterion, AFINELoss) and (criterion.term, criterion.reduction) == ("afine_fr", "none")
    dis, ref = images(1)
    with torch.no_grad():
        expected = load_afine(weights)(dis, ref)["afine_fr"]
    torch.testing.assert_close(criterion(dis, ref), expected, rtol=1e-5, atol=1e-6)
    assert torch.hub.load(str(ROOT), "afine_loss", source="local", weights=weights).term == "afine_all"


def test_no_released_weights_and_downloads_off_is_the_download_error(monkeypatch):
    monkeypatch.setenv("AFINE_OFFLINE", "1")
    with pytest.raises(AfineError, match="the released A-FINE weights are not there and downloads are off"):
        torch.hub.load(str(ROOT), "afine", source="local")


CLONE_USER = """
import json, sys, torch
clone, cached, dis, ref = sys.argv[1:5]
model = torch.hub.load(clone, "afine", source="local")  # the released weights: downloaded on first use
import afine
assert afine.__file__.startswith(clone), afine.__file__  # the clone's package, not another
with torch.no_grad():
    terms = model(torch.load(dis), torch.load(ref))
criterion = torch.hub.load(clone, "afine_loss", source="local")
print(json.dumps({"terms": {k: v.tolist() for k, v in terms.items()}, "loss": criterion.term,
                  "list": torch.hub.list("someone/afine:main", trust_repo=True),
                  "help": torch.hub.help("someone/afine:main", "afine", trust_repo=True),
                  "help_loss": torch.hub.help("someone/afine:main", "afine_loss", trust_repo=True)}))
"""


def test_a_clone_loads_the_released_weights_and_lists_its_entry_points(weights, tmp_path):
    """A new user's clone, used from another folder: the released weights come from the (local) server into the
    torch hub cache; torch.hub.list and help, on the clone as torch.hub keeps a GitHub checkout, show the entry
    points and their docstrings (nothing reaches the network)."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "afine", clone / "afine", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "hubconf.py", clone / "hubconf.py")
    home = tmp_path / "torch_home"
    shutil.copytree(clone, home / "hub" / "someone_afine_main")  # where torch.hub keeps "someone/afine:main"
    dis, ref = images(2)
    torch.save(dis, tmp_path / "dis.pt")
    torch.save(ref, tmp_path / "ref.pt")

    body = weights.read_bytes()
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AFINE_WEIGHTS")}
    env.update(TORCH_HOME=str(home), OMP_NUM_THREADS="1", no_proxy="127.0.0.1", NO_PROXY="127.0.0.1",
               AFINE_WEIGHTS_URL=f"http://127.0.0.1:{httpd.server_address[1]}/afine.pth")
    user = tmp_path / "elsewhere"
    user.mkdir()
    try:
        proc = procs.run([sys.executable, "-c", CLONE_USER, str(clone), str(home / "hub" / "checkpoints"),
                          str(tmp_path / "dis.pt"), str(tmp_path / "ref.pt")], cwd=user, env=env, timeout=180)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert requests == ["/afine.pth"]  # once: the loss reused the cached file
    assert (home / "hub" / "checkpoints" / "afine.pth").read_bytes() == body
    out = json.loads(proc.stdout.splitlines()[-1])
    with torch.no_grad():
        expected = load_afine(weights)(dis, ref)
    for term in TERMS:
        assert out["terms"][term] == pytest.approx(expected[term].tolist(), rel=1e-6, abs=1e-6)
    assert out["loss"] == "afine_all"
    assert out["list"] == ["afine", "afine_loss"]
    assert out["help"].startswith("A-FINE scoring model in eval mode") and "torch.hub.load(" in out["help"]
    assert out["help_loss"].startswith("A-FINE as a training loss") and "torch.hub.load(" in out["help_loss"]
