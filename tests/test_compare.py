"""`afine compare REF METHOD ...`: the scores of `afine score`, statistics recomputed from the per-image rows,
one CLIP pass per image, the several-sets layout, missing images and sets, outputs that are inputs, odd names."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from afine.__main__ import main
from afine.model import AFINE, TERMS, load_afine
from tests.test_score_folders import save
from tests.tiny import random_afine, tiny_clip, write_checkpoints

METHODS = {"EDSR": 12, "SRCNN": 40, "ESRGAN": 25}  # noise amplitude of each method's outputs
SETS = {"Set5": 4, "Urban": 3}  # images per set


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny model whose naturalness mapping is centred on the raw N of these images (about 24 to 32), so that
    outputs differ in N and some are judged more natural than their reference."""
    model = random_afine(tiny_clip(seed=7))
    with torch.no_grad():
        model.natural_scale.yita3.fill_(28.0)
        model.natural_scale.yita4.fill_(3.0)
    return write_checkpoints(tmp_path_factory.mktemp("ckpt"), model)["afine"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """HR/<set>/<i>.png and <method>/<set>/<i>.png, two image sizes in each set, noisier outputs for some methods,
    and a blurred copy of the reference among ESRGAN's (a smoother image: another naturalness)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for name, n in SETS.items():
        for i in range(n):
            shape = (40, 56, 3) if i % 2 else (48, 32, 3)
            base = rng.integers(0, 256, shape).astype(np.float64)
            save(root / "HR" / name / f"img{i}.png", base)
            for method, noise in METHODS.items():
                out = base + rng.integers(-noise, noise + 1, shape)
                if method == "ESRGAN" and i == 1:
                    out = (base + np.roll(base, 1, 0) + np.roll(base, 1, 1)) / 3
                save(root / method / name / f"img{i}.png", out)
    return root


def copy(corpus: Path, tmp_path: Path) -> Path:
    shutil.copytree(corpus, tmp_path / "c")
    return tmp_path / "c"


def compare(capsys, weights, *args):
    code = main(["compare", "--weights", str(weights), "--no-progress", "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def methods(root: Path) -> list[str]:
    return [str(root / m) for m in METHODS]


def csv_rows(text: str) -> list[dict]:
    """The rows of one of the command's CSV files, after its '#' lines."""
    lines = text.splitlines()
    assert lines[0].startswith("# A-FINE ") and "lower is better" in lines[0] and lines[1].startswith("# afine ")
    return list(csv.DictReader(line for line in lines if not line.startswith("#")))


@pytest.fixture(scope="module")
def result(weights, corpus, tmp_path_factory):
    """One compare run over the corpus with every output, its stdout, and the files."""
    out = tmp_path_factory.mktemp("out")
    capture = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(capture), pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(out / "torch"))  # the digest cache: before the tests' own (conftest.py)
        code = main(["compare", "--weights", str(weights), "--no-progress", "--device", "cpu", "--batch-size", "4",
                     "--bootstrap", "500", str(corpus / "HR"), *methods(corpus), "--json", str(out / "c.json"),
                     "--csv", str(out / "c.csv"), "--html", str(out / "report")])
    assert code == 0
    return capture.getvalue(), json.loads((out / "c.json").read_text()), (out / "c.csv").read_text(), out


def test_means_and_images_are_those_of_afine_score_on_the_same_folders(weights, corpus, result, capsys, tmp_path):
    _, summary, _, _ = result
    for s in summary["sets"]:
        for j, method in enumerate(METHODS):
            scores = tmp_path / f"{s['name']}-{method}.csv"
            code = main(["score", "--weights", str(weights), "--no-progress", "--device", "cpu",
                         str(corpus / method / s["name"]), str(corpus / "HR" / s["name"]), "--csv", str(scores)])
            capsys.readouterr()
            assert code == 0
            rows = list(csv.DictReader(io.StringIO(scores.read_text())))
            assert [Path(r["dis"]).name for r in rows] == [image["image"] for image in s["per_image"]]
            for t in TERMS:
                mine = [image["scores"][j][t] for image in s["per_image"]]
                assert mine == pytest.approx([float(r[t]) for r in rows], rel=1e-5, abs=1e-6)
                assert s["methods"][j]["terms"][t] == pytest.approx(np.mean([float(r[t]) for r in rows]), rel=1e-5,
                                                                    abs=1e-6)
            assert s["methods"][j]["mean"] == s["methods"][j]["terms"]["afine_all_scale"]


def test_statistics_are_those_recomputed_from_the_per_image_rows(weights, result):
    """Means, bootstrap intervals (the documented draws), ranks, pairwise counts, Wilcoxon tests, lambda and
    the count of outputs more natural than their reference, from the CSV file alone."""
    _, summary, text, _ = result
    rows = csv_rows(text)
    assert len(rows) == sum(SETS.values()) * len(METHODS)
    k = math.log1p(math.exp(load_afine(weights).adapter.k.item()))  # softplus
    mean_ranks = np.zeros(len(METHODS))
    for s in summary["sets"]:
        n = SETS[s["name"]]
        scores = {m: np.array([float(r["afine_all_scale"]) for r in rows if (r["set"], r["method"]) == (s["name"], m)])
                  for m in METHODS}
        draws = np.random.default_rng(0).integers(0, n, (500, n))
        means = [scores[m].mean() for m in METHODS]
        order = np.argsort(means)
        for j, (method, row) in enumerate(zip(METHODS, s["methods"])):
            assert row["mean"] == pytest.approx(means[j], rel=1e-12)
            assert row["interval"] == pytest.approx(np.percentile(scores[method][draws].mean(axis=1), [2.5, 97.5]),
                                                    rel=1e-12)
            assert row["interval"][0] <= row["mean"] <= row["interval"][1]
            assert row["rank"] == list(order).index(j) + 1  # no ties among these means
            mine = [r for r in rows if (r["set"], r["method"]) == (s["name"], method)]
            natural = [float(r["afine_nr"]) < float(r["afine_nr_ref"]) for r in mine]
            assert row["more_natural"] == sum(natural)
            assert [r["more_natural"] == "1" for r in mine] == natural
            for r in mine:
                lam = math.exp(k * (float(r["afine_nr_ref"]) - float(r["afine_nr"])))
                assert float(r["lambda"]) == pytest.approx(lam, rel=1e-9)
                assert float(r["afine_all"]) == pytest.approx(float(r["afine_fr"]) + lam * float(r["afine_nr"]),
                                                              abs=1e-5)  # D = F + lambda N
        mean_ranks += [row["rank"] for row in s["methods"]]
        assert len(s["pairwise"]) == 3
        for p in s["pairwise"]:
            a, b = scores[p["a"]], scores[p["b"]]
            assert (p["a_better"], p["b_better"], p["ties"]) == ((a < b).sum(), (b < a).sum(), (a == b).sum())
            assert p["a_better_fraction"] == p["a_better"] / n and p["tie_fraction"] == p["ties"] / n
            assert p["p_value"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert [m["mean_rank"] for m in summary["methods"]] == pytest.approx(mean_ranks / len(SETS))
    assert sum(r["more_natural"] == "1" for r in rows) > 0  # the badge is exercised


def table(lines: list[str], heading: str) -> list[list[str]]:
    """The cells of the Markdown table under a heading line, bold marks removed."""
    start = lines.index(heading) + 4  # the heading, a blank line, the header and the alignment row
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[c.strip().removeprefix("**").removesuffix("**") for c in line.split("|")[1:-1]]
            for line in lines[start:end]]


def test_the_summary_table_and_what_produced_the_numbers(weights, result):
    out, summary, text, folder = result
    facts = summary["produced_by"]
    assert facts["weights"] == [{"file": str(weights), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}]
    assert (facts["afine"], facts["torch"], facts["device"], facts["precision"], facts["clip"]) == \
        ("0.1.0", torch.__version__, "cpu", "fp32", None)
    assert summary["term"] == "afine_all_scale" and summary["lower_is_better"] is True
    assert summary["layout"] == "sets" and [s["name"] for s in summary["sets"]] == list(SETS)
    lines = out.splitlines()
    assert "lower is better" in lines[0] and facts["weights"][0]["sha256"] in lines[1]
    for s in summary["sets"]:
        cells = table(lines, f"**{s['name']}: {s['images']} images**")
        assert [c[:4] for c in cells] == [[f"{r['rank']:g}", r["name"], f"{r['mean']:.4f}",
                                           f"[{r['interval'][0]:.4f}, {r['interval'][1]:.4f}]"] for r in s["methods"]]
        assert [c[-1] for c in cells] == [f"{r['more_natural']} of {s['images']}" for r in s["methods"]]
    overall = table(lines, next(line for line in lines if line.startswith("**all sets")))
    assert overall == [[m["name"], *(f"{s['methods'][j]['mean']:.4f} ({s['methods'][j]['rank']:g})"
                                     for s in summary["sets"]), f"{m['mean_rank']:.2f}"]
                       for j, m in enumerate(summary["methods"])]
    assert text.splitlines()[1] == "# " + lines[1].rstrip()  # the CSV file says what produced it, as stdout does
    assert "lower is better" in (folder / "report" / "index.html").read_text()


def test_every_reference_goes_through_clip_once_with_all_its_outputs(weights, corpus, capsys, monkeypatch):
    """N methods: N + 1 CLIP passes per reference, whatever the batch size (smaller than N included)."""
    seen = []
    encode = AFINE.encode

    def counting(self, images, *args, **kwargs):
        seen.append(images.shape[0])
        return encode(self, images, *args, **kwargs)

    monkeypatch.setattr(AFINE, "encode", counting)
    for batch in ("2", "8"):  # fewer pairs than methods: one reference a batch; more: two references
        seen.clear()
        code, _, err = compare(capsys, weights, corpus / "HR", *methods(corpus), "--batch-size", batch,
                               "--bootstrap", "0")
        assert code == 0, err
        assert sum(seen) == sum(SETS.values()) * (len(METHODS) + 1)


def test_one_test_set_named_methods_and_the_other_formats(weights, corpus, capsys):
    args = [corpus / "HR" / "Set5", f"best_one={corpus / 'EDSR' / 'Set5'}", f"R&D={corpus / 'SRCNN' / 'Set5'}"]
    code, out, err = compare(capsys, weights, *args, "--format", "latex", "--term", "afine_fr")
    assert code == 0, err
    assert out.startswith("% A-FINE afine_fr, lower is better")
    assert r"\begin{tabular}" in out and r"best\_one" in out and r"R\&D" in out and "all sets" not in out
    code, out, err = compare(capsys, weights, *args, "--format", "csv")
    assert code == 0, err
    rows = csv_rows(out)
    assert [(r["set"], r["method"], r["images"], r["left_out"]) for r in rows] == [("Set5", "best_one", "4", "0"),
                                                                                   ("Set5", "R&D", "4", "0")]
    assert sorted(r["rank"] for r in rows) == ["1", "2"]


def test_folders_of_one_name_are_named_by_their_parents_too_and_one_name_twice_is_refused(weights, corpus, capsys,
                                                                                        monkeypatch):
    monkeypatch.chdir(corpus)
    code, out, err = compare(capsys, weights, "HR/Urban", "EDSR/Urban", "SRCNN/Urban", "x=ESRGAN/Urban",
                             "--bootstrap", "0")
    assert code == 0, err
    cells = table(out.splitlines(), "**Urban: 3 images**")
    assert sorted(c[1] for c in cells) == ["EDSR/Urban", "SRCNN/Urban", "x"]
    for twice in (["EDSR/Urban", "EDSR/Urban"], ["a=EDSR/Urban", "a=SRCNN/Urban"]):
        code, out, err = compare(capsys, weights, "HR/Urban", *twice)
        assert (code, out) == (2, "")
        assert err.startswith("error: two methods are named ") and "NAME=FOLDER" in err and err.count("\n") == 1


def test_missing_images_and_sets_are_one_error_line_or_left_out(weights, corpus, capsys, tmp_path, monkeypatch):
    from afine import score as score_module

    root = copy(corpus, tmp_path)
    (root / "SRCNN" / "Set5" / "img2.png").unlink()
    shutil.rmtree(root / "ESRGAN" / "Urban")
    save(root / "EDSR" / "Set5" / "extra.png", np.zeros((40, 56, 3)))
    load = score_module.load_afine
    monkeypatch.setattr(score_module, "load_afine", lambda *a, **k: pytest.fail("the work started before the check"))
    code, out, err = compare(capsys, weights, root / "HR", *methods(root))
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err.startswith("error: 3 image(s) or set(s) missing: ")
    for culprit in (f"{root / 'HR' / 'Set5' / 'img2.png'} (no test image img2.* in {root / 'SRCNN' / 'Set5'})",
                    f"{root / 'EDSR' / 'Set5' / 'extra.png'} (no reference extra.*",
                    f"{root / 'ESRGAN' / 'Urban'} (set Urban missing for method ESRGAN)"):
        assert culprit in err
    assert "--skip-unpaired" in err
    (root / "ESRGAN" / "Urban").mkdir()
    code, out, err = compare(capsys, weights, root / "HR", *methods(root))
    assert code == 2 and f"{root / 'ESRGAN' / 'Urban'} (set Urban without images for method ESRGAN)" in err

    monkeypatch.setattr(score_module, "load_afine", load)
    code, out, err = compare(capsys, weights, root / "HR", *methods(root), "--skip-unpaired", "--json",
                             tmp_path / "c.json", "--bootstrap", "0")
    assert code == 0, err
    assert err.startswith("warning: skipped 3 image(s) or set(s)") and "no image has an output from every method in "\
        "set(s) Urban" in err
    summary = json.loads((tmp_path / "c.json").read_text())
    (s,) = summary["sets"]
    assert (s["name"], s["images"], s["references_left_out"]) == ("Set5", 3, 1)
    assert [image["image"] for image in s["per_image"]] == ["img0.png", "img1.png", "img3.png"]
    assert [row["left_out"] for row in s["methods"]] == [2, 0, 1]  # EDSR: img2 and extra; SRCNN none; ESRGAN img2
    code, out, err = compare(capsys, weights, root / "HR" / "Set5", root / "EDSR" / "Set5", "--json",
                             tmp_path / "one.json")
    assert code == 2  # extra.png has no reference
    code, out, err = compare(capsys, weights, root / "HR" / "Set5", root / "EDSR" / "Set5", "--json",
                             tmp_path / "one.json", "--skip-unpaired", "--bootstrap", "0")
    edsr = json.loads((tmp_path / "one.json").read_text())["sets"][0]
    kept = [image["scores"][0]["afine_all_scale"] for image in edsr["per_image"] if image["image"] != "img2.png"]
    assert s["methods"][0]["mean"] == pytest.approx(np.mean(kept))  # over the images every method has


@pytest.mark.parametrize("case", ["csv_image", "json_weights", "csv_hard_link", "html_in_reference",
                                  "html_is_method", "html_not_a_report", "same_json_and_csv"])
def test_outputs_that_are_inputs_are_refused_before_any_work(weights, corpus, capsys, tmp_path, monkeypatch, case):
    from afine import score as score_module

    root = copy(corpus, tmp_path)
    image = root / "SRCNN" / "Urban" / "img1.png"
    args = {"csv_image": ["--csv", image], "json_weights": ["--json", weights],
            "csv_hard_link": ["--csv", tmp_path / "link.csv"], "html_in_reference": ["--html", root / "HR" / "r"],
            "html_is_method": ["--html", root / "EDSR"], "html_not_a_report": ["--html", tmp_path / "mine"],
            "same_json_and_csv": ["--json", tmp_path / "x", "--csv", tmp_path / "." / "x"]}[case]
    if case == "csv_hard_link":
        os.link(image, tmp_path / "link.csv")
    if case == "html_not_a_report":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in [*root.rglob("*.png"), weights] + list((tmp_path / "mine").glob("*"))}
    monkeypatch.setattr(score_module, "load_afine", lambda *a, **k: pytest.fail("the work started before the check"))
    code, out, err = compare(capsys, weights, root / "HR", *methods(root), *args)
    assert (code, out) == (2, "") and err.count("\n") == 1 and err.startswith("error: "), err
    expected = {"csv_image": "cannot write, this command reads that file", "json_weights": "this command reads",
                "csv_hard_link": "this command reads that file", "html_in_reference": "which this command reads",
                "html_is_method": "which this command reads",
                "html_not_a_report": "not empty and not an earlier report",
                "same_json_and_csv": "--json and --csv name the same file"}[case]
    assert expected in err
    assert {p: p.read_bytes() for p in before} == before
    assert not (root / "HR" / "r").exists()


def test_a_report_replaces_an_earlier_report(weights, corpus, capsys, tmp_path):
    report = tmp_path / "report"
    for term in ("afine_all", "afine_fr"):
        code, _, err = compare(capsys, weights, corpus / "HR" / "Urban", f"a={corpus / 'EDSR' / 'Urban'}",
                               f"b={corpus / 'SRCNN' / 'Urban'}", "--html", report, "--term", term)
        assert code == 0, err
        assert f"Term <b>{term}</b>" in (report / "index.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temp folder left
    assert sorted(p.name for p in report.iterdir()) == [".afine-report", "index.html", "thumbs"]
    thumbs = sorted((report / "thumbs" / "s0").iterdir())
    assert [p.name for p in thumbs] == ["r0.jpg", "r0m0.jpg", "r0m1.jpg", "r1.jpg", "r1m0.jpg", "r1m1.jpg",
                                        "r2.jpg", "r2m0.jpg", "r2m1.jpg"]
    with Image.open(thumbs[0]) as im:
        assert im.size == (32, 48)  # smaller than a thumbnail: kept at its size


def test_names_that_are_not_utf8_or_are_markup_are_shown_as_text(weights, corpus, capsys, tmp_path):
    """A file name with the byte 0xff, a file and a method named with HTML: escaped in every output, and the
    report's original links point at the real files."""
    root = copy(corpus, tmp_path)
    odd = os.fsdecode(b"\xffq.png")
    markup = "<img src=x onerror=\"document.title='pwned'\">.png"
    for folder in ("HR", *METHODS):
        (root / folder / "Urban" / "img0.png").rename(root / folder / "Urban" / odd)
        (root / folder / "Urban" / "img1.png").rename(root / folder / "Urban" / markup)
    method = "<script>document.title='pwned'</script>&amp;"
    code, out, err = compare(capsys, weights, root / "HR" / "Urban", f"{method}={root / 'EDSR' / 'Urban'}",
                             root / "SRCNN" / "Urban", "--json", tmp_path / "c.json", "--csv", tmp_path / "c.csv",
                             "--html", tmp_path / "report")
    assert code == 0, err
    assert r"\<script\>document.title='pwned'\</script\>&amp;" in out  # markdown: shown as written
    summary = json.loads((tmp_path / "c.json").read_text())
    names = [image["image"] for image in summary["sets"][0]["per_image"]]
    assert names == [markup, "img2.png", "\\xffq.png"]
    assert summary["methods"][0]["name"] == method
    rows = csv_rows((tmp_path / "c.csv").read_bytes().decode("utf-8"))
    assert {r["image"] for r in rows} == set(names)
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "\\ud" not in out + page + (tmp_path / "c.json").read_text()
    assert "<script>document" not in page and "<img src=x" not in page
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;&amp;amp;" in page
    assert "&lt;img src=x onerror=&quot;document.title=&#x27;pwned&#x27;&quot;&gt;.png" in page
    assert "\\u003cscript\\u003edocument.title='pwned'\\u003c/script\\u003e\\u0026amp;" in page  # the JSON blob
    assert f'href="{(root / "HR" / "Urban").absolute().as_uri()}/%FFq.png"' in page
