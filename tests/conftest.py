"""Every test runs with its own empty torch cache and a download address that refuses connections, so no test
reads the user's cached weights or reaches the network."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def no_released_weights(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    monkeypatch.setenv("AFINE_WEIGHTS_URL", "http://127.0.0.1:9/afine.pth")  # port 9 (discard): nothing listens
    for name in ("AFINE_WEIGHTS", "AFINE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
