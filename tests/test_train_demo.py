"""The demo configs train all three stages on the small synthetic corpus with a tiny random CLIP on CPU,
and each stage ends with a higher validation 2AFC accuracy than it started with.

To stay fast, each stage runs only the first steps of its demo config (same learning rates, batch sizes
and schedule; `total_iter` and `val_every` shortened)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import train_stage1
import train_stage2
import train_stage3

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_demo_configs_raise_validation_accuracy(tmp_path, capsys, small_corpus):
    data = tmp_path / "data"
    shutil.copytree(small_corpus, data)  # synth.generate(seed=0, scale="small"), made once a run
    runs = {stage: tmp_path / f"s{stage}" for stage in (1, 2, 3)}
    stages = ((1, train_stage1, [], 30), (2, train_stage2, [f"--stage1_dir={runs[1]}"], 20),
              (3, train_stage3, [f"--stage2_dir={runs[2]}"], 20))
    for stage, script, extra, steps in stages:
        argv = ["--config", str(ROOT / "configs" / f"demo_s{stage}.json"), f"--data_root={data}",
                f"--out_dir={runs[stage]}", f"--total_iter={steps}", f"--val_every={steps}", *extra]
        assert script.main(argv) == 0, capsys.readouterr().err[-2000:]
        log = [json.loads(line) for line in (runs[stage] / "log.jsonl").read_text().splitlines()]
        val = [(r["step"], r["val_mean"]) for r in log if "val_mean" in r]
        assert val[0][0] == 0 and val[-1][0] == max(r.get("step", 0) for r in log)
        assert val[-1][1] > val[0][1], f"stage {stage}: validation accuracy {val}"
        if stage > 1:  # the published way: on the frozen networks' cached statistics, as configs/s2.json, s3.json
            assert json.loads((ROOT / "configs" / f"s{stage}.json").read_text())["cache"] is True
            assert (runs[stage] / "cache").is_dir() and any((runs[stage] / "cache").glob("*/manifest.json"))
    assert (runs[3] / "afine.pth").is_file()
