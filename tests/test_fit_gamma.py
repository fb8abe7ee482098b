"""fit_gamma: recovers known (g3, g4) from data generated with them, end to end through the CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from afine.errors import AfineError
from afine.evaluation import score_items
from afine.image import load_image
from afine.labels import MOSRecord, read_mos, write_mos
from afine.model import load_afine
from afine.synth import SCALES, generate
from fit_gamma import fit_logistic, logistic, main, nr_data, scale_data
from tests.tiny import random_afine, tiny_clip, write_checkpoints


@pytest.mark.parametrize("e1,e2,g3,g4", [(2.0, -2.0, 4.9592, 21.5968), (2.0, -2.0, -0.3, 0.05),
                                         (100.0, 0.0, -1.9710, 2.3734), (100.0, 0.0, 12.0, 0.8)])
def test_fit_recovers_parameters_from_exact_data(e1, e2, g3, g4):
    rng = np.random.default_rng(0)
    x = g3 + g4 * rng.normal(0.0, 2.0, 300)
    y = (e1 - e2) / (1 + np.exp(-(x - g3) / g4)) + e2  # SPEC's formula, written independently
    fit3, fit4, rmse = fit_logistic(x, y, e1, e2)
    assert (fit3, fit4) == pytest.approx((g3, g4), rel=1e-5, abs=1e-6)
    assert rmse < 1e-6 * (e1 - e2)


def test_fit_with_noise_is_close_and_width_is_positive():
    rng = np.random.default_rng(1)
    x = rng.uniform(-10, 10, 2000)
    y = logistic(x, 2.0, -2.0, 1.5, -3.0) + rng.normal(0, 0.05, x.size)  # negative width: same curve as +3
    g3, g4, _ = fit_logistic(x, y, 2.0, -2.0)
    assert g3 == pytest.approx(1.5, abs=0.1) and g4 == pytest.approx(3.0, rel=0.05)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    generate(root / "data", seed=1, scale="small", progress=False)
    paths = write_checkpoints(root / "ckpt", random_afine(tiny_clip(seed=6), seed=7))
    return root / "data", paths


def steep_parameters(x: np.ndarray) -> tuple[float, float]:
    """Centre at the median; width so the extreme scores lie 15 widths out (logistic there within 1e-6 of
    its limits, so min/max normalisation of the MOS leaves the generated y essentially unchanged)."""
    g3 = float(np.median(x))
    return g3, float(min(g3 - x.min(), x.max() - g3)) / 15


def test_nr_cli_recovers_known_parameters(corpus, tmp_path, capsys):
    data, paths = corpus
    items, _, _ = nr_data(data)
    model = load_afine(paths["afine"], require=("natural",))
    x = score_items(model, items, 1, progress=False)
    g3, g4 = steep_parameters(x)
    y = logistic(x, 2.0, -2.0, g3, g4)
    mos = 1000.0 - 100.0 * y  # PIPAL-like scale, higher is better: normalisation gives back y
    folder = data / "PIPAL" / "Train" / "MOS"
    where = {name: i for i, (name, _) in enumerate(items)}
    for file in sorted(folder.glob("*.txt")):
        records = read_mos(file)
        write_mos(file, [MOSRecord(r.dis, r.ref, float(mos[where[next(p for p, _ in items if p.name == r.dis)]]))
                         for r in records])
    out = tmp_path / "gamma.json"
    code = main(["nr", "--data-root", str(data), "--weights", str(paths["afine"]), "--out", str(out),
                 "--no-progress", "--workers", "0", "--batch-size", "5"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    fitted = json.loads(out.read_text())
    assert fitted["yita3"] == pytest.approx(g3, rel=1e-3, abs=1e-4 * g4)
    assert fitted["yita4"] == pytest.approx(g4, rel=1e-3)
    assert fitted["images"] == len(items) == 21 * 20  # 21 training references x 20 distorted
    assert stdout.splitlines()[0].split()[0] == "yita3"


def test_scale_cli_recovers_known_parameters(corpus, tmp_path, capsys):
    data, paths = corpus
    items, _, _ = scale_data(data)
    model = load_afine(paths["afine"])
    x = score_items(model, items, 3, progress=False)
    c, w = steep_parameters(x)
    mos = 100.0 - logistic(x, 100.0, 0.0, c, w)  # higher is better; normalisation gives back the logistic
    k = 0
    for file in sorted((data / "SRIQA-Bench" / "MOS").glob("*.txt")):
        lines = file.read_text().splitlines()
        file.write_text("".join(f"{line.split(',')[0]},{float(mos[k + i])!r}\n" for i, line in enumerate(lines)))
        k += len(lines)
    assert k == len(items) == 11 * SCALES["small"].sriqa_scenes
    out = tmp_path / "scale.json"
    code = main(["scale", "--data-root", str(data), "--weights", str(paths["folder"]), "--out", str(out),
                 "--no-progress", "--workers", "0"])
    _, err = capsys.readouterr()
    assert code == 0, err
    fitted = json.loads(out.read_text())
    assert fitted["center"] == pytest.approx(c, rel=1e-3, abs=1e-4 * w)
    assert fitted["width"] == pytest.approx(w, rel=1e-3)


def test_missing_dataset_and_wrong_model_are_one_line_errors(corpus, tmp_path, capsys):
    data, paths = corpus
    code = main(["nr", "--data-root", str(tmp_path), "--weights", str(paths["afine"]), "--out",
                 str(tmp_path / "g.json"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("error: ") and "PIPAL" in err and err.count("\n") == 1
    net = paths["folder"] / "net_qhead.pth"  # a stage-1 folder (clip + natural head) cannot fit the scale
    stage1 = tmp_path / "s1"
    stage1.mkdir()
    for name in ("clip_model.pth", "net_qhead.pth"):
        (stage1 / name).write_bytes((net.parent / name).read_bytes())
    code = main(["scale", "--data-root", str(data), "--weights", str(stage1), "--out", str(tmp_path / "s.json"),
                 "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "missing" in err
    assert not (tmp_path / "s.json").exists()


def test_unwritable_out_fails_before_the_work(corpus, tmp_path, capsys, monkeypatch):
    import fit_gamma

    data, paths = corpus
    monkeypatch.setattr(fit_gamma, "load_afine", lambda *a, **k: pytest.fail("the work started before the check"))
    (tmp_path / "file").write_text("")
    out_file = tmp_path / "file" / "gamma.json"
    code = main(["nr", "--data-root", str(data), "--weights", str(paths["afine"]), "--out", str(out_file),
                 "--no-progress", "--workers", "0"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith(f"error: {out_file}: cannot write") and err.count("\n") == 1


def test_out_over_a_file_it_reads_is_refused_before_the_work(corpus, capsys, monkeypatch):
    import fit_gamma

    data, paths = corpus
    monkeypatch.setattr(fit_gamma, "load_afine", lambda *a, **k: pytest.fail("the work started before the check"))
    mos = sorted((data / "PIPAL" / "Train" / "MOS").glob("*.txt"))[0]
    for target in (paths["folder"] / "net_qhead.pth", mos):
        before = target.read_bytes()
        code = main(["nr", "--data-root", str(data), "--weights", str(paths["folder"]), "--out", str(target),
                     "--no-progress"])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and err.count("\n") == 1
        assert err.startswith(f"error: {target}: cannot write, this command reads that file"), err
        assert target.read_bytes() == before


def test_out_dash_is_the_json_alone_on_stdout_and_another_suffix_is_refused(corpus, tmp_path, capsys, monkeypatch):
    import fit_gamma

    data, paths = corpus
    monkeypatch.chdir(tmp_path)  # a wrong '-' is a file here, not in the repository
    common = ["scale", "--data-root", str(data), "--weights", str(paths["folder"]), "--no-progress", "--workers", "0"]
    assert main([*common, "--out", str(tmp_path / "scale.json")]) == 0
    summary = capsys.readouterr().out
    assert main([*common, "--out", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == json.loads((tmp_path / "scale.json").read_text())
    assert err.splitlines()[:2] == summary.splitlines()[:2]  # center, width: on stderr
    monkeypatch.setattr(fit_gamma, "load_afine", lambda *a, **k: pytest.fail("the work started before the check"))
    assert main([*common, "--out", str(tmp_path / "scale.txt")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {tmp_path / 'scale.txt'}: cannot write, the file name must end in .json " \
                                "for what is written there (it ends in '.txt'); choose another output\n"


def test_a_mos_list_naming_a_missing_image_is_named_by_file_and_line(tmp_path):
    """The MOS list at fault is I02.txt, line 2 (not 'I02.png.txt', guessed from the reference's name)."""
    images = tmp_path / "PIPAL" / "images"
    images.mkdir(parents=True)
    for name in ("I02.png", "I02_01.png"):
        (images / name).write_bytes(b"")  # never decoded: the names are checked first
    mos = tmp_path / "PIPAL" / "Train" / "MOS" / "I02.txt"
    write_mos(mos, [MOSRecord("I02_01.png", "I02.png", 1.0), MOSRecord("I02_09.png", "I02.png", 2.0)])
    with pytest.raises(AfineError) as info:
        nr_data(tmp_path)
    assert str(info.value) == f"{mos}:2: image 'I02_09.png' not found under {images}"


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_image_changed_after_the_header_check_is_one_error_line(corpus, tmp_path, capsys, monkeypatch, workers):
    """fit_gamma needs every image as evaluate.py does: one rewritten to another size after its header was read is
    one error line naming it, exit 2, nothing written."""
    import afine.evaluation as evaluation

    data, paths = corpus
    path = nr_data(data)[0][0][0]
    original = path.read_bytes()
    h, w = load_image(path).shape[-2:]
    real_sizes = evaluation.image_sizes

    def sizes_then_rewrite(*a, **k):
        sizes = real_sizes(*a, **k)
        Image.new("RGB", (w + 8, h), (90, 90, 90)).save(path, format=Image.open(io.BytesIO(original)).format)
        return sizes

    monkeypatch.setattr(evaluation, "image_sizes", sizes_then_rewrite)
    out_file = tmp_path / "gamma.json"
    try:
        code = main(["nr", "--data-root", str(data), "--weights", str(paths["afine"]), "--out", str(out_file),
                     "--no-progress", "--workers", workers, "--batch-size", "8"])
    finally:
        path.write_bytes(original)
    out, err = capsys.readouterr()
    assert (code, out) == (2, "") and not out_file.exists()
    assert err == f"error: {path}: changed during the run: {w + 8}x{h} now, {w}x{h} when checked\n"
