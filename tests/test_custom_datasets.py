"""Datasets beyond the published ones: any folder in the traditional layout, and `afine.labels from-csv`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from afine.benchmarks import load_benchmark, parse_benchmarks
from afine.datasets import TripletDataset, dataset_dir
from afine.errors import AfineError
from afine.labels import main as labels_main
from afine.labels import read_mos, read_triplets
from evaluate import main as evaluate_main
from tests.tiny import random_afine, tiny_clip, write_checkpoints

SCENES, METHODS = 10, 4


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Images spread over two folders and a CSV beside them: rows -> {(dis name, ref name): mos}."""
    folder = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(0)
    rows, expected = ["dis,ref,mos"], {}
    for s in range(SCENES):
        base = rng.integers(0, 256, (40, 56, 3)).astype(np.float64)
        save(folder / "hr" / f"scene{s}.png", base)
        for m in range(METHODS):
            save(folder / "results" / f"scene{s}_m{m}.png", base + rng.normal(0, 12 * (m + 1), base.shape))
            mos = round(90 - 20 * m + rng.normal(), 2)
            rows.append(f"results/scene{s}_m{m}.png,hr/scene{s}.png,{mos}")
            expected[(f"scene{s}_m{m}.png", f"scene{s}.png")] = mos
    (folder / "scores.csv").write_text("\n".join(rows) + "\n")
    return folder, expected


def from_csv(capsys, *args):
    code = labels_main(["from-csv", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def made(source, tmp_path_factory):
    folder, _ = source
    data = tmp_path_factory.mktemp("data")
    assert labels_main(["from-csv", str(folder / "scores.csv"), "--out", str(data / "MyIQA"), "--seed", "3",
                        "--no-progress"]) == 0
    return data


def test_layout_split_by_reference_and_mos_files_match_the_csv(source, made):
    folder, expected = source
    root = made / "MyIQA"
    images = sorted(p.name for p in (root / "images").iterdir())
    assert images == sorted({n for pair in expected for n in pair})
    assert (root / "images" / "scene3_m1.png").read_bytes() == (folder / "results" / "scene3_m1.png").read_bytes()
    assert not (root / "images" / "scene3.png").is_symlink()  # copied by default
    refs_per_split = {split: sorted(p.stem for p in (root / split / "MOS").glob("*.txt"))
                      for split in ("Train", "Validation", "Test")}
    assert [len(v) for v in refs_per_split.values()] == [7, 1, 2]
    assert sorted(sum(refs_per_split.values(), [])) == sorted(f"scene{s}" for s in range(SCENES))
    written = {}
    for split, stems in refs_per_split.items():
        for stem in stems:
            lines = (root / split / "MOS" / f"{stem}.txt").read_text().splitlines()
            assert len(lines) == METHODS
            for line in lines:
                dis, ref, mos = line.split(",")
                assert ref == f"{stem}.png"
                written[(dis, ref)] = float(mos)
    assert written == expected


def test_triplets_are_nlogn_lists_inside_each_split_labelled_by_mos(source, made):
    _, expected = source
    root = made / "MyIQA"
    mos = {dis: m for (dis, _), m in expected.items()}
    for split in ("Train", "Validation", "Test"):
        refs = {p.stem + ".png" for p in (root / split / "MOS").glob("*.txt")}
        triplets = read_triplets(root / split / "Triplet" / "Triplet.txt")
        n = METHODS + 1  # a group: the distorted images plus the reference
        assert len(triplets) == len(refs) * n * round(math.log2(n))
        assert {t.y for t in triplets} == refs
        for t in triplets:
            score = {t.y: math.inf, **mos}  # the reference beats every distorted image
            assert t.x1.startswith(t.y[:-4]) and t.x2.startswith(t.y[:-4])
            assert t.g12 == (1.0 if score[t.x1] > score[t.x2] else 0.0 if score[t.x1] < score[t.x2] else 0.5)


def test_same_seed_same_dataset_other_seed_other_split(source, tmp_path, capsys):
    folder, _ = source
    splits = []
    for seed, name in ((3, "a"), (3, "b"), (4, "c"), (5, "d")):
        assert from_csv(capsys, folder / "scores.csv", "--out", tmp_path / name, "--seed", seed)[0] == 0
        splits.append(sorted(p.name for p in (tmp_path / name / "Test" / "MOS").iterdir()))
    for split in ("Train", "Validation", "Test"):
        triplets = [(tmp_path / name / split / "Triplet" / "Triplet.txt").read_bytes() for name in "ab"]
        assert triplets[0] == triplets[1]
    assert splits[0] == splits[1]
    assert len({tuple(s) for s in splits[1:]}) > 1  # seeds 3, 4, 5 do not all pick the same test references


def test_symlink_mode_links_to_the_sources(source, tmp_path, capsys):
    folder, _ = source
    code, out, _ = from_csv(capsys, folder / "scores.csv", "--out", tmp_path / "Linked", "--images", "symlink")
    assert code == 0 and "symlinked" in out
    link = tmp_path / "Linked" / "images" / "scene0_m2.png"
    assert link.is_symlink() and link.resolve() == (folder / "results" / "scene0_m2.png").resolve()


def test_made_dataset_reads_back_for_training_by_its_folder_name(made):
    root = made / "MyIQA"
    for split in ("Train", "Validation"):
        data = TripletDataset.from_lists(made, ["MyIQA"], split, augment=False)
        assert len(data) == len(read_triplets(root / split / "Triplet" / "Triplet.txt"))
        assert all(p.parent == root / "images" for item in data.items for p in item[:3])
        item = data[0]
        assert item["x1"].shape == item["y"].shape == (3, 40, 56)


def test_evaluate_reads_a_custom_dataset_like_kadid10k(made, tmp_path, capsys):
    """The same files under the name KADID10K and under a custom name give the same benchmark results."""
    shutil.copytree(made / "MyIQA", tmp_path / "MyIQA")
    shutil.copytree(made / "MyIQA", tmp_path / "KADID10K")
    paths = write_checkpoints(tmp_path / "ckpt", random_afine(tiny_clip(seed=6)))
    code = evaluate_main(["--bench", "MyIQA,kadid10k", "--data-root", str(tmp_path), "--weights", str(paths["afine"]),
                          "--workers", "0", "--no-progress", "--json", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads((tmp_path / "r.json").read_text())
    test_triplets = read_triplets(made / "MyIQA" / "Test" / "Triplet" / "Triplet.txt")
    assert results["MyIQA"]["pairs"] == len(test_triplets)
    assert results["MyIQA"]["mos_images"] == 2 * METHODS
    for key in ("accuracy", "correct", "srcc", "plcc", "krcc"):
        assert results["MyIQA"][key] == results["kadid10k"][key]
    assert "MyIQA" in out.splitlines()[1]
    bench = load_benchmark(made, "MyIQA")
    mos = {r.dis: r.mos for f in (made / "MyIQA" / "Test" / "MOS").glob("*.txt") for r in read_mos(f)}
    assert dict(zip((p.name for p in bench.mos_images), bench.mos)) == mos


def test_names_not_in_the_traditional_layout_fail_clearly(made, tmp_path):
    with pytest.raises(AfineError, match=r"unknown dataset 'LIVE': no folder .*LIVE"):
        dataset_dir(tmp_path, "LIVE")
    (tmp_path / "NoImages" / "Train").mkdir(parents=True)
    with pytest.raises(AfineError, match=r"NoImages: not a dataset in the traditional layout \(no images/"):
        dataset_dir(tmp_path, "NoImages")
    (tmp_path / "NoSplits" / "images").mkdir(parents=True)
    with pytest.raises(AfineError, match=r"NoSplits: not a dataset in the traditional layout \(no Train/"):
        TripletDataset.from_lists(tmp_path, ["NoSplits"], "Train")
    with pytest.raises(AfineError, match="unknown dataset"):
        dataset_dir(made, "../data")
    assert dataset_dir(made, "MyIQA") == made / "MyIQA"
    with pytest.raises(AfineError, match=r"did you mean 'MyIQA'"):
        parse_benchmarks("myiqa", made)
    with pytest.raises(AfineError, match="diffiqa-psy"):
        parse_benchmarks("DiffIQA", made)
    assert parse_benchmarks("MyIQA,KADID10K,MyIQA", made) == ["MyIQA", "kadid10k"]
    assert parse_benchmarks("all,MyIQA", made)[-1] == "MyIQA"


def test_evaluate_unknown_or_malformed_dataset_one_line_exit_2(made, tmp_path, capsys):
    (made / "Broken").mkdir(exist_ok=True)
    for bench, culprit in (("Nope", "Nope"), ("Broken", "Broken: not a dataset in the traditional layout")):
        code = evaluate_main(["--bench", bench, "--data-root", str(made), "--weights", str(tmp_path)])
        out, err = capsys.readouterr()
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith("error: ") and culprit in err, err


# ---------------------------------------------------------------------------------------------- bad CSV rows


BAD_ROWS = {  # case -> (rows after the header line, line at fault, words the message must hold)
    "missing_image": (["results/scene0_m0.png,hr/scene0.png,1", "results/ghost.png,hr/scene0.png,2"], 3,
                      "ghost.png"),
    "non_numeric_mos": (["results/scene0_m0.png,hr/scene0.png,good"], 2, "'good' is not a number"),
    "infinite_mos": (["results/scene0_m0.png,hr/scene0.png,inf"], 2, "not finite"),
    "reference_without_distorted": (["results/scene0_m0.png,hr/scene0.png,1", "hr/scene1.png,hr/scene1.png,5"], 3,
                                    "'hr/scene1.png' has no distorted image"),
    "empty_distorted": (["results/scene0_m0.png,hr/scene0.png,1", ",hr/scene1.png,5"], 3, "no distorted image"),
    "duplicate_row": (["results/scene0_m0.png,hr/scene0.png,1", "results/scene0_m1.png,hr/scene0.png,2",
                       "results/scene0_m0.png,hr/scene0.png,3"], 4, "listed twice (also on line 2)"),
    "duplicate_name": (["results/scene0_m0.png,hr/scene0.png,1", "other/scene0_m0.png,hr/scene0.png,2"], 3,
                       "also used by"),
    "reference_also_distorted": (["results/scene0_m0.png,hr/scene0.png,1", "hr/scene0.png,hr/scene1.png,2"], 3,
                                 "distorted image here and a reference image on line 2"),
    "stem_collision": (["results/scene0_m0.png,hr/scene0.png,1", "results/scene1_m0.png,hr/scene0.bmp,2"], 3,
                       "share the stem 'scene0'"),
    "size_mismatch": (["results/scene0_m0.png,hr/scene0.png,1", "other/small.png,hr/scene1.png,2"], 3,
                      "64x40 but its reference 'scene1.png' is 56x40"),
    "broken_image": (["results/scene0_m0.png,hr/scene0.png,1", "other/broken.png,hr/scene1.png,2"], 3,
                     "cannot read image"),
    "wrong_field_count": (["results/scene0_m0.png,hr/scene0.png,1,0.3"], 2, "expected 3 fields"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_csv_rows_name_file_and_line_exit_2(source, tmp_path, capsys, case):
    folder, _ = source
    work = tmp_path / "work"
    shutil.copytree(folder, work)
    save(work / "other" / "scene0_m0.png", np.zeros((40, 56, 3)))
    save(work / "other" / "small.png", np.zeros((40, 64, 3)))  # not under 32x32, which would add a warning
    save(work / "hr" / "scene0.bmp", np.zeros((40, 56, 3)))
    (work / "other" / "broken.png").write_bytes(b"not an image")
    rows, line, words = BAD_ROWS[case]
    csv = work / "bad.csv"
    csv.write_text("\n".join(["dis,ref,mos", *rows]) + "\n")
    code, out, err = from_csv(capsys, csv, "--out", tmp_path / "Out")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {csv}:{line}: ") and words in err, err
    assert not (tmp_path / "Out").exists()  # nothing written


def test_csv_level_errors(source, tmp_path, capsys):
    folder, _ = source
    few = folder / "few.csv"
    few.write_text('"results/scene0_m0.png","hr/scene0.png",1\nresults/scene1_m0.png,hr/scene1.png,2\n')
    code, _, err = from_csv(capsys, few, "--out", tmp_path / "Few")
    assert code == 2 and f"error: {few}: 2 reference(s); a 7:1:2 split by reference needs at least 3" in err
    (tmp_path / "Full").mkdir()
    (tmp_path / "Full" / "keep.txt").write_text("x")
    code, _, err = from_csv(capsys, folder / "scores.csv", "--out", tmp_path / "Full")
    assert code == 2 and "Full: exists and is not an empty folder" in err
    code, _, err = from_csv(capsys, folder / "none.csv", "--out", tmp_path / "None")
    assert code == 2 and "none.csv: CSV file not found" in err


@pytest.mark.parametrize("images", ["symlink", "hardlink"])
def test_one_image_by_a_relative_and_an_absolute_path_is_one_image(source, tmp_path, capsys, monkeypatch, images):
    folder, _ = source
    rows = (folder / "scores.csv").read_text().splitlines()
    rows[1] = rows[1].replace("hr/", f"{folder / 'hr'}/")  # scene0.png by its absolute path, relative below
    mixed = folder / f"mixed_{images}.csv"
    mixed.write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(folder)
    try:
        code, out, err = from_csv(capsys, mixed.name, "--out", tmp_path / "Mixed", "--images", images)
    finally:
        mixed.unlink()
    assert code == 0, err
    written = (tmp_path / "Mixed" / "images").iterdir()
    assert sorted(p.name for p in written) == sorted({n for r in rows[1:] for n in
                                                      (Path(r.split(",")[0]).name, Path(r.split(",")[1]).name)})


@pytest.mark.parametrize("failure", ["disk_full", "ctrl_c"])
@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_midway_leaves_out_as_it_was_and_the_rerun_works(source, tmp_path, capsys, monkeypatch, failure,
                                                                   existing):
    folder, _ = source
    out = tmp_path / "data" / "MyIQA"
    if existing:
        out.mkdir(parents=True)  # an empty folder is accepted, and stays as it was on failure
    copy2, copied = shutil.copy2, []

    def fail_on_the_fifth(src, dst):
        if len(copied) == 4:
            raise OSError(28, "No space left on device") if failure == "disk_full" else KeyboardInterrupt
        copied.append(dst)
        return copy2(src, dst)

    monkeypatch.setattr(shutil, "copy2", fail_on_the_fifth)
    code, out_text, err = from_csv(capsys, folder / "scores.csv", "--out", out)
    assert (code, out_text) == ((2, "") if failure == "disk_full" else (130, ""))
    assert err.count("\n") == 1 and ("no space left on device" in err if failure == "disk_full" else
                                     err == "interrupted\n"), err
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == (["MyIQA"] if existing else [])
    assert not existing or list(out.iterdir()) == []
    monkeypatch.setattr(shutil, "copy2", copy2)
    assert from_csv(capsys, folder / "scores.csv", "--out", out)[0] == 0
    assert len(list((out / "images").iterdir())) == SCENES * (METHODS + 1)
