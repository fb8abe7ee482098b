"""Two Gloo processes started with torchrun: identical weights on both ranks, equal to one process on the
same global batch (the fine-tuned CLIP's gradients are averaged too), validation reduced across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import train_stage1
from afine import config
from afine.distributed import Dist
from tests.test_train import args, square_corpus

ROOT = Path(__file__).resolve().parents[1]

RUNNER = """
import sys
import torch
sys.path.insert(0, {root!r})
import train_stage1
from afine import config, distributed

torch.set_num_threads(1)
cfg = config.parse_args(config.Stage1Config, sys.argv[1:])
d = distributed.setup(cfg.device)
model = train_stage1.train(cfg, d)
torch.save(model.state_dict(), f"{{cfg.out_dir}}/rank{{d.rank}}.pt")
distributed.close(d)
"""


def test_two_process_gloo_run_matches_one_process_on_the_same_global_batch(tmp_path):
    # 4 references x 10 triplets, one image shape, fixed order: the two ranks' batches of 4 together are
    # exactly the one-process batch of 8 at every step (5 steps an epoch; 6 steps cross into epoch 1).
    data = square_corpus(tmp_path / "data", refs=4)
    # Adam's eps at 1e-4: the loss depends on N only through differences, so the head's last bias (and the
    # attention key bias) get a gradient of pure rounding noise, which Adam with eps 1e-8 would blow up to
    # +-lr per step in either run; the real gradients here are far above 1e-4.
    common = {"clip": "random-tiny", "total_iter": 6, "val_every": 3, "shuffle": "false", "save_every": 3,
              "lr.clip": 1e-3, "lr.natural": 1e-3, "optim.eps": 1e-4}
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(runner),
           *args(data, tmp_path / "two", batch_size=4, **common)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cfg = config.parse_args(config.Stage1Config, args(data, tmp_path / "one", batch_size=8, **common))
    start = train_stage1.build_model(cfg).state_dict()
    one = train_stage1.train(cfg, Dist()).state_dict()
    rank0 = torch.load(tmp_path / "two" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "two" / "rank1.pt", weights_only=True)
    for k, v in one.items():
        assert torch.equal(rank0[k], rank1[k]), k
        torch.testing.assert_close(rank0[k], v, rtol=0, atol=1e-5, msg=k)
    block = "clip.visual.transformer.resblocks.0.attn.in_proj_weight"
    assert (one[block] - start[block]).abs().max() > 1e-3  # CLIP did train, far beyond the tolerance

    def records(run):
        return [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    val = {run: [(r["step"], r["val_pairs"], r["val"]) for r in records(run) if "val" in r] for run in ("one", "two")}
    assert [v[0] for v in val["two"]] == [0, 3, 6] and val["two"][0][1] > 0
    assert val["two"] == val["one"]  # the ranks' shares of the validation lists add up to the whole
    loss = {run: [r["loss"] for r in records(run) if "loss" in r] for run in ("one", "two")}
    assert len(loss["two"]) == 6 and all(abs(a - b) < 1e-5 for a, b in zip(loss["two"], loss["one"]))
    state = torch.load(tmp_path / "two" / "state" / "step_00000006.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
