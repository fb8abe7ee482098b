"""Two Gloo processes started with torchrun against one process: with shuffling on and all four datasets (mixed
image sizes), `--batch_size=4` on two processes, `--batch_size=8` on one and `--batch_size=4 --grad_accum=2` on
one train on the same global batches and end at the same weights; validation is reduced across ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import train_stage1
from afine import config, synth
from afine.distributed import Dist
from tests import procs
from tests.test_train import args

ROOT = Path(__file__).resolve().parents[1]

RUNNER = """
import sys
import torch
sys.path.insert(0, {root!r})
import train_stage{stage} as script
from afine import config, distributed

torch.set_num_threads(1)
cfg = config.parse_args(script.Stage{stage}Config, sys.argv[1:])
d = distributed.setup(cfg.device)
model = script.train(cfg, d)
torch.save(model.state_dict(), f"{{cfg.out_dir}}/rank{{d.rank}}.pt")
distributed.close(d)
"""  # a torchrun entry point: train stage {stage} and save each rank's weights


def on_two_processes(stage: int, argv: list[str], tmp_path: Path) -> list[dict[str, torch.Tensor]]:
    """Train stage `stage` with `argv` on two Gloo processes started by torchrun: each rank's final weights."""
    runner = tmp_path / f"runner{stage}.py"
    runner.write_text(RUNNER.format(root=str(ROOT), stage=stage))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", runner, *argv]
    proc = procs.run(cmd, env=env, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(next(a for a in argv if a.startswith("--out_dir=")).split("=", 1)[1])
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


@pytest.fixture(scope="module")
def few(tmp_path_factory, request) -> Path:
    """The small synthetic corpus with a third of its references: the four datasets' image sizes, validation
    lists of every kind, and a fraction of the images to decode and encode."""
    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    mp.setitem(synth.SCALES, "few", dataclasses.replace(synth.SCALES["small"], references=10, diffiqa_references=10))
    data = tmp_path_factory.mktemp("few")
    synth.generate(data, seed=0, scale="few", progress=False)
    return data


def test_two_processes_end_where_one_process_ends_on_the_same_global_batches(few, tmp_path):
    data = few
    datasets = "DiffIQA,KADID10K,PIPAL,TID2013"
    # The runs group the triplets into other micro-batches, so their sums are taken in another order and differ
    # by float32 rounding (about 1e-7 in the weights after a step). Adam divides each gradient by its own
    # magnitude: a gradient of pure rounding noise (the loss depends on N only through differences, so the
    # head's last bias and the attention key bias get one; a few other entries are near zero) would become
    # +-lr in either run. Adam's eps at 1e-2 damps that (an update is lr * g / (|g| + eps)), and lr 1e-2 keeps
    # the real updates large: the weights then agree to about 1e-7 while CLIP moves by over 1e-4.
    common = {"clip": "random-tiny", "total_iter": 4, "val_every": 2, "save_every": 2, "micro_batch": 6,
              "train_datasets": datasets, "val_datasets": "KADID10K,DiffIQA", "lr.clip": 1e-2,
              "lr.natural": 1e-2, "optim.eps": 1e-2}
    rank0, rank1 = on_two_processes(1, args(data, tmp_path / "two", batch_size=4, **common), tmp_path)
    cfg = config.parse_args(train_stage1.Stage1Config, args(data, tmp_path / "one", batch_size=8, **common))
    start = train_stage1.build_model(cfg).state_dict()
    one = train_stage1.train(cfg, Dist()).state_dict()
    cfg = config.parse_args(train_stage1.Stage1Config, args(data, tmp_path / "acc", batch_size=4, grad_accum=2,
                                                            **common))
    accumulated = train_stage1.train(cfg, Dist()).state_dict()
    for k, v in one.items():
        assert torch.equal(rank0[k], rank1[k]), k
        torch.testing.assert_close(rank0[k], v, rtol=0, atol=1e-5, msg=k)
        torch.testing.assert_close(accumulated[k], v, rtol=0, atol=1e-5, msg=k)
    block = "clip.visual.transformer.resblocks.0.attn.in_proj_weight"
    assert (one[block] - start[block]).abs().max() > 1e-4  # CLIP did train, far beyond the tolerance

    def records(run):
        return [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    val = {run: [(r["step"], r["val_pairs"], r["val"]) for r in records(run) if "val" in r] for run in ("one", "two")}
    assert [v[0] for v in val["two"]] == [0, 2, 4] and val["two"][0][1] > 0
    for a, b in zip(val["two"], val["one"], strict=True):  # the ranks' shares of the validation lists add up
        assert a[:2] == b[:2], (a, b)  # step and pair count
        assert a[2].keys() == b[2].keys() and all(abs(a[2][k] - b[2][k]) < 0.02 for k in a[2]), (a, b)
    loss = {run: [r["loss"] for r in records(run) if "loss" in r] for run in ("one", "two")}
    assert len(loss["two"]) == 4 and all(abs(a - b) < 1e-5 for a, b in zip(loss["two"], loss["one"]))
    state = json.loads((tmp_path / "two" / "state" / "step_00000004.json").read_text())
    assert state["global_batch"] == 8
