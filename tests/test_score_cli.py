"""`python -m afine score`: output formats, batching, and every user error with exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from afine.__main__ import main
from afine.image import load_image, preprocess
from afine.model import AFINE, TERMS, load_afine
from afine.score import read_pairs
from tests import procs
from tests.tiny import random_afine, tiny_clip, write_checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    paths = write_checkpoints(folder / "ckpt", random_afine(tiny_clip(seed=2)))
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir()
    base = rng.integers(0, 256, (64, 80, 3)).astype(np.int16)
    for name in ("ref", "a", "b", "c"):
        noise = 0 if name == "ref" else rng.integers(-40, 40, base.shape)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(images / f"{name}.png")
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(images / "ref2.png")
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(images / "d2.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / "small.png")
    (images / "broken.png").write_bytes(b"not an image")
    lines = ["a.png,ref.png", "d2.png,ref2.png", "", "b.png,ref.png", "c.png,ref.png", "ref.png,ref.png"]
    (images / "pairs.txt").write_text("\n".join(lines) + "\n")
    return paths, images


def run_cli(capsys, *args):
    code = main(["score", "--no-progress", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_lines_in_input_order_match_the_model(setup, capsys):
    paths, images = setup
    code, out, err = run_cli(capsys, "--weights", paths["afine"], "--pairs", images / "pairs.txt", "--json",
                             "--batch-size", "3")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["dis"]).name for r in rows] == ["a.png", "d2.png", "b.png", "c.png", "ref.png"]
    assert all(list(r) == ["dis", "ref", *TERMS] for r in rows)
    model = load_afine(None, paths["afine"])
    with torch.no_grad():
        direct = model(load_image(images / "d2.png")[None], load_image(images / "ref2.png")[None])
    for term in TERMS:
        assert rows[1][term] == pytest.approx(direct[term].item(), abs=1e-5)


def test_single_pair_table_and_folder_weights(setup, capsys):
    paths, images = setup
    code, out, _ = run_cli(capsys, "--weights", paths["folder"], images / "a.png", images / "ref.png")
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split() == ["dis", "ref", *TERMS]
    code, out_json, _ = run_cli(capsys, "--weights", paths["afine"], "--json", images / "a.png", images / "ref.png")
    value = json.loads(out_json)["afine_all"]
    assert float(row.split()[3]) == pytest.approx(value, abs=1e-6)


def test_batch_size_does_not_change_scores(setup, capsys):
    paths, images = setup
    outs = []
    for bs in ("1", "8"):
        code, out, _ = run_cli(capsys, "--weights", paths["afine"], "--pairs", images / "pairs.txt", "--json",
                               "--batch-size", bs)
        assert code == 0
        outs.append([json.loads(line) for line in out.splitlines()])
    for one, many in zip(*outs):
        for term in TERMS:  # CLIP's kernels round differently at other batch sizes (about 1e-6 relative); the
            # mappings' slopes (up to 5 here), D's terms of tens and the 0..100 scale (x10.5) magnify that to
            # about 2e-5; a pairing mistake would move scores by far more than the 1e-4 allowed
            assert one[term] == pytest.approx(many[term], rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("case, culprit", [
    ("missing_image", "nope.png"),
    ("broken_image", "broken.png"),
    ("size_mismatch", "small.png"),
    ("missing_weights", "missing.pth"),
    ("wrong_keys", "wrong.pth"),
    ("missing_pairs_file", "nofile.txt"),
    ("bad_pairs_line", "bad_pairs.txt:2"),
    ("missing_clip", "noclip.pt"),
])
def test_user_errors_one_line_exit_2_nothing_on_stdout(setup, capsys, case, culprit):
    paths, images = setup
    weights = paths["afine"]
    pair = [images / "a.png", images / "ref.png"]
    extra = []
    if case == "missing_image":
        pair[0] = images / "nope.png"
    elif case == "broken_image":
        pair[0] = images / "broken.png"
    elif case == "size_mismatch":
        pair[0] = images / "small.png"
    elif case == "missing_weights":
        weights = images / "missing.pth"
    elif case == "wrong_keys":
        parts = torch.load(paths["afine"], weights_only=True)
        parts["natural"]["proj_feat.weights"] = parts["natural"].pop("proj_feat.weight")
        weights = images / "wrong.pth"
        torch.save(parts, weights)
    elif case == "missing_pairs_file":
        pair, extra = [], ["--pairs", images / "nofile.txt"]
    elif case == "bad_pairs_line":
        (images / "bad_pairs.txt").write_text("a.png,ref.png\na.png;ref.png\n")
        pair, extra = [], ["--pairs", images / "bad_pairs.txt"]
    elif case == "missing_clip":
        weights = paths["folder"]
        extra = ["--clip", images / "noclip.pt"]
    code, out, err = run_cli(capsys, "--weights", weights, *extra, *pair)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], err
    if case == "wrong_keys":
        assert "proj_feat.weight" in lines[0] and "proj_feat.weights" in lines[0]


def test_module_entry_point_exit_code(setup, tmp_path):
    paths, images = setup
    proc = procs.run([sys.executable, "-m", "afine", "score", "--weights", paths["afine"], images / "a.png",
                      tmp_path / "none.png"], cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == "" and "none.png" in proc.stderr


@pytest.mark.parametrize("json_output", [True, False])
def test_non_finite_score_is_an_error_naming_the_pair(setup, capsys, monkeypatch, json_output):
    paths, images = setup
    original = AFINE.score

    def nan_for_pair_0(self, dis, refs, ref_index, **kwargs):
        terms = dict(original(self, dis, refs, ref_index, **kwargs))
        terms["afine_all"] = terms["afine_all"].clone()
        terms["afine_all"][0] = float("nan")
        return terms

    monkeypatch.setattr(AFINE, "score", nan_for_pair_0)
    code, out, err = run_cli(capsys, "--weights", paths["afine"], *(["--json"] if json_output else []),
                             images / "c.png", images / "ref.png")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {images / 'c.png'}: non-finite score")
    assert str(images / "ref.png") in err and "afine_all = nan" in err


def test_pairs_file_with_a_byte_order_mark(setup, tmp_path):
    _, images = setup
    (images / "bom_pairs.txt").write_bytes("\ufeffa.png,ref.png\nb.png,ref.png\n".encode())
    assert read_pairs(images / "bom_pairs.txt") == [(images / "a.png", images / "ref.png"),
                                                    (images / "b.png", images / "ref.png")]


# ---------------------------------------------------------------------------------------------- precision, workers


def test_fp32_is_exact_and_the_default(setup, capsys):
    paths, images = setup
    args = ["--weights", paths["afine"], "--pairs", images / "pairs.txt", "--json", "--batch-size", "1"]
    code, default, _ = run_cli(capsys, *args)
    code32, fp32, _ = run_cli(capsys, *args, "--precision", "fp32")
    assert code == code32 == 0 and default == fp32
    model = load_afine(None, paths["afine"])
    dis, ref = load_image(images / "d2.png")[None], load_image(images / "ref2.png")[None]
    with torch.no_grad():  # CLIP called directly, no autocast anywhere: the same bits
        x = preprocess(torch.cat([dis, ref]))
        features = torch.stack(model.clip.visual(x), dim=1)
        n, f = model.natural(x, features), model.fidelity(x[:1], features[:1], x[1:], features[1:])
        want = model.terms(n[:1], n[1:], f)
    row = json.loads(fp32.splitlines()[1])
    assert all(row[t] == want[t].item() for t in TERMS)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_is_close_to_fp32_but_not_equal(setup, capsys, precision):
    paths, images = setup
    args = ["--weights", paths["afine"], "--pairs", images / "pairs.txt", "--json"]
    _, fp32, _ = run_cli(capsys, *args)
    code, low, err = run_cli(capsys, *args, "--precision", precision)
    assert code == 0, err
    fp32, low = [[json.loads(line) for line in out.splitlines()] for out in (fp32, low)]
    # The tiny test model's random heads magnify CLIP's rounding (test_low_precision_features below): raw N moves
    # by up to 0.02 in bf16 and in fp16, the mapped terms and D (slopes of a few) by up to 0.06, the 0..100 scale
    # (slope <= 10.5) by up to 0.4. The tolerances leave some room; pairing a test image with another pair's
    # reference would move D here by 0.1 to 0.9.
    tolerance = {t: 1.0 if t == "afine_all_scale" else 0.1 for t in TERMS}
    assert all(abs(a[t] - b[t]) <= tolerance[t] for a, b in zip(fp32, low) for t in TERMS)
    assert any(a["afine_all"] != b["afine_all"] for a, b in zip(fp32, low))  # autocast did run


@pytest.mark.parametrize("option, value, culprit", [
    ("--precision", "fp64", "choose from 'fp32', 'bf16', 'fp16'"), ("--precision", "FP16", "invalid choice: 'FP16'"),
    ("--workers", "-1", "--workers must be 0 or more"),
])
def test_bad_precision_or_workers_is_one_error_line(setup, capsys, option, value, culprit):
    paths, images = setup
    code, out, err = run_cli(capsys, "--weights", paths["afine"], option, value, images / "a.png", images / "ref.png")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and culprit in err


def test_any_number_of_decoding_workers_prints_the_same_bytes(setup, capsys):
    paths, images = setup
    outs = []
    for workers in ("0", "1", "3", "8"):  # 8: more threads than the 5 batches
        code, out, err = run_cli(capsys, "--weights", paths["afine"], "--pairs", images / "pairs.txt", "--batch-size",
                                 "1", "--workers", workers)
        assert code == 0, err
        outs.append(out)
    assert outs[1:] == outs[:1] * 3
    rows = [line.split()[0] for line in outs[0].splitlines()[1:-1]]
    assert [Path(r).name for r in rows] == ["a.png", "d2.png", "b.png", "c.png", "ref.png"]  # input order


def test_progress_bar_counts_pairs(setup, capsys):
    paths, images = setup
    code = main(["score", "--weights", str(paths["afine"]), "--pairs", str(images / "pairs.txt"), "--batch-size", "2"])
    _, err = capsys.readouterr()
    assert code == 0 and "5/5" in err and "pair/s" in err


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("precision, bound", [("bf16", 0.02), ("fp16", 0.003)])
def test_low_precision_features(setup, precision, bound):
    """bf16 keeps 8 significant bits, fp16 11: one rounding is at most 2^-9 (0.2%) or 2^-12 (0.02%) of a value.
    Through the tiny CLIP's 3 blocks the features end within 0.6% (0.07%) of float32; the bounds allow 3-4x that,
    and the features must differ at all (autocast ran), while the normalised pixels the heads see stay exact."""
    paths, images = setup
    model = load_afine(None, paths["afine"])
    x = torch.stack([load_image(images / f"{n}.png") for n in ("a", "b", "c", "ref")])
    with torch.no_grad():
        x32, f32 = model.encode(x)
        xl, fl = model.encode(x, precision=precision)
    assert xl.dtype == fl.dtype == torch.float32 and torch.equal(xl, x32)
    error = ((fl - f32).flatten(2).norm(dim=2) / f32.flatten(2).norm(dim=2)).max().item()
    assert 0 < error < bound
    with torch.no_grad(), torch.autocast("cpu", dtype=DTYPES[precision]):  # a caller's own autocast still applies
        assert torch.equal(model.encode(x)[1], fl)
