"""`--workers N` reaches what does the work: the DataLoader of evaluate.py and of training (N worker processes),
and the decoding thread pool of `afine score` (N threads). The results alone would not tell: any number of
workers gives the same bytes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import train_stage1
from afine.__main__ import main as afine_main
from evaluate import main as evaluate_main
from tests.test_evaluate import hand  # noqa: F401 - a module-scoped fixture, taken as a test parameter
from tests.test_train import args, square  # noqa: F401 - the same
from tests.tiny import random_afine, tiny_clip, write_checkpoints


@pytest.fixture
def loaders(monkeypatch) -> list[int]:
    """num_workers of every DataLoader built during the test."""
    seen, init = [], torch.utils.data.DataLoader.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        seen.append(self.num_workers)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", spy)
    return seen


@pytest.fixture
def pools(monkeypatch) -> list[int]:
    """max_workers of every thread pool made during the test."""
    seen, init = [], ThreadPoolExecutor.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        seen.append(self._max_workers)

    monkeypatch.setattr(ThreadPoolExecutor, "__init__", spy)
    return seen


def test_evaluate_workers_are_the_loader_workers(hand, loaders, capsys):  # noqa: F811
    run, data, _ = hand
    assert evaluate_main(["--bench", "kadid10k", "--data-root", str(data), "--weights", str(run), "--stage", "1",
                          "--workers", "1", "--no-progress"]) == 0
    assert loaders and set(loaders) == {1}  # (the default: min(4, cores))


def test_training_workers_are_the_loader_workers_of_training_and_validation(square, loaders, tmp_path):  # noqa: F811
    argv = args(square, tmp_path / "s1", clip="random-tiny", workers=1, total_iter=1, val_every=1)
    assert train_stage1.main(argv) == 0
    assert len(loaders) == 3 and set(loaders) == {1}  # validation at steps 0 and 1, training (default: 4)


@pytest.mark.parametrize("workers", [1, 3])
def test_score_workers_are_the_decoding_threads(pools, tmp_path, capsys, workers):
    weights = write_checkpoints(tmp_path / "ckpt", random_afine(tiny_clip(seed=2)))["afine"]
    rng = np.random.default_rng(0)
    for name in ("dis", "ref"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    assert afine_main(["score", "--no-progress", "--weights", str(weights), "--batch-size", "1", "--workers",
                       str(workers), str(tmp_path / "dis"), str(tmp_path / "ref")]) == 0
    assert workers in pools  # the decoding pool (header reading may have a pool of its own)
