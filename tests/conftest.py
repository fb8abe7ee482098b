"""Every test runs with its own empty torch cache and a download address that refuses connections, so no test
reads the user's cached weights or reaches the network; with one torch thread; and leaves no process behind."""

from __future__ import annotations

import pytest
import torch

from tests import procs


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread in the test process, as the commands the tests start have (OMP_NUM_THREADS=1): on a
    small, busy machine (CI: 2 cores at load 4) the threads of tiny operations mostly wait for each other, which
    made tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """The small synthetic corpus (seed 0), generated once for the whole run: a module copies it
    (shutil.copytree) rather than generating it again, and no test writes into it."""
    from afine import synth

    root = tmp_path_factory.mktemp("small_corpus")
    synth.generate(root, seed=0, scale="small", progress=False)
    return root


@pytest.fixture(autouse=True)
def no_released_weights(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    monkeypatch.setenv("AFINE_WEIGHTS_URL", "http://127.0.0.1:9/afine.pth")  # port 9 (discard): nothing listens
    for name in ("AFINE_WEIGHTS", "AFINE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def no_process_left():
    """A command a test started (tests/procs.py) and left running is killed with its whole process group when
    the test ends, and fails the test."""
    yield
    left = procs.teardown()
    if left:
        pytest.fail("still running at the end of the test (killed):\n" + "\n".join(left), pytrace=False)
