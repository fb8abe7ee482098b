"""`python -m afine score DIS_DIR REF_DIR`: pairing by name, the same scores as --pairs, mean row, CSV, errors."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from afine import score as score_module
from afine.__main__ import main
from afine.image import load_image
from afine.model import TERMS, load_afine
from tests.tiny import random_afine, tiny_clip, write_checkpoints


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("ckpt"), random_afine(tiny_clip(seed=7)))["afine"]


@pytest.fixture
def folders(tmp_path):
    """results/ and references/: a.png <-> a.png, b.jpg <-> b.png (stem), c.png <-> c.png, plus ignored files."""
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        base = rng.integers(0, 256, (40, 48, 3)).astype(np.float64)
        save(tmp_path / "references" / f"{name}.png", base)
        suffix = ".jpg" if name == "b" else ".png"
        save(tmp_path / "results" / f"{name}{suffix}", base + rng.normal(0, 25, base.shape))
    (tmp_path / "results" / "notes.txt").write_text("not an image")
    save(tmp_path / "results" / ".hidden.png", np.zeros((8, 8, 3)))
    (tmp_path / "results" / "sub").mkdir()
    return tmp_path / "results", tmp_path / "references"


def score(capsys, weights, *args):
    code = main(["score", "--weights", str(weights), *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_folders_give_the_pairs_file_scores_paired_by_name_and_stem(weights, folders, capsys, tmp_path):
    dis, ref = folders
    code, out, err = score(capsys, weights, dis, ref, "--json", "--batch-size", "2")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(Path(r["dis"]).name, Path(r["ref"]).name) for r in rows] == [("a.png", "a.png"), ("b.jpg", "b.png"),
                                                                          ("c.png", "c.png")]
    (tmp_path / "pairs.txt").write_text("results/a.png,references/a.png\nresults/b.jpg,references/b.png\n"
                                        "results/c.png,references/c.png\n")
    code, out, _ = score(capsys, weights, "--pairs", tmp_path / "pairs.txt", "--json", "--no-progress",
                         "--batch-size", "2")
    assert code == 0
    for folder_row, pairs_row in zip(rows, (json.loads(line) for line in out.splitlines())):  # same batches
        assert folder_row == pairs_row
    assert "3/3" in err  # the progress bar, on stderr


def test_table_ends_with_the_mean_of_every_term_and_csv_holds_the_rows(weights, folders, capsys, tmp_path):
    dis, ref = folders
    code, out, _ = score(capsys, weights, dis, ref, "--json", "--no-progress")
    rows = [json.loads(line) for line in out.splitlines()]
    code, out, err = score(capsys, weights, dis, ref, "--no-progress", "--csv", tmp_path / "out" / "scores.csv")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 5 and lines[0].split() == ["dis", "ref", *TERMS]
    mean = lines[-1].split()
    assert mean[:3] == ["mean", "(3", "pairs)"]
    for term, value in zip(TERMS, mean[3:]):
        assert float(value) == pytest.approx(np.mean([r[term] for r in rows]), abs=1e-6)
    with open(tmp_path / "out" / "scores.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["dis"], r["ref"]) for r in table] == [(r["dis"], r["ref"]) for r in rows]
    for csv_row, json_row in zip(table, rows):
        assert [float(csv_row[t]) for t in TERMS] == [json_row[t] for t in TERMS]


def test_one_reference_image_against_a_folder(weights, folders, capsys):
    dis, ref = folders
    code, out, err = score(capsys, weights, dis, ref / "a.png", "--json", "--no-progress")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["ref"]).name for r in rows] == ["a.png"] * 3
    model = load_afine(weights)
    images = torch.stack([load_image(dis / n) for n in ("a.png", "b.jpg", "c.png")])
    with torch.no_grad():
        direct = model(images, load_image(ref / "a.png")[None])
    for i, row in enumerate(rows):
        assert row["afine_all"] == pytest.approx(direct["afine_all"][i].item(), abs=1e-5)


def test_unpaired_images_are_listed_or_skipped_with_a_warning(weights, folders, capsys):
    dis, ref = folders
    save(dis / "lonely.png", np.zeros((40, 48, 3)))
    save(ref / "orphan.bmp", np.zeros((40, 48, 3)))
    code, out, err = score(capsys, weights, dis, ref, "--no-progress")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: 2 image(s) without a partner") and "lonely.png" in err and "orphan.bmp" in err
    assert "--skip-unpaired" in err
    code, out, err = score(capsys, weights, dis, ref, "--no-progress", "--skip-unpaired", "--json")
    assert code == 0
    assert [Path(json.loads(line)["dis"]).name for line in out.splitlines()] == ["a.png", "b.jpg", "c.png"]
    assert err.startswith("warning: skipped 2 image(s)") and "lonely.png" in err and "orphan.bmp" in err


def test_exact_name_wins_over_stem_and_two_stems_are_ambiguous(weights, folders, capsys):
    dis, ref = folders
    save(ref / "a.jpg", np.zeros((40, 48, 3)))  # a.png still pairs with a.png by name
    save(ref / "c.bmp", np.zeros((40, 48, 3)))
    save(ref / "c.tif", np.zeros((40, 48, 3)))
    (dis / "c.png").rename(dis / "c.jpg")  # c.jpg: c.png, c.bmp, c.tif share its stem
    code, _, err = score(capsys, weights, dis, ref, "--no-progress")
    assert code == 2 and "c.jpg (several references: c.bmp, c.png, c.tif)" in err
    assert "a.jpg (no test image a.* in" in err and "a.png (no" not in err
    assert "(no test image c.*" not in err  # c.jpg is there, with several references: not each a leftover


@pytest.mark.parametrize("case, culprit", [
    ("empty_folder", "empty: no images in folder"),
    ("image_and_folder", "needs a folder of test images"),
    ("missing_reference", "nowhere: reference folder or image not found"),
    ("size_mismatch", "b.jpg: size 20x24 differs from reference"),
    ("skip_with_pairs", "--skip-unpaired applies to folders"),
    ("csv_is_folder", ": cannot write, it is a folder"),
    ("nothing_paired", "no test image has a reference in"),
])
def test_folder_errors_one_line_exit_2(weights, folders, capsys, tmp_path, case, culprit):
    dis, ref = folders
    args = [dis, ref]
    if case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args = [tmp_path / "empty", ref]
    elif case == "image_and_folder":
        args = [dis / "a.png", ref]
    elif case == "missing_reference":
        args = [dis, tmp_path / "nowhere"]
    elif case == "size_mismatch":
        save(dis / "b.jpg", np.zeros((24, 20, 3)))
    elif case == "skip_with_pairs":
        (tmp_path / "pairs.txt").write_text("results/a.png,references/a.png\n")
        args = ["--pairs", tmp_path / "pairs.txt", "--skip-unpaired"]
    elif case == "csv_is_folder":
        args += ["--csv", tmp_path]
    elif case == "nothing_paired":
        (tmp_path / "other").mkdir()
        save(tmp_path / "other" / "z.png", np.zeros((40, 48, 3)))
        args = [dis, tmp_path / "other", "--skip-unpaired"]
    code, out, err = score(capsys, weights, "--no-progress", *args)
    assert code == 2 and out == ""
    error = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(error) == 1 and error[0].startswith("error: ") and culprit in error[0], err


def test_pairs_follow_names_not_positions(weights, tmp_path, capsys):
    """Sorted test images and sorted references do not line up: a.bmp sorts before a.c.png but its reference
    a.png after a.c.png; two test images share the reference b.bmp by stem; an exact name wins over a stem."""
    rng = np.random.default_rng(3)
    for name in ("a.png", "a.c.png", "b.bmp", "d.png", "d.jpg"):
        save(tmp_path / "refs" / name, rng.integers(0, 256, (40, 48, 3)))
    for name in ("a.bmp", "a.c.png", "b.jpg", "b.png", "d.jpg"):
        save(tmp_path / "outs" / name, rng.integers(0, 256, (40, 48, 3)))
    code, out, err = score(capsys, weights, tmp_path / "outs", tmp_path / "refs", "--json", "--no-progress",
                           "--skip-unpaired")
    assert code == 0, err
    pairs = [(Path(json.loads(line)["dis"]).name, Path(json.loads(line)["ref"]).name) for line in out.splitlines()]
    assert pairs == [("a.bmp", "a.png"), ("a.c.png", "a.c.png"), ("b.jpg", "b.bmp"), ("b.png", "b.bmp"),
                     ("d.jpg", "d.jpg")]
    assert err == f"warning: skipped 1 image(s): {tmp_path / 'refs' / 'd.png'} (no test image d.* in " \
                  f"{tmp_path / 'outs'})\n"


def unchanged(paths: list[Path]):
    """The bytes of files, to check afterwards that nothing wrote over them."""
    return {p: p.read_bytes() for p in paths if p.is_file()}


@pytest.mark.parametrize("case", ["image", "image_other_spelling", "image_hard_link", "pairs_file", "weights",
                                  "clip"])
def test_csv_over_an_input_is_refused_before_any_work(weights, folders, capsys, tmp_path, monkeypatch, case):
    from afine import score as score_module

    dis, ref = folders
    args = [dis, ref]
    csv_file = {"image": dis / "a.png", "image_other_spelling": ref / ".." / "results" / "b.jpg",
                "image_hard_link": tmp_path / "scores.csv", "pairs_file": tmp_path / "pairs.txt",
                "weights": weights, "clip": tmp_path / "clip.pth"}[case]
    if case == "image_hard_link":
        os.link(ref / "c.png", csv_file)
    elif case == "pairs_file":
        csv_file.write_text("results/a.png,references/a.png\n")
        args = ["--pairs", csv_file]
    elif case == "clip":
        torch.save(load_afine(weights).clip.state_dict(), csv_file)
        args += ["--clip", csv_file]
    before = unchanged([csv_file, weights, *dis.iterdir(), *ref.iterdir()])
    monkeypatch.setattr(score_module, "load_afine", lambda *a, **k: pytest.fail("the work started before the check"))
    code, out, err = score(capsys, weights, "--no-progress", *args, "--csv", csv_file)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {csv_file}: cannot write, this command reads that file"), err
    assert unchanged(list(before)) == before


def test_csv_over_the_released_weights_is_refused_when_no_weights_are_given(weights, folders, capsys, tmp_path,
                                                                              monkeypatch):
    from afine import score as score_module

    dis, ref = folders
    released = tmp_path / "cache" / "afine.pth"
    released.parent.mkdir()
    released.write_bytes(weights.read_bytes())
    monkeypatch.setenv("AFINE_WEIGHTS", str(released))  # where the downloaded weights are kept
    monkeypatch.setattr(score_module, "load_afine", lambda *a, **k: pytest.fail("the work started before the check"))
    code = main(["score", "--no-progress", str(dis), str(ref), "--csv", str(released)])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "") and err == f"error: {released}: cannot write, this command reads that file; " \
        "choose another output\n"
    assert released.read_bytes() == weights.read_bytes()


def test_unwritable_csv_is_refused_before_scoring_naming_the_file_in_the_way(weights, folders, capsys, tmp_path,
                                                                               monkeypatch):
    from afine import score as score_module

    dis, ref = folders
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(score_module, "load_afine", lambda *a, **k: pytest.fail("the work started before the check"))
    target = tmp_path / "file" / "scores.csv"
    code, out, err = score(capsys, weights, "--no-progress", dis, ref, "--csv", target)
    assert (code, out) == (2, "")
    assert err == f"error: {target}: cannot write, {tmp_path / 'file'} is not a folder\n"


def test_csv_dash_is_the_csv_alone_on_stdout_and_the_table_goes_to_stderr(weights, folders, capsys, tmp_path,
                                                                           monkeypatch):
    dis, ref = folders
    monkeypatch.chdir(tmp_path)
    code, table, _ = score(capsys, weights, dis, ref, "--no-progress", "--csv", tmp_path / "scores.csv")
    assert code == 0
    code, out, err = score(capsys, weights, dis, ref, "--no-progress", "--csv", "-")
    assert code == 0 and out == (tmp_path / "scores.csv").read_text()  # the file's bytes, nothing else
    assert err == table  # the whole table, on stderr
    code, out_json, err_json = score(capsys, weights, dis, ref, "--no-progress", "--csv", "-", "--json")
    assert code == 0 and out_json == out
    rows = [json.loads(line) for line in err_json.splitlines()]  # the JSON lines on stderr, whole
    assert [r["dis"] for r in rows] == [row["dis"] for row in csv.DictReader(io.StringIO(out))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["references", "results", "scores.csv"]  # no file '-'


def test_csv_into_a_fifo_or_a_link_to_the_null_device_is_written_in_place(weights, folders, capsys, tmp_path):
    from tests.test_atomic import fifo_reader

    dis, ref = folders
    null, fifo = tmp_path / "null.csv", tmp_path / "pipe"
    null.symlink_to(os.devnull)
    os.mkfifo(fifo)
    code, _, err = score(capsys, weights, dis, ref, "--no-progress", "--csv", null)
    assert code == 0, err
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode) and os.readlink(null) == os.devnull
    with fifo_reader(fifo) as read:  # opened first, so the command's write never waits for a reader
        code, _, err = score(capsys, weights, dis, ref, "--no-progress", "--csv", fifo)
        assert code == 0, err
        text = read().decode()
    assert text.splitlines()[0] == ",".join(["dis", "ref", *TERMS]) and len(text.splitlines()) == 4
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("name, message", [
    ("scores.pth", "the file name must end in .csv for what is written there (it ends in '.pth')"),
    ("run/best/scores.csv", "it is a file of the training run folder"),
    ("run/config.json", "it is a file of the training run folder"),
])
def test_csv_over_a_training_runs_files_or_under_another_suffix_is_refused(weights, folders, capsys, tmp_path,
                                                                           monkeypatch, name, message):
    from afine import score as score_module

    dis, ref = folders
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    for file in ("config.json", "built_on.json", "log.jsonl", "best/best.json"):
        (run / file).write_text("{}\n")
    monkeypatch.setattr(score_module, "load_afine", lambda *a, **k: pytest.fail("the work started before the check"))
    code, out, err = score(capsys, weights, "--no-progress", dis, ref, "--csv", tmp_path / name)
    assert (code, out) == (2, "") and err.startswith(f"error: {tmp_path / name}: cannot write") and message in err
    assert err.count("\n") == 1 and (run / "config.json").read_text() == "{}\n"
    assert not (tmp_path / name).exists() or name == "run/config.json"


@pytest.mark.parametrize("reference", ["folder", "image"])
def test_a_broken_symbolic_link_is_an_unreadable_image_or_listed_as_skipped(weights, folders, capsys, tmp_path,
                                                                              reference):
    dis, ref = folders
    (dis / "a.png").unlink()
    (dis / "a.png").symlink_to(tmp_path / "gone.png")
    ref_arg = ref if reference == "folder" else ref / "b.png"
    code, out, err = score(capsys, weights, "--no-progress", dis, ref_arg)
    assert (code, out) == (2, "")
    assert err == f"error: {dis / 'a.png'}: image file not found (a broken symbolic link to {tmp_path / 'gone.png'})\n"
    code, out, err = score(capsys, weights, "--no-progress", "--json", dis, ref_arg, "--skip-unpaired")
    assert code == 0
    assert [Path(json.loads(line)["dis"]).name for line in out.splitlines()] == ["b.jpg", "c.png"]
    assert err == f"warning: skipped 1 image(s): {dis / 'a.png'} (broken symbolic link to {tmp_path / 'gone.png'})\n"


@pytest.mark.parametrize("side", ["test", "reference", "unsearchable"])
def test_unreadable_folder_is_one_error_line(weights, folders, capsys, monkeypatch, side):
    """No permission to list a folder, or to look inside the one above it (simulated: the tests may run as root,
    who may read anything)."""
    dis, ref = folders
    unreadable = ref if side == "reference" else dis
    iterdir, stat = Path.iterdir, Path.stat

    def refuse(self, *args, **kwargs):
        if self == unreadable:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return (stat if side == "unsearchable" else iterdir)(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat" if side == "unsearchable" else "iterdir", refuse)
    code, out, err = score(capsys, weights, "--no-progress", dis, ref)
    assert (code, out) == (2, "")
    assert err == f"error: {unreadable}: {'cannot read' if side == 'unsearchable' else 'cannot read folder'} " \
                  f"(permission denied)\n"


def test_names_that_are_not_utf8_are_escaped_in_table_csv_and_json(weights, folders, capsys, tmp_path):
    """b'\\xff' in a file name is shown as the four characters \\xff everywhere, as valid UTF-8."""
    dis, ref = folders
    odd = os.fsdecode(b"\xffq\xe9.png")  # not UTF-8: Python holds these bytes as lone surrogates
    (dis / "a.png").rename(dis / odd)
    (ref / "a.png").rename(ref / odd)
    shown = "\\xffq\\xe9.png"
    csv_file = tmp_path / "scores.csv"
    code, out, err = score(capsys, weights, "--no-progress", dis, ref, "--csv", csv_file)
    assert code == 0, err
    assert out.splitlines()[3].split()[:2] == [f"{dis}/{shown}", f"{ref}/{shown}"]  # \xff sorts last
    rows = list(csv.DictReader(io.StringIO(csv_file.read_bytes().decode("utf-8"))))
    assert (rows[2]["dis"], rows[2]["ref"]) == (f"{dis}/{shown}", f"{ref}/{shown}")
    code, out, err = score(capsys, weights, "--no-progress", "--json", dis, ref)
    assert code == 0, err
    assert "\\ud" not in out  # no lone surrogate, not even as a JSON escape
    last = json.loads(out.splitlines()[2])
    assert (last["dis"], last["ref"]) == (f"{dis}/{shown}", f"{ref}/{shown}")
    (ref / odd).unlink()
    code, out, err = score(capsys, weights, "--no-progress", dis, ref)
    assert code == 2 and f"{dis}/{shown} (no reference" in err and "\\udc" not in err


@pytest.mark.parametrize("change", ["test image resized", "reference resized", "test image cut short"])
@pytest.mark.parametrize("batch_size, workers", [(3, "0"), (1, "2")])
def test_an_image_changed_after_the_header_check_loses_only_its_pair(weights, folders, capsys, monkeypatch, tmp_path,
                                                                     change, batch_size, workers):
    """An image rewritten between the header check and its decoding (the file rewritten by a hook run when the
    model loads, after every header was read): the other pairs are scored, printed and written as in a run
    without the change; the one error line names the file; --skip-unpaired makes it a warning and exit 0."""
    dis, ref = folders
    args = ["--no-progress", "--json", "--batch-size", batch_size, "--workers", workers, dis, ref]
    code, out, err = score(capsys, weights, *args)
    assert code == 0, err
    clean = {Path(r["dis"]).name: r for r in map(json.loads, out.splitlines())}
    changed = {"test image resized": dis / "b.jpg", "reference resized": ref / "b.png",
               "test image cut short": dis / "b.jpg"}[change]
    original = changed.read_bytes()
    real_load = score_module.load_afine

    def rewrite_then_load(*a, **k):
        if change == "test image cut short":
            changed.write_bytes(original[:len(original) // 2])
        else:
            save(changed, np.full((24, 32, 3), 128.0))
        return real_load(*a, **k)

    monkeypatch.setattr(score_module, "load_afine", rewrite_then_load)
    why = {"test image resized": f"{dis / 'b.jpg'} (changed during the run: 32x24 now, 48x40 when checked)",
           "reference resized": f"{dis / 'b.jpg'} (its reference {ref / 'b.png'}: changed during the run: 32x24 "
                                f"now, 48x40 when checked)",
           "test image cut short": f"{dis / 'b.jpg'} (cannot read image ("}[change]
    for skip in (False, True):
        changed.write_bytes(original)
        code, out, err = score(capsys, weights, *args, *(["--skip-unpaired"] if skip else []),
                               "--csv", tmp_path / "scores.csv")
        rows = [json.loads(line) for line in out.splitlines()]
        assert [Path(r["dis"]).name for r in rows] == ["a.png", "c.png"]
        assert rows == [clean["a.png"], clean["c.png"]]
        with open(tmp_path / "scores.csv", newline="") as f:
            assert [Path(r["dis"]).name for r in csv.DictReader(f)] == ["a.png", "c.png"]
        assert len(err.splitlines()) == 1 and why in err
        if skip:
            assert code == 0 and err.startswith(f"warning: skipped 1 image(s): {why}")
        else:
            assert code == 2 and err.startswith(f"error: 1 pair(s) not scored (the 2 others are in the output): "
                                                f"{why}")
            assert err.endswith("; --skip-unpaired makes this a warning\n")
        (tmp_path / "scores.csv").unlink()


def test_no_pair_left_to_score_is_an_error_and_no_output(weights, folders, capsys, monkeypatch, tmp_path):
    dis, ref = folders
    real_load = score_module.load_afine

    def rewrite_then_load(*a, **k):
        save(ref / "a.png", np.zeros((8, 8, 3)))
        return real_load(*a, **k)

    monkeypatch.setattr(score_module, "load_afine", rewrite_then_load)
    code, out, err = score(capsys, weights, "--no-progress", dis, ref / "a.png", "--skip-unpaired",
                           "--csv", tmp_path / "scores.csv")
    assert (code, out) == (2, "") and not (tmp_path / "scores.csv").exists()
    assert err == f"error: no pair scored: {dis / 'a.png'} (its reference {ref / 'a.png'}: changed during the run: " \
                  f"8x8 now, 48x40 when checked), {dis / 'b.jpg'} (its reference {ref / 'a.png'}: changed during " \
                  f"the run: 8x8 now, 48x40 when checked), {dis / 'c.png'} (its reference {ref / 'a.png'}: changed " \
                  f"during the run: 8x8 now, 48x40 when checked)\n"
