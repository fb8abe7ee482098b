"""`torchrun -m afine score`: two Gloo processes print and write exactly what one process does, each scoring its
own share of the pairs, with rank 0 alone printing warnings; an image found unreadable in one rank's share is one
error line after the others' scores, and no hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from afine.__main__ import main
from afine.score import check_pairs, plan_batches
from tests import procs
from tests.tiny import random_afine, tiny_clip, write_checkpoints

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

# `python -m afine` that also writes, to SPY_DIR/rank<RANK>.json, the number of pairs in each batch the model
# scored in this process
SPY = """
import json, os, runpy, sys
from afine.model import AFINE

scored, score = [], AFINE.score
def counted(self, dis, *args, **kwargs):
    scored.append(len(dis))
    return score(self, dis, *args, **kwargs)
AFINE.score = counted
try:
    sys.argv = ["afine", *sys.argv[1:]]
    runpy.run_module("afine", run_name="__main__")
finally:
    with open(os.path.join(os.environ["SPY_DIR"], f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(scored, f)
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """8 pairs under dis/ and ref/ (paired by name) in two image sizes, and one pair of tiny images (a warning
    each), and the weights."""
    root = tmp_path_factory.mktemp("dist")
    weights = write_checkpoints(root / "ckpt", random_afine(tiny_clip(seed=5)))["afine"]
    rng = np.random.default_rng(3)
    for i in range(8):
        shape = (40, 56, 3) if i % 3 else (48, 32, 3)
        shape = (24, 40, 3) if i == 7 else shape
        base = rng.integers(0, 256, shape).astype(np.int16)
        (root / "ref").mkdir(exist_ok=True)
        (root / "dis").mkdir(exist_ok=True)
        Image.fromarray(base.astype(np.uint8)).save(root / "ref" / f"{i}.png")
        noisy = np.clip(base + rng.integers(-50, 50, shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / "dis" / f"{i}.png")
    return root, weights


def score(launcher: list[str], *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return procs.run([*launcher, "-m", "afine", "score", "--no-progress", "--device", "cpu", *args], cwd=ROOT,
                     env=env or ENV)


def score_here(capsys, *args) -> subprocess.CompletedProcess:
    """`afine score` in this process (one process, as without torchrun)."""
    capsys.readouterr()
    code = main(["score", "--no-progress", "--device", "cpu", *map(str, args)])
    return subprocess.CompletedProcess(args, code, *capsys.readouterr())


def test_two_processes_print_and_write_the_bytes_of_one_each_scoring_its_share(folders, tmp_path, capsys):
    root, weights = folders
    args = ["--weights", weights, root / "dis", root / "ref", "--batch-size", "2"]
    one = score_here(capsys, *args, "--csv", root / "one.csv")
    (tmp_path / "spy.py").write_text(SPY)
    two = procs.run([*TORCHRUN, tmp_path / "spy.py", "score", "--no-progress", "--device", "cpu", *args, "--csv",
                     root / "two.csv"], cwd=ROOT, env={**ENV, "SPY_DIR": str(tmp_path)})
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert len(one.stdout.splitlines()) == 1 + 8 + 1  # header, 8 pairs, mean
    assert two.stdout == one.stdout
    assert (root / "two.csv").read_bytes() == (root / "one.csv").read_bytes()
    warnings = [line for line in one.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and all("tiny image" in w for w in warnings)  # the 24x40 pair's two images
    assert [line for line in two.stderr.splitlines() if "warning: " in line] == warnings  # rank 0's alone
    shares = [sum(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in (0, 1)]
    assert sum(shares) == 8 and min(shares) > 0, shares  # each pair scored once, on one of the two processes


def test_a_bad_image_in_the_second_rank_is_one_error_line_and_no_hang(folders, tmp_path, capsys):
    root, weights = folders
    bad = tmp_path / "bad.png"
    data = (root / "dis" / "1.png").read_bytes()
    bad.write_bytes(data[:len(data) // 2])  # a readable header, a truncated image: found only when decoded
    pairs = [(bad, root / "ref" / "2.png")] + [(root / "dis" / f"{i}.png", root / "ref" / f"{i}.png")
                                               for i in (0, 1, 3, 4, 5, 6)]
    (tmp_path / "pairs.txt").write_text("".join(f"{d},{r}\n" for d, r in pairs))
    second_rank = [i for batch in plan_batches(pairs, check_pairs(pairs), 1)[1::2] for i in batch]
    assert 0 in second_rank  # the bad image is decoded by rank 1 only
    one = score_here(capsys, "--weights", weights, "--pairs", tmp_path / "pairs.txt", "--batch-size", "1")
    two = score(TORCHRUN, "--weights", weights, "--pairs", tmp_path / "pairs.txt", "--batch-size", "1")
    assert one.returncode == 2
    assert [line.split()[0] for line in one.stdout.splitlines()[1:-1]] == [str(d) for d, _ in pairs[1:]]
    assert len(one.stderr.splitlines()) == 1 and one.stderr.startswith(f"error: 1 pair(s) not scored (the 6 others "
                                                                        f"are in the output): {bad} (cannot read")
    assert two.returncode != 0 and two.stdout == one.stdout  # the others' scores, printed once
    errors = [line for line in two.stderr.splitlines() if "error:" in line]
    assert errors == one.stderr.splitlines()
