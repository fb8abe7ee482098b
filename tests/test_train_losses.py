"""The stage scripts' log.jsonl numbers, pinned: a tiny deterministic run of each stage (stages 2 and 3 with and
without cached statistics) logs the losses, gradient norms and validation accuracies recorded in
tests/train_losses.json by the code before the training core was reorganised (the run folder in its own module,
one path per stage loop), so that reorganisation, and any later one, changes no number.

The fixture was made on commit 55a7cab (before the reorganisation), on a 2-core x86-64 CPU, with this file:

    git worktree add /tmp/before 55a7cab && cp tests/test_train_losses.py /tmp/before/tests/
    cd /tmp/before && python -m tests.test_train_losses tests/train_losses.json   # then copy it back

The scripts are driven through their command lines only (`main(argv)`), which both versions share. Float
results are bitwise only on the same torch build and CPU kernels (another instruction set sums in another
order): the test compares exactly where the fixture's torch version and CPU capability are those of the machine
running it, and to 1e-5 (relative) elsewhere.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import train_stage1
import train_stage2
import train_stage3
from tests.test_train import args, one_thread, square_corpus  # noqa: F401 - one_thread: a module fixture

FIXTURE = Path(__file__).with_name("train_losses.json")
# four steps of two micro-batches (batch 4, at most 6 images per CLIP pass), validation at steps 0, 2 and 4
COMMON = {"total_iter": 4, "val_every": 2, "save_every": 2, "micro_batch": 6}
RUNS = {  # name: (script, its own keys); the earlier stages' folders are filled in by stage_logs
    "s1": (train_stage1, {"clip": "random-tiny", "lr.clip": 1e-3, "lr.natural": 1e-3}),
    "s2": (train_stage2, {"lr.fidelity": 1e-2}),
    "s2_cached": (train_stage2, {"lr.fidelity": 1e-2, "cache": "true"}),
    "s3": (train_stage3, {"lr.natural_scale": 1e-2, "lr.fidelity_scale": 1e-2, "lr.adapter": 1e-2}),
    "s3_cached": (train_stage3, {"lr.natural_scale": 1e-2, "lr.fidelity_scale": 1e-2, "lr.adapter": 1e-2,
                                 "cache": "true"}),
}


def fingerprint() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def numbers(obj) -> list[float]:
    """Every number in a nest of lists and dicts, in order."""
    if isinstance(obj, dict):
        return [x for k in sorted(obj) for x in numbers(obj[k])]
    if isinstance(obj, list):
        return [x for v in obj for x in numbers(v)]
    return [obj]


def shape(obj):
    """The nest with its numbers left out: the keys and lengths."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items()}
    return [shape(v) for v in obj] if isinstance(obj, list) else None


def stage_logs(data_root: Path, runs: Path) -> dict[str, dict]:
    """Each run's logged steps [step, loss, grad_norm] and validations [step, val_mean, {list: accuracy}]."""
    logs = {}
    for name, (script, own) in RUNS.items():
        earlier = {"s2": {"stage1_dir": runs / "s1"}, "s3": {"stage2_dir": runs / "s2"}}.get(name[:2], {})
        argv = args(data_root, runs / name, **COMMON, **own, **earlier)
        assert script.main(argv) == 0, name
        records = [json.loads(line) for line in (runs / name / "log.jsonl").read_text().splitlines()]
        logs[name] = {"steps": [[r["step"], r["loss"], r["grad_norm"]] for r in records if "loss" in r],
                      "validations": [[r["step"], r["val_mean"], r["val"]] for r in records if "val" in r]}
    return logs


def test_stage_scripts_log_the_numbers_of_the_code_before_the_reorganisation(tmp_path, capsys):
    pinned = json.loads(FIXTURE.read_text())
    logs = stage_logs(square_corpus(tmp_path / "data"), tmp_path / "runs")
    capsys.readouterr()
    assert logs.keys() == pinned["logs"].keys()
    for name, log in logs.items():
        assert [s for s, *_ in log["steps"]] == [1, 2, 3, 4] and [v[0] for v in log["validations"]] == [0, 2, 4]
        if pinned["made_with"] == fingerprint():
            assert log == pinned["logs"][name], name  # bit for bit
        else:
            assert shape(log) == shape(pinned["logs"][name]), name
            assert numbers(log) == pytest.approx(numbers(pinned["logs"][name]), rel=1e-5), name


if __name__ == "__main__":  # python -m tests.test_train_losses OUT.json: write the fixture with this checkout
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        logs = stage_logs(square_corpus(Path(tmp) / "data"), Path(tmp) / "runs")
    runs = ",\n".join(f"  {json.dumps(name)}: {json.dumps(log)}" for name, log in logs.items())
    Path(sys.argv[1]).write_text(f'{{"made_with": {json.dumps(fingerprint())},\n "logs": {{\n{runs}\n}}}}\n')
