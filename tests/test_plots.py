"""Training curves (`python -m afine curves`), and what commands that ask for no picture import."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from afine.__main__ import main
from afine.plots import run_curves
from tests import procs
from tests.test_train import square_corpus

ROOT = Path(__file__).resolve().parents[1]


def write_log(path: Path, records: list[dict], partial: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + partial)


def training_log(losses: list[float], means: dict[int, float], best: list[int]) -> list[dict]:
    records = [{"event": "fresh", "step": 0, "time": 0.0}]
    for step in range(len(losses) + 1):
        if step:
            records.append({"step": step, "loss": losses[step - 1], "lr": {"natural": 1e-3}, "grad_norm": 1.0,
                            "steps_per_s": 5.0, "time": float(step)})
        if step in means:
            records.append({"step": step, "val": {"KADID10K": means[step]}, "val_mean": means[step],
                            "time": float(step), **({"best": "best/"} if step in best else {})})
    return records


def test_curves_of_two_runs_one_still_going_are_one_png_of_the_set_size(tmp_path, capsys):
    write_log(tmp_path / "lr1e-3" / "log.jsonl", training_log([0.9, 0.7, 0.6, 0.5], {0: 0.5, 2: 0.7, 4: 0.65}, [0, 2]))
    write_log(tmp_path / "lr1e-2" / "log.jsonl", training_log([0.8, 0.4, 0.3], {0: 0.5, 2: 0.75}, [0, 2]),
              partial='{"step": 4, "loss": 0.2')  # a run being written: its last line is not complete yet
    first = run_curves(tmp_path / "lr1e-3")
    assert first["loss"] == [(1, 0.9), (2, 0.7), (3, 0.6), (4, 0.5)]
    assert first["val"] == [(0, 0.5), (2, 0.7), (4, 0.65)] and first["best"] == (2, 0.7)
    going = run_curves(tmp_path / "lr1e-2" / "log.jsonl")
    assert going["loss"] == [(1, 0.8), (2, 0.4), (3, 0.3)] and going["best"] == (2, 0.75)

    out = tmp_path / "pictures" / "curves.png"
    assert main(["curves", str(tmp_path / "lr1e-3"), str(tmp_path / "lr1e-2"), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (1200, 450)  # CURVES inches x DPI
        assert len(png.getcolors(1 << 20)) > 10  # drawn, not blank
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # written atomically: no temp file left


def test_curves_mistakes_are_one_error_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    write_log(tmp_path / "new" / "log.jsonl", [{"event": "fresh", "step": 0, "time": 0.0}])
    write_log(tmp_path / "run" / "log.jsonl", training_log([0.9], {}, []))
    (tmp_path / "file").write_text("")
    cases = [([tmp_path / "empty"], tmp_path / "c.png", "no log.jsonl"),
             ([tmp_path / "new"], tmp_path / "c.png", "nothing logged yet"),
             ([tmp_path / "run"], tmp_path / "file" / "c.png", "cannot write"),
             ([tmp_path / "run"], tmp_path / "run" / "log.jsonl", "this command reads that file")]
    log = (tmp_path / "run" / "log.jsonl").read_bytes()
    for runs, out, message in cases:
        assert main(["curves", *map(str, runs), "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and message in captured.err
    assert (tmp_path / "run" / "log.jsonl").read_bytes() == log
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["curves", str(tmp_path / "run"), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: python -m afine curves needs the optional package "
                                                   "matplotlib") and "pip install matplotlib" in err
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("suffix, start", [(".pdf", b"%PDF-"), (".svg", b"<?xml"), (".PNG", b"\x89PNG"),
                                           (".jpg", b"\xff\xd8\xff"), (".eps", b"%!PS-Adobe")])
def test_curves_are_written_in_the_format_their_suffix_names(tmp_path, capsys, suffix, start):
    write_log(tmp_path / "run" / "log.jsonl", training_log([0.9, 0.7], {0: 0.5, 2: 0.7}, [2]))
    out = tmp_path / f"curves{suffix}"
    assert main(["curves", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(start) and capsys.readouterr().out == f"wrote {out}\n"


def test_curves_dash_is_a_png_alone_on_stdout(tmp_path, capsysbinary, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a wrong '-' is a file here, not in the repository
    write_log(tmp_path / "run" / "log.jsonl", training_log([0.9, 0.7], {0: 0.5, 2: 0.7}, [2]))
    assert main(["curves", str(tmp_path / "run"), "--out", "-"]) == 0
    out, err = capsysbinary.readouterr()
    assert out.startswith(b"\x89PNG") and err == b"wrote -\n"
    with Image.open(io.BytesIO(out)) as png:
        assert png.format == "PNG" and png.size == (1200, 450)


def test_curves_never_go_over_a_runs_files_nor_under_an_unknown_suffix(tmp_path, capsys):
    """`curves --out run/net_qhead.pth` wrote a PNG over the weights; `--out x.xyz` wrote PNG bytes there."""
    run, other = tmp_path / "run", tmp_path / "other"
    write_log(run / "log.jsonl", training_log([0.9, 0.7], {0: 0.5, 2: 0.7}, [2]))
    write_log(other / "log.jsonl", training_log([0.9], {}, []))
    for folder in (run, other):
        (folder / "config.json").write_text("{}\n")
        (folder / "net_qhead.pth").write_bytes(b"weights")
    (other / "best").mkdir()
    cases = [(run / "net_qhead.pth", f"it is a file of the training run folder {run}"),
             (other / "best" / "curves.png", f"it is a file of the training run folder {other}"),
             (tmp_path / "curves.xyz", "the file name must end in one of .png, .pdf, .svg"),
             (tmp_path / "curves", "(it has no suffix)")]
    for out, message in cases:
        assert main(["curves", str(run), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out}: cannot write") and err.count("\n") == 1 and message in err, err
    assert (run / "net_qhead.pth").read_bytes() == b"weights" == (other / "net_qhead.pth").read_bytes()
    assert not (tmp_path / "curves.xyz").exists() and not (other / "best" / "curves.png").exists()
    assert main(["curves", str(run), "--out", str(run / "curves.svg")]) == 0  # a new name of one's own: fine


def test_commands_that_ask_for_no_picture_import_neither_matplotlib_nor_tensorboard(tmp_path):
    data = square_corpus(tmp_path / "data")
    test = data / "KADID10K" / "Test" / "Triplet"
    test.mkdir(parents=True)
    (test / "Triplet.txt").write_text((data / "KADID10K" / "Validation" / "Triplet" / "Triplet.txt").read_text())
    run = tmp_path / "s1"
    code = f"""
import sys, torch
torch.set_num_threads(1)
import afine.__main__, evaluate, train_stage1, train_stage2, train_stage3
train = ["--data_root={data}", "--out_dir={run}", "--clip=random-tiny", "--device=cpu", "--workers=0",
         "--batch_size=4", "--total_iter=1", "--val_every=1", "--log_every=1", "--train_datasets=KADID10K",
         "--val_datasets=KADID10K", "--schedule.periods=[10]", "--schedule.restart_weights=[1]"]
assert train_stage1.main(train) == 0
assert evaluate.main(["--bench", "kadid10k", "--data-root", "{data}", "--weights", "{run}", "--stage", "1",
                      "--workers", "0", "--no-progress"]) == 0
print(sorted(m for m in sys.modules if m.split(".")[0] in ("matplotlib", "tensorboard")))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = procs.run([sys.executable, "-c", code], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
