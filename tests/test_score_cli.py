"""`python -m afine score`: output formats, batching, and every user error with exit code 2."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from afine.__main__ import main
from afine.errors import AfineError
from afine.evaluation import check_device
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
    model = load_afine(paths["afine"])
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


def test_pairs_from_standard_input_or_a_pipe_are_relative_to_the_working_folder(setup, capsys, monkeypatch, tmp_path):
    """'-', /dev/fd/N of a pipe and /dev/fd/N of a regular file elsewhere: the folder of the path given (/dev/fd) is
    not where the names point; the working folder is."""
    paths, images = setup
    text = "a.png,ref.png\nd2.png,ref2.png\n"
    monkeypatch.chdir(images)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "pairs.txt").write_text(text)
    read, write = os.pipe()
    os.write(write, text.encode())
    os.close(write)
    regular = os.open(tmp_path / "lists" / "pairs.txt", os.O_RDONLY)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    try:
        for pairs in ("-", f"/dev/fd/{read}", f"/dev/fd/{regular}"):
            code, out, err = run_cli(capsys, "--weights", paths["afine"], "--pairs", pairs, "--json")
            assert code == 0, err
            assert [(r["dis"], r["ref"]) for r in map(json.loads, out.splitlines())] == \
                [("a.png", "ref.png"), ("d2.png", "ref2.png")]
    finally:
        os.close(read)
        os.close(regular)
    assert read_pairs(tmp_path / "lists" / "pairs.txt")[0] == (tmp_path / "lists" / "a.png",
                                                               tmp_path / "lists" / "ref.png")  # a file: its folder


def test_pairs_from_dev_stdin_in_a_shell_pipe(setup, tmp_path):
    paths, images = setup
    proc = procs.run([sys.executable, "-m", "afine", "score", "--no-progress", "--json", "--weights",
                      str(paths["afine"]), "--pairs", "/dev/stdin"], input="a.png,ref.png\n",
                     cwd=images, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (json.loads(proc.stdout)["dis"], json.loads(proc.stdout)["ref"]) == ("a.png", "ref.png")


def test_pairs_from_standard_input_or_a_device_are_refused_under_several_processes(setup, monkeypatch):
    """Under torchrun every process reads the pairs: from one standard input they would split its lines between
    them, each scoring other pairs."""
    from afine import score as score_module
    from afine.errors import AfineError

    paths, images = setup
    parser = argparse.ArgumentParser()
    score_module.add_arguments(parser)
    monkeypatch.setattr(score_module, "world", lambda: (1, 2))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a.png,ref.png\n")))
    for pairs in ("-", os.devnull):
        args = parser.parse_args(["--weights", str(paths["afine"]), "--pairs", pairs])
        with pytest.raises(AfineError) as info:
            score_module.prepare(args, torch.device("cpu"))
        assert str(info.value) == f"--pairs {pairs}: standard input, a pipe or a device is read once, not by each " \
                                  "of 2 processes; give a pairs file"
    assert sys.stdin.read() == "a.png,ref.png\n"  # not read
    args = parser.parse_args(["--weights", str(paths["afine"]), "--pairs", str(images / "pairs.txt")])
    assert len(score_module.prepare(args, torch.device("cpu"))[0]) == 5  # a file each process reads whole


# ---------------------------------------------------------------------------------------------- precision, workers


def test_fp32_is_exact_and_the_default(setup, capsys):
    paths, images = setup
    args = ["--weights", paths["afine"], "--pairs", images / "pairs.txt", "--json", "--batch-size", "1"]
    code, default, _ = run_cli(capsys, *args)
    code32, fp32, _ = run_cli(capsys, *args, "--precision", "fp32")
    assert code == code32 == 0 and default == fp32
    model = load_afine(paths["afine"])
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
    # The tiny test model's random heads magnify CLIP's rounding (test_low_precision_features below). How much
    # depends on the CPU's kernels: with native bf16 the mapped terms and D (slopes of a few) moved by up to 0.06
    # and the 0..100 scale (slope <= 10.5) by up to 0.4; on an AVX2-only AMD EPYC, bf16 moved one pair's N by
    # 0.06, its D by 0.14 and its scale by 0.96. Hence a loose bound, and a sharp one: every pair's low-precision
    # terms are nearer its own float32 terms than those of any pair with other values (pairing a test image with
    # another pair's reference moves D here by 0.1 to 0.9).
    tolerance = {t: 2.5 if t == "afine_all_scale" else 0.25 for t in TERMS}
    assert all(abs(a[t] - b[t]) <= tolerance[t] for a, b in zip(fp32, low) for t in TERMS)
    distance = [[sum(abs(a[t] - b[t]) / tolerance[t] for t in TERMS) for a in fp32] for b in low]
    for i, row in enumerate(distance):
        assert all(row[i] < d for j, d in enumerate(row) if fp32[j] != fp32[i]), (i, row)
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
    model = load_afine(paths["afine"])
    x = torch.stack([load_image(images / f"{n}.png") for n in ("a", "b", "c", "ref")])
    with torch.no_grad():
        x32, f32 = model.encode(x)
        xl, fl = model.encode(x, precision=precision)
    assert xl.dtype == fl.dtype == torch.float32 and torch.equal(xl, x32)
    error = ((fl - f32).flatten(2).norm(dim=2) / f32.flatten(2).norm(dim=2)).max().item()
    assert 0 < error < bound
    with torch.no_grad(), torch.autocast("cpu", dtype=DTYPES[precision]):  # a caller's own autocast still applies
        assert torch.equal(model.encode(x)[1], fl)


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("device", ["meta", "cuda:7", "garbage", "cuda:-1", "cpu:3"])
def test_a_device_nothing_can_be_scored_on_is_one_error_line_before_the_work(setup, capsys, monkeypatch, device):
    """--device is checked before anything is read or loaded: each of these is one line naming the device."""
    if device == "cuda:7" and cuda_count() > 7:
        pytest.skip("this machine has a cuda:7")
    paths, images = setup
    monkeypatch.setattr("afine.score.load_afine", lambda *a, **k: pytest.fail("the weights were loaded"))
    code, out, err = run_cli(capsys, "--weights", paths["afine"], "--device", device, images / "a.png",
                             images / "ref.png")
    n = cuda_count()
    culprit = {"meta": "the meta device holds no data, nothing can be scored on it (use cpu, cuda or cuda:N)",
               "cuda:7": f"no such CUDA device, this machine has {n} (cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})"
                         if n else "no CUDA device is available here (use --device cpu)",
               "garbage": "not a device name (use cpu, cuda or cuda:N)",
               "cuda:-1": "not a device name (use cpu, cuda or cuda:N)",
               "cpu:3": "there is one CPU device, cpu or cpu:0"}[device]
    assert (code, out, err) == (2, "", f"error: --device {device}: {culprit}\n")


def test_a_cuda_index_is_checked_against_the_devices_there_are(monkeypatch):
    """With two CUDA devices (faked: the check reads only their count), cuda, cuda:0 and cuda:1 are accepted and
    cuda:2 is refused; without CUDA, plain cuda is refused too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [check_device(name) for name in ("cuda", "cuda:0", "cuda:1", "cpu", "cpu:0")] == [
        torch.device("cuda"), torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu"),
        torch.device("cpu", 0)]
    assert check_device(None) == torch.device("cuda")  # the default where CUDA is available
    with pytest.raises(AfineError, match=r"^--device cuda:2: no such CUDA device, this machine has 2 \(cuda:0 to "
                                         r"cuda:1\)$"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert check_device(None) == torch.device("cpu")
    with pytest.raises(AfineError, match=r"^--device cuda: no CUDA device is available here \(use --device cpu\)$"):
        check_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_device_there_is_scores_like_the_cpu(setup, capsys):
    paths, images = setup
    rows = {}
    for device in ("cpu", f"cuda:{cuda_count() - 1}"):
        code, out, err = run_cli(capsys, "--weights", paths["afine"], "--device", device, "--json",
                                 "--pairs", images / "pairs.txt")
        assert code == 0, err
        rows[device] = [json.loads(line) for line in out.splitlines()]
    cpu, cuda = rows.values()
    assert [(r["dis"], r["ref"]) for r in cuda] == [(r["dis"], r["ref"]) for r in cpu]
    tolerance = {t: 1.0 if t == "afine_all_scale" else 0.1 for t in TERMS}  # TF32 convolutions, as for bf16 above
    assert all(abs(a[t] - b[t]) <= tolerance[t] for a, b in zip(cpu, cuda) for t in TERMS)
