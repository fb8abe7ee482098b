"""`torchrun -m afine compare`: two Gloo processes print and write, byte for byte, what one process does (the
table, the JSON and CSV files, the report), and leave no process behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import procs
from tests.test_score_distributed import ENV, ROOT, TORCHRUN
from tests.tiny import random_afine, tiny_clip, write_checkpoints


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """HR/<set>/ with 5 and 2 references in two sizes, three methods' outputs, and the weights."""
    root = tmp_path_factory.mktemp("dist")
    weights = write_checkpoints(root / "ckpt", random_afine(tiny_clip(seed=5)))["afine"]
    rng = np.random.default_rng(3)
    for name, n in (("S1", 5), ("S2", 2)):
        for i in range(n):
            shape = (40, 56, 3) if i % 3 else (48, 32, 3)
            base = rng.integers(0, 256, shape).astype(np.int16)
            for folder, noise in (("HR", 0), ("a", 20), ("b", 50), ("c", 35)):
                (root / folder / name).mkdir(parents=True, exist_ok=True)
                image = np.clip(base + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(root / folder / name / f"{i}.png")
    return root, weights


def compare(launcher: list[str], root: Path, weights: Path, out: str) -> subprocess.CompletedProcess:
    """The command, bounded and leaving nothing behind (tests/procs.py)."""
    args = [*launcher, "-m", "afine", "compare", "--no-progress", "--device", "cpu", "--weights", str(weights),
            "--batch-size", "2", str(root / "HR"), *(str(root / m) for m in "abc"), "--json", str(root / f"{out}.json"),
            "--csv", str(root / f"{out}.csv"), "--html", str(root / out)]
    env = {**ENV, "TORCH_HOME": str(root / "torch")}  # the digest cache of the weights: the test's own
    return procs.run(args, cwd=ROOT, env=env, timeout=240)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_processes_print_and_write_the_bytes_of_one(corpus):
    root, weights = corpus
    one = compare([sys.executable], root, weights, "one")
    two = compare(TORCHRUN, root, weights, "two")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert "**S1: 5 images**" in one.stdout and "**S2: 2 images**" in one.stdout
    assert two.stdout == one.stdout
    for suffix in (".json", ".csv"):
        assert (root / f"two{suffix}").read_bytes() == (root / f"one{suffix}").read_bytes()
    report = files(root / "one")
    assert len(report) == 2 + 7 * 4  # index.html, the marker, a thumbnail per image
    assert files(root / "two") == report
