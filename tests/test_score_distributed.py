"""`torchrun -m afine score`: two Gloo processes print and write exactly what one process does; an image found
unreadable in one rank's share is one error line after the others' scores, and no hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from afine.score import check_pairs, plan_batches
from tests.tiny import random_afine, tiny_clip, write_checkpoints

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """7 pairs in two image sizes under dis/ and ref/ (paired by name), and the weights."""
    root = tmp_path_factory.mktemp("dist")
    weights = write_checkpoints(root / "ckpt", random_afine(tiny_clip(seed=5)))["afine"]
    rng = np.random.default_rng(3)
    for i in range(7):
        shape = (40, 56, 3) if i % 3 else (48, 32, 3)
        base = rng.integers(0, 256, shape).astype(np.int16)
        (root / "ref").mkdir(exist_ok=True)
        (root / "dis").mkdir(exist_ok=True)
        Image.fromarray(base.astype(np.uint8)).save(root / "ref" / f"{i}.png")
        noisy = np.clip(base + rng.integers(-50, 50, shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / "dis" / f"{i}.png")
    return root, weights


def score(launcher: list[str], *args) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, "-m", "afine", "score", "--no-progress", "--device", "cpu", *map(str, args)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)


def test_two_processes_print_and_write_the_bytes_of_one(folders):
    root, weights = folders
    args = ["--weights", weights, root / "dis", root / "ref", "--batch-size", "2"]
    one = score([sys.executable], *args, "--csv", root / "one.csv")
    two = score(TORCHRUN, *args, "--csv", root / "two.csv")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert len(one.stdout.splitlines()) == 1 + 7 + 1  # header, 7 pairs, mean
    assert two.stdout == one.stdout
    assert (root / "two.csv").read_bytes() == (root / "one.csv").read_bytes()


def test_a_bad_image_in_the_second_rank_is_one_error_line_and_no_hang(folders, tmp_path):
    root, weights = folders
    bad = tmp_path / "bad.png"
    data = (root / "dis" / "1.png").read_bytes()
    bad.write_bytes(data[:len(data) // 2])  # a readable header, a truncated image: found only when decoded
    pairs = [(bad, root / "ref" / "2.png")] + [(root / "dis" / f"{i}.png", root / "ref" / f"{i}.png")
                                               for i in (0, 1, 3, 4, 5, 6)]
    (tmp_path / "pairs.txt").write_text("".join(f"{d},{r}\n" for d, r in pairs))
    second_rank = [i for batch in plan_batches(pairs, check_pairs(pairs), 1)[1::2] for i in batch]
    assert 0 in second_rank  # the bad image is decoded by rank 1 only
    one = score([sys.executable], "--weights", weights, "--pairs", tmp_path / "pairs.txt", "--batch-size", "1")
    two = score(TORCHRUN, "--weights", weights, "--pairs", tmp_path / "pairs.txt", "--batch-size", "1")
    assert one.returncode == 2
    assert [line.split()[0] for line in one.stdout.splitlines()[1:-1]] == [str(d) for d, _ in pairs[1:]]
    assert len(one.stderr.splitlines()) == 1 and one.stderr.startswith(f"error: 1 pair(s) not scored (the 6 others "
                                                                        f"are in the output): {bad} (cannot read")
    assert two.returncode != 0 and two.stdout == one.stdout  # the others' scores, printed once
    errors = [line for line in two.stderr.splitlines() if "error:" in line]
    assert errors == one.stderr.splitlines()
