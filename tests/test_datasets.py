"""Dataset layouts, ImageIndex, shared triplet augmentation, TripletDataset, collation, SRIQA pairs."""

import math
import re
from itertools import product

import numpy as np
import pytest
import torch
from PIL import Image

from afine.batches import GlobalBatches
from afine.datasets import (
    DATASETS,
    ImageIndex,
    TripletDataset,
    apply_augmentation,
    augmentation,
    augmentation_flags,
    collate_triplets,
    dataset_dir,
    diffiqa_type_file,
    sriqa_mos_files,
    sriqa_pairs,
    triplet_file,
)
from afine.errors import AfineError
from afine.image import load_image
from afine.labels import Triplet, write_triplets


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def _noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3))


# ---------------------------------------------------------------------------------------------- ImageIndex


def test_image_index_recursive_lookup(tmp_path):
    a = _png(tmp_path / "images" / "Original" / "a.png", _noise(2, 2, 0))
    b = _png(tmp_path / "images" / "01" / "a_01.png", _noise(2, 2, 1))
    (tmp_path / "images" / "01" / "Thumbs.db").write_bytes(b"x")  # not an image: ignored
    (tmp_path / "images" / "Original" / "Thumbs.db").write_bytes(b"x")
    index = ImageIndex(tmp_path / "images")
    assert index["a.png"] == a and index["a_01.png"] == b
    assert "a.png" in index and "b.png" not in index and len(index) == 2


def test_image_index_duplicate_names_both(tmp_path):
    first = _png(tmp_path / "images" / "x" / "same.png", _noise(2, 2, 0))
    second = _png(tmp_path / "images" / "y" / "same.png", _noise(2, 2, 0))
    with pytest.raises(AfineError) as e:
        ImageIndex(tmp_path / "images")
    assert str(first) in str(e.value) and str(second) in str(e.value)


def test_image_index_missing_folder_and_name(tmp_path):
    with pytest.raises(AfineError, match="images folder not found"):
        ImageIndex(tmp_path / "images")
    (tmp_path / "images").mkdir()
    with pytest.raises(AfineError) as e:
        ImageIndex(tmp_path / "images")["ghost.png"]
    assert "ghost.png" in str(e.value) and str(tmp_path / "images") in str(e.value)


# ---------------------------------------------------------------------------------------------- layout


def _touch(path, text="a,b,r,1\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_triplet_file_layouts(tmp_path):
    for name in DATASETS:
        (tmp_path / name).mkdir()
    assert dataset_dir(tmp_path, "PIPAL") == tmp_path / "PIPAL"
    kadid = _touch(tmp_path / "KADID10K" / "Validation" / "Triplet" / "Triplet.txt")
    assert triplet_file(tmp_path, "KADID10K", "Validation") == kadid
    diff = _touch(tmp_path / "DiffIQA" / "Train" / "trainlabel" / "Triplet" / "Triplet.txt")
    assert triplet_file(tmp_path, "DiffIQA", "Train") == diff
    with pytest.raises(AfineError, match=r"TID2013/Test/Triplet/Triplet.txt: .*not found"):
        triplet_file(tmp_path, "TID2013", "Test")
    with pytest.raises(AfineError, match="diffiqa_type_file"):
        triplet_file(tmp_path, "DiffIQA", "Test")
    with pytest.raises(AfineError, match="unknown split"):
        triplet_file(tmp_path, "KADID10K", "train")
    with pytest.raises(AfineError, match="unknown dataset"):
        dataset_dir(tmp_path, "LIVE")
    with pytest.raises(AfineError, match="dataset folder not found"):
        dataset_dir(tmp_path / "elsewhere", "PIPAL")


def test_diffiqa_type_file_train_vs_eval_layout(tmp_path):
    train = _touch(tmp_path / "DiffIQA" / "Train" / "trainlabel" / "TripletEachType" / "PSY.txt")
    val = _touch(tmp_path / "DiffIQA" / "Validation" / "TripletEachType" / "PNY.txt")
    test = _touch(tmp_path / "DiffIQA" / "Test" / "TripletEachType" / "NYY.txt")
    assert diffiqa_type_file(tmp_path, "Train", "PSY") == train
    assert diffiqa_type_file(tmp_path, "Validation", "PNY") == val
    assert diffiqa_type_file(tmp_path, "Test", "NYY") == test
    with pytest.raises(AfineError, match="Test/TripletEachType/PSY.txt"):
        diffiqa_type_file(tmp_path, "Test", "PSY")


def test_sriqa_mos_files_subsets(tmp_path):
    a = _touch(tmp_path / "SRIQA-Bench" / "MOS" / "s1.txt", "x,1\n")
    b = _touch(tmp_path / "SRIQA-Bench" / "MOS_Gen" / "s1.txt", "x,1\n")
    assert sriqa_mos_files(tmp_path) == [a]
    assert sriqa_mos_files(tmp_path, "Generative") == [b]
    with pytest.raises(AfineError, match="MOS_Reg"):
        sriqa_mos_files(tmp_path, "Regression")


def test_sriqa_pairs_all_unordered_pairs():
    scores = [(f"s_{i}.png", float(i % 4)) for i in range(11)]
    pairs = sriqa_pairs(scores)
    assert len(pairs) == 55
    assert len({frozenset(p[:2]) for p in pairs}) == 55
    value = dict(scores)
    for a, b, g in pairs:
        assert g == (1.0 if value[a] > value[b] else 0.0 if value[a] < value[b] else 0.5)
    assert pairs[0] == ("s_0.png", "s_1.png", 0.0) and ("s_0.png", "s_4.png", 0.5) in pairs
    with pytest.raises(AfineError, match="twice"):
        sriqa_pairs([("a", 1.0), ("a", 2.0)])


# ---------------------------------------------------------------------------------------------- augmentation


def _dihedral(x):
    """All 8 (flags, transformed x) of the flip/transpose group."""
    return [(f, apply_augmentation(x, f)) for f in product((False, True), repeat=3)]


def test_apply_augmentation_hand_values():
    x = torch.arange(6.0).view(1, 2, 3)  # [[0,1,2],[3,4,5]]
    assert apply_augmentation(x, (True, False, False)).tolist() == [[[2, 1, 0], [5, 4, 3]]]
    assert apply_augmentation(x, (False, True, False)).tolist() == [[[3, 4, 5], [0, 1, 2]]]
    assert apply_augmentation(x, (False, False, True)).tolist() == [[[0, 3], [1, 4], [2, 5]]]
    assert apply_augmentation(x, (True, True, True)).tolist() == [[[5, 2], [4, 1], [3, 0]]]
    assert len({tuple(y.flatten().tolist()) + tuple(y.shape) for _, y in _dihedral(x)}) == 8


def test_augmentation_deterministic_and_balanced():
    flags = augmentation_flags(7, 3, np.arange(4000))
    assert flags.shape == (4000, 3)
    assert all(augmentation(7, 3, i) == tuple(flags[i].tolist()) for i in (0, 1, 999, 3999))
    assert np.all(np.abs(flags.mean(0) - 0.5) < 0.04)
    combos = np.bincount(flags @ np.array([4, 2, 1]), minlength=8)
    assert combos.min() > 400  # all 8 combinations occur, roughly uniformly
    assert not np.array_equal(flags, augmentation_flags(7, 4, np.arange(4000)))
    assert not np.array_equal(flags, augmentation_flags(8, 3, np.arange(4000)))
    assert np.array_equal(flags, augmentation_flags(7, 3, np.arange(4000)))


# ---------------------------------------------------------------------------------------------- TripletDataset


def _triplet_files(tmp_path, n, h=5, w=7):
    """n triplets of distinct asymmetric noise images of size h x w."""
    items = []
    for i in range(n):
        paths = [_png(tmp_path / f"t{i}_{role}.png", _noise(h, w, 3 * i + k)) for k, role in enumerate("abr")]
        items.append((*paths, 1.0, 0.0, 0.5))
    return items


def test_dataset_items_share_one_augmentation(tmp_path):
    items = _triplet_files(tmp_path, 24)
    data = TripletDataset(items, augment=True, seed=11)
    seen = set()
    for epoch in (0, 1):
        for i, (p1, p2, py, *_) in enumerate(items):
            sample = data[(epoch, i)]
            found = []
            for key, path in (("x1", p1), ("x2", p2), ("y", py)):
                matches = [f for f, t in _dihedral(load_image(path)) if t.shape == sample[key].shape
                           and torch.equal(t, sample[key])]
                assert len(matches) == 1
                found.append(matches[0])
            assert found[0] == found[1] == found[2] == augmentation(11, epoch, i)
            assert data.shape((epoch, i)) == tuple(sample["x1"].shape[-2:])
            assert sample["keys"][0].startswith(str(p1)) and sample["keys"][2].startswith(str(py))
            seen.add(found[0])
    assert len(seen) >= 6  # augmentation really varies


def test_dataset_without_augmentation_and_labels(tmp_path):
    items = _triplet_files(tmp_path, 2)
    data = TripletDataset(items, augment=False)
    sample = data[(5, 1)]
    assert torch.equal(sample["x1"], load_image(items[1][0]))
    assert sample["x1"].shape == (3, 5, 7) and data.shape(1) == (5, 7)
    assert sample["g12"].dtype == torch.float32 and sample["g12"].shape == ()
    assert (sample["g12"].item(), sample["g1y"].item(), sample["g2y"].item()) == (1.0, 0.0, 0.5)


def test_keys_identify_path_and_augmentation(tmp_path):
    items = _triplet_files(tmp_path, 1)
    items = items + [(items[0][1], items[0][0], items[0][2], 0.0, 0.0, 0.5)]  # same images, other triplet
    data = TripletDataset(items, seed=0)
    for epoch in range(40):
        a, b = data[(epoch, 0)], data[(epoch, 1)]
        same = augmentation(0, epoch, 0) == augmentation(0, epoch, 1)
        assert (a["keys"][0] == b["keys"][1]) == same
        assert (a["keys"][0] == b["keys"][1]) == torch.equal(a["x1"], b["x2"])


def test_size_mismatch_names_files(tmp_path):
    a = _png(tmp_path / "a.png", _noise(4, 4, 0))
    b = _png(tmp_path / "b.png", _noise(4, 5, 1))
    r = _png(tmp_path / "r.png", _noise(4, 4, 2))
    data = TripletDataset([(a, b, r, 1.0, 0.0, 0.0)])
    for get in (data.shape, data.__getitem__):
        with pytest.raises(AfineError, match="differ in size") as e:
            get(0)
        assert str(a) in str(e.value) and str(b) in str(e.value)


def _corpus(root):
    """A tiny KADID10K + DiffIQA layout with mixed image sizes."""
    kadid = root / "KADID10K"
    for ref, (h, w) in (("I01", (6, 8)), ("I02", (8, 6))):
        _png(kadid / "images" / f"{ref}.png", _noise(h, w, 0))
        for d in range(3):
            _png(kadid / "images" / f"{ref}_01_0{d}.png", _noise(h, w, d + 1))
    write_triplets(kadid / "Train" / "Triplet" / "Triplet.txt", [
        Triplet("I01_01_00.png", "I01_01_01.png", "I01.png", 1.0, 0.0, 0.0),
        Triplet("I01_01_02.png", "I01.png", "I01.png", 0.0, 0.0, 0.5),
        Triplet("I02_01_00.png", "I02_01_01.png", "I02.png", 0.5, 0.0, 0.0),
    ])
    diff = root / "DiffIQA"
    for split in ("Train", "Test"):
        _png(diff / split / "images" / "Original" / "p.png", _noise(4, 4, 9))
        for nn in ("01", "02"):
            _png(diff / split / "images" / nn / f"p_{nn}.png", _noise(4, 4, int(nn)))
    write_triplets(diff / "Train" / "trainlabel" / "Triplet" / "Triplet.txt",
                   [Triplet("p_01.png", "p_02.png", "p.png", 1.0, 0.0, 0.0)])
    for t, g in (("PSY", 1.0), ("NYY", 0.0)):
        write_triplets(diff / "Test" / "TripletEachType" / f"{t}.txt", [Triplet("p_01.png", "p_02.png", "p.png", g)])


def test_from_lists_resolves_names(tmp_path):
    _corpus(tmp_path)
    data = TripletDataset.from_lists(tmp_path, ["KADID10K", "DiffIQA"], "Train", augment=False)
    assert len(data) == 4
    assert data.items[0][0] == tmp_path / "KADID10K" / "images" / "I01_01_00.png"
    assert data.items[3][:3] == (tmp_path / "DiffIQA" / "Train" / "images" / "01" / "p_01.png",
                                 tmp_path / "DiffIQA" / "Train" / "images" / "02" / "p_02.png",
                                 tmp_path / "DiffIQA" / "Train" / "images" / "Original" / "p.png")
    assert [data.shape(i) for i in range(4)] == [(6, 8), (6, 8), (8, 6), (4, 4)]
    test = TripletDataset.from_lists(tmp_path, ["DiffIQA"], "Test", augment=False)
    assert [it[3] for it in test.items] == [1.0, 0.0]  # PSY then NYY
    assert math.isnan(test[0]["g1y"].item())  # 4-column lists carry no g1y / g2y


def test_from_lists_unknown_image_names_file_and_line(tmp_path):
    _corpus(tmp_path)
    path = tmp_path / "KADID10K" / "Train" / "Triplet" / "Triplet.txt"
    path.write_text(path.read_text() + "\nI01_01_00.png,I09.png,I01.png,0,0,0\n")
    with pytest.raises(AfineError, match=rf"^{re.escape(str(path))}:5: image 'I09.png' not found under "):
        TripletDataset.from_lists(tmp_path, ["KADID10K"], "Train")


def test_loader_batches_stack_and_match_across_workers(tmp_path):
    _corpus(tmp_path)
    data = TripletDataset.from_lists(tmp_path, ["KADID10K", "DiffIQA"], "Train", seed=4)

    def run(workers):
        batches = GlobalBatches(len(data), data.shape, batch_size=2, seed=4)
        loader = torch.utils.data.DataLoader(data, batch_sampler=batches.sampler(2 * batches.steps_per_epoch,
                                                                                 3 * batches.steps_per_epoch),
                                             collate_fn=collate_triplets, num_workers=workers)
        return list(loader)  # epoch 2

    serial, parallel = run(0), run(2)
    assert sum(len(b["keys"]) for b in serial) == 4
    for a, b in zip(serial, parallel, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["x1"], b["x1"]) and torch.equal(a["y"], b["y"])
        assert a["x1"].shape == a["x2"].shape == a["y"].shape and a["g12"].shape == (len(a["keys"]),)
        assert isinstance(a["keys"][0], tuple) and len(a["keys"][0]) == 3


def test_collate_refuses_mixed_sizes_naming_the_files(tmp_path):
    """Batches are planned by shape from the headers: a triplet of another size in one (its images rewritten
    during the run) is one error naming its file and the batch's first, with both sizes."""
    items = _triplet_files(tmp_path, 1, 4, 4) + _triplet_files(tmp_path / "b", 1, 4, 6)
    data = TripletDataset(items, augment=False)
    with pytest.raises(AfineError) as e:
        collate_triplets([data[0], data[1]])
    assert str(e.value) == (f"{items[1][0]}: triplets of different sizes in one batch planned as one shape from the "
                            f"headers, its triplet 6x4, {items[0][0]}'s 4x4 (an image changed during the run)")
