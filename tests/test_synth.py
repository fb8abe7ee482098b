"""The synthetic corpus: determinism, SPEC section 10 layouts read back through afine.labels / afine.datasets,
graded MOS, DiffIQA classes, SRIQA-Bench files, command-line errors."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from afine import synth
from afine.datasets import ImageIndex, TripletDataset, diffiqa_type_file, sriqa_pairs, triplet_file
from afine.image import image_size, load_image
from afine.labels import SPLITS, read_mos, read_sriqa_mos, read_triplets
from tests import procs

TRADITIONAL = {  # name -> (reference pattern, distorted pattern, suffix, file signature, MOS range, columns)
    "KADID10K": (r"I\d\d", r"I\d\d_\d\d_\d\d", ".png", b"\x89PNG", (1.0, 5.0), 4),
    "PIPAL": (r"A\d{4}", r"A\d{4}_\d\d_\d\d", ".bmp", b"BM", (1000.0, 1700.0), 3),
    "TID2013": (r"i\d\d", r"i\d\d_\d\d_\d", ".bmp", b"BM", (0.0, 9.0), 3),
}
TYPES = ("PSY", "PNY", "SNY", "PYY", "NYY")
RANK = {"P": 2, "S": 1, "Y": 1, "N": 0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "corpus"
    synth.generate(root, seed=0, scale="small", progress=False)
    return root


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def columns(path: Path) -> set[int]:
    return {len(line.split(",")) for line in path.read_text().splitlines() if line}


def level_of(name: str) -> tuple[str, str, int]:
    """(reference, type, level) from a distorted file name like I01_03_02.png / A0002_00_01.bmp / i01_01_2.bmp."""
    ref, kind, level = Path(name).stem.split("_")
    return ref, kind, int(level)


# ---------------------------------------------------------------------------------------------- determinism, CLI


def test_same_seed_identical_bytes_via_cli_other_seed_differs(tmp_path, capsys, monkeypatch):
    # the small scale's generators on 4 references a dataset (the fourth of the odd size), so three corpora are quick
    few = dataclasses.replace(synth.SCALES["small"], references=4, diffiqa_references=4, sriqa_scenes=2)
    monkeypatch.setitem(synth.SCALES, "few", few)
    synth.generate(tmp_path / "first", seed=0, scale="few", progress=False)
    assert synth.main(["--out", str(tmp_path / "again"), "--seed", "0", "--scale", "few"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert str(tmp_path / "again") in out[0]
    assert [line.split(":")[0] for line in out[1:]] == list(synth.DATASETS)
    first = digests(tmp_path / "first")
    assert len(first) > 400
    assert digests(tmp_path / "again") == first
    synth.generate(tmp_path / "other", seed=1, scale="few", progress=False)
    other = digests(tmp_path / "other")
    images = [k for k in first if k.endswith((".png", ".bmp"))]
    changed = sum(other.get(k) != first[k] for k in images)
    assert changed > 0.9 * len(images)
    assert other["KADID10K/Train/Triplet/Triplet.txt"] != first["KADID10K/Train/Triplet/Triplet.txt"]


@pytest.mark.parametrize("argv, message", [
    (["--scale", "huge"], "huge"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "x"], "--seed"),
    ([], "--out"),
])
def test_bad_arguments_one_line_error(argv, message, tmp_path, capsys):
    if argv:
        argv = ["--out", str(tmp_path / "c"), *argv]
    assert synth.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_existing_corpus_is_not_overwritten(corpus):
    before = digests(corpus / "PIPAL")
    result = procs.run([sys.executable, "-m", "afine.synth", "--out", corpus])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "already exists" in result.stderr
    assert digests(corpus / "PIPAL") == before


# ---------------------------------------------------------------------------------------------- traditional sets


@pytest.mark.parametrize("name", TRADITIONAL)
def test_traditional_layout_and_labels(corpus, name):
    ref_re, dis_re, suffix, signature, (low, high), ncols = TRADITIONAL[name]
    root = corpus / name
    files = {p.name for p in (root / "images").iterdir()}
    assert all(p.is_file() for p in (root / "images").iterdir())  # distorted and references together, flat
    refs = {f for f in files if re.fullmatch(ref_re + re.escape(suffix), f)}
    distorted = {f for f in files if re.fullmatch(dis_re + re.escape(suffix), f)}
    assert refs and distorted and refs | distorted == files
    assert all((root / "images" / f).read_bytes().startswith(signature) for f in sorted(files)[:20])
    index = ImageIndex(root / "images")

    refs_per_split, seen = {}, set()
    for split in SPLITS:
        mos_files = sorted((root / split / "MOS").glob("*.txt"))
        refs_per_split[split] = {p.stem for p in mos_files}
        records = []
        for path in mos_files:
            assert columns(path) == {ncols}
            group = read_mos(path)
            assert {r.ref for r in group} == {path.stem + suffix}
            assert all((r.var is not None) == (ncols == 4) for r in group)
            assert all(low <= r.mos <= high for r in group)
            records += group
        seen |= {r.dis for r in records}
        triplets = read_triplets(triplet_file(corpus, name, split))
        assert triplets and columns(triplet_file(corpus, name, split)) == {6}
        mos = {r.dis: r.mos for r in records} | {r.ref: np.inf for r in records}
        group_of = {r.dis: r.ref for r in records} | {r.ref: r.ref for r in records}
        for t in triplets:
            assert group_of[t.x1] == group_of[t.x2] == t.y  # pairs stay within one reference group
            assert t.g12 == (1.0 if mos[t.x1] > mos[t.x2] else 0.0 if mos[t.x1] < mos[t.x2] else 0.5)
            for n in (t.x1, t.x2, t.y):
                assert index[n].parent == root / "images"
    assert [len(refs_per_split[s]) for s in SPLITS] == [21, 3, 6]  # 7:1:2 of 30 references
    assert set.union(*refs_per_split.values()) == {Path(f).stem for f in refs}
    assert seen == distorted  # every distorted image has exactly one MOS line in exactly one split


@pytest.mark.parametrize("name", TRADITIONAL)
def test_mos_falls_with_distortion_strength(corpus, name):
    root = corpus / name
    series = defaultdict(list)
    for path in root.glob("*/MOS/*.txt"):
        for r in read_mos(path):
            ref, kind, level = level_of(r.dis)
            series[ref, kind].append((level, r.mos, r.dis, r.ref))
    assert len(series) >= 40
    for levels in series.values():
        levels.sort()
        assert len(levels) >= 4
        assert all(a[1] > b[1] for a, b in zip(levels, levels[1:]))  # strictly worse at every stronger level
    # and the pixels really are graded: distance to the reference grows with level for noise and blur
    kinds = {"KADID10K": ("01", "03"), "PIPAL": ("02", "03"), "TID2013": ("01", "03")}[name]  # blur/noise types
    for levels in (v for k, v in series.items() if k[1] in kinds):
        reference = load_image(root / "images" / levels[0][3])
        error = [float((load_image(root / "images" / dis) - reference).abs().mean()) for _, _, dis, _ in levels]
        assert all(a < b for a, b in zip(error, error[1:])), error


def test_sizes_match_and_some_are_not_multiples_of_32(corpus):
    sizes = []
    for name in TRADITIONAL:
        for path in (corpus / name).glob("*/MOS/*.txt"):
            for r in read_mos(path):
                ref_size = image_size(corpus / name / "images" / r.ref)
                assert image_size(corpus / name / "images" / r.dis) == ref_size
                sizes.append(ref_size)
    for split in SPLITS:
        for ref in (corpus / "DiffIQA" / split / "images" / "Original").glob("*.png"):
            generated = list((corpus / "DiffIQA" / split / "images").glob(f"*/{ref.stem}_*.png"))
            assert len(generated) == 3 * synth.SCALES["small"].diffiqa_per_class
            assert {image_size(p) for p in generated} == {image_size(ref)}
            sizes.append(image_size(ref))
    odd = [s for s in sizes if s[0] % 32 or s[1] % 32]
    assert 0 < len(odd) < len(sizes) / 2  # mostly multiples of 32, some not
    assert all(h <= 128 and w <= 128 for h, w in sizes)  # small scale stays tiny


# ---------------------------------------------------------------------------------------------- DiffIQA


def diffiqa_classes(corpus: Path, split: str) -> dict[str, str]:
    """Class letter of every generated image, as its per-type lists state it (must be unambiguous)."""
    classes: dict[str, str] = {}
    for t in TYPES:
        for tri in read_triplets(diffiqa_type_file(corpus, split, t)):
            for name, letter in ((tri.x1, t[0]), (tri.x2, t[1])):
                if letter == "Y":
                    assert name == tri.y
                else:
                    assert classes.setdefault(name, letter) == letter
    return classes


@pytest.mark.parametrize("split", SPLITS)
def test_diffiqa_layout_and_type_lists(corpus, split):
    root = corpus / "DiffIQA" / split
    stems = sorted(p.stem for p in (root / "images" / "Original").glob("*.png"))
    assert stems
    generated = sorted(p for p in (root / "images").glob("*/*.png") if p.parent.name != "Original")
    for p in generated:
        stem, nn = p.stem.split("_")
        assert stem in stems and p.parent.name == nn and re.fullmatch(r"\d\d", nn)
    index = ImageIndex(root / "images")
    folder = root / "trainlabel" / "TripletEachType" if split == "Train" else root / "TripletEachType"
    for t in TYPES:
        path = diffiqa_type_file(corpus, split, t)
        assert path == folder / f"{t}.txt" and columns(path) == {4}
        triplets = read_triplets(path)
        assert triplets and all(tri.g1y is None for tri in triplets)
        for tri in triplets:
            assert tri.g12 == (0.0 if t == "NYY" else 1.0)
            assert tri.y == tri.x1.split("_")[0] + ".png" and index[tri.y].parent.name == "Original"
            assert index[tri.x1] and index[tri.x2]
    classes = diffiqa_classes(corpus, split)
    assert sorted(classes) == sorted(p.name for p in generated)  # every generated image is in some list
    for stem in stems:
        mine = [c for n, c in classes.items() if n.startswith(stem + "_")]
        assert sorted(mine) == sorted("NPS" * synth.SCALES["small"].diffiqa_per_class)


def test_diffiqa_train_triplets_follow_classes(corpus):
    classes = diffiqa_classes(corpus, "Train") | {p.name: "Y" for p in
                                                 (corpus / "DiffIQA/Train/images/Original").glob("*.png")}
    path = triplet_file(corpus, "DiffIQA", "Train")
    assert path == corpus / "DiffIQA/Train/trainlabel/Triplet/Triplet.txt" and columns(path) == {6}
    triplets = read_triplets(path)

    def g(a, b):
        return 1.0 if RANK[classes[a]] > RANK[classes[b]] else 0.0 if RANK[classes[a]] < RANK[classes[b]] else 0.5

    for t in triplets:
        assert (t.g12, t.g1y, t.g2y) == (g(t.x1, t.x2), g(t.x1, t.y), g(t.x2, t.y))
    assert {t.g12 for t in triplets} == {0.0, 0.5, 1.0}  # both orders occur, and ties with the reference


def error_to(source: np.ndarray, path: Path) -> float:
    return float(np.abs(load_image(path).permute(1, 2, 0).numpy() - source).mean())


def test_diffiqa_classes_are_what_the_letters_say(corpus):
    """P closer to the clean source than the reference, S about as close, N farther (the source is re-made
    from its seed). The N images made from the reference itself are only a little farther (blurred further,
    with invented texture), so the margin for N is small."""
    root = corpus / "DiffIQA" / "Test"
    classes = diffiqa_classes(corpus, "Test")
    for ref in sorted((root / "images" / "Original").glob("*.png")):
        i = int(ref.stem) - 1
        h, w = image_size(ref)
        source = synth.natural_image(synth._rng(0, "DiffIQA", 0, i), h, w)
        assert source.shape == (h, w, 3)
        reference = error_to(source, ref)
        for path in (root / "images").glob(f"[0-9]*/{ref.stem}_*.png"):
            e, c = error_to(source, path), classes[path.name]
            if c == "P":
                assert e < 0.9 * reference
            elif c == "N":
                assert e > 1.05 * reference
            else:
                assert abs(e - reference) < 0.15 * reference


# ---------------------------------------------------------------------------------------------- SRIQA-Bench


def test_sriqa_bench_files(corpus):
    root = corpus / "SRIQA-Bench"
    index = ImageIndex(root / "images")
    scenes = sorted(p.stem for p in (root / "MOS").glob("*.txt"))
    assert len(scenes) == synth.SCALES["small"].sriqa_scenes
    outscored = 0  # scenes where some SR result has a higher MOS than the Original photo
    separators = set()
    for scene in scenes:
        everything = read_sriqa_mos(root / "MOS" / f"{scene}.txt")
        assert len(everything) == 11 and len({n for n, _ in everything}) == 11
        assert len(sriqa_pairs(everything)) == 55
        original = f"{scene}_Original.png"
        assert index[original] == root / "images" / "Original" / original
        methods = [n for n, _ in everything if n != original]
        assert len(methods) == 10 and all(re.fullmatch(re.escape(scene) + r"_\w+x4\.png", n) for n in methods)
        assert all(0 <= s <= 100 for _, s in everything)
        scores = dict(everything)
        assert scores[original] > scores[f"{scene}_Bicubicx4.png"]  # the photo beats plain upsampling
        outscored += max(scores, key=scores.get) != original
        reg, gen = (dict(read_sriqa_mos(root / sub / f"{scene}.txt")) for sub in ("MOS_Reg", "MOS_Gen"))
        assert len(reg) == len(gen) == 6 and set(reg) & set(gen) == {original}
        assert set(reg) | set(gen) == set(scores)
        assert all(scores[n] == s for n, s in (reg | gen).items())
        assert index[f"{scene}_Bicubicx4.png"] and f"{scene}_Bicubicx4.png" in reg
        assert f"{scene}_ESRGANx4.png" in gen
        for sub in ("MOS", "MOS_Reg", "MOS_Gen"):
            for line in (root / sub / f"{scene}.txt").read_text().splitlines():
                separators.add("," if "," in line else " ")
            assert {image_size(index[n]) for n, _ in everything} == {image_size(index[original])}
    assert separators == {",", " "}
    assert 0 < outscored < len(scenes)  # as in the real benchmark, the reference is not always the best image


# ---------------------------------------------------------------------------------------------- loading for training


@pytest.mark.parametrize("split", SPLITS)
def test_lists_load_as_triplet_datasets(corpus, split):
    names = ["DiffIQA", "KADID10K", "PIPAL", "TID2013"]
    data = TripletDataset.from_lists(corpus, names, split, augment=False)
    expected = sum(len(read_triplets(triplet_file(corpus, n, split))) for n in names[1:])
    if split == "Train":
        expected += len(read_triplets(triplet_file(corpus, "DiffIQA", "Train")))
    else:
        expected += sum(len(read_triplets(diffiqa_type_file(corpus, split, t))) for t in TYPES)
    assert len(data) == expected
    item = data[len(data) - 1]
    assert item["x1"].shape == item["x2"].shape == item["y"].shape and item["x1"].shape[0] == 3
