"""Stages 2 and 3 on cached statistics of the frozen networks: the same triplets, augmentations and result as
the uncached path, a cache keyed by the frozen files, rebuilt when half-written, and bitwise resume."""
# ruff: noqa: F811 - the fixtures imported from test_train are taken as test parameters of the same names

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_stage1
import train_stage2
import train_stage3
from afine import cache
from afine.batches import GlobalBatches
from afine.datasets import TripletDataset, collate_triplets
from afine.distributed import Dist
from tests.test_train import (  # noqa: F401 - module-scoped fixtures shared with test_train
    args,
    one_thread,
    square,
    stage1_config,
    stage1_run,
    stage2_config,
    stage2_run,
    stage3_config,
    synth,
    weights,
)
from tests.test_train_distributed import on_two_processes

CPU = torch.device("cpu")
# Adam's eps at 1e-3 (as in test_train_distributed): with the published 1e-8 an update is +-lr for any gradient,
# so an entry whose gradient is rounding noise (float16 storage, another summation order) moves by lr either
# way (after 4 steps at lr 1e-2 the runs then differ by 1e-4 in alpha); at 1e-3 the updates follow the gradients,
# which move alpha by up to 1.5e-3 in 4 steps while the two runs differ by about 2e-6.
EXACT = {"optim.eps": 1e-3}


def trained(model, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights(model).items() if k.startswith(prefixes)}


def validations(out: Path) -> list[tuple[int, dict]]:
    return [(r["step"], r["val"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "val" in r]


def entries(root: Path, kind: str = cache.SIMILARITY, name: str = "train") -> list[Path]:
    return sorted(root.glob(f"{kind}-{name}-*"))


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


# ---------------------------------------------------------------------------------------------- same result


def test_stage2_cached_run_ends_where_the_uncached_run_ends(synth, stage1_run, tmp_path):
    over = dict(train_datasets="PIPAL", val_datasets="PIPAL", batch_size=8, total_iter=4, val_every=2, **EXACT)
    start = trained(train_stage2.build_model(stage2_config(synth, tmp_path / "x", stage1_run, **over)), ("fidelity",))
    plain = trained(train_stage2.train(stage2_config(synth, tmp_path / "plain", stage1_run, **over), Dist()),
                    ("fidelity",))
    model = train_stage2.train(stage2_config(synth, tmp_path / "cached", stage1_run, cache="true", **over), Dist())
    cached = trained(model, ("fidelity",))
    assert_close(cached, plain, atol=1e-4)
    assert all((plain[k] - start[k]).abs().max() > 1e-3 for k in ("fidelity.alpha", "fidelity.beta"))  # trained
    assert validations(tmp_path / "cached") == validations(tmp_path / "plain")
    assert [s for s, _ in validations(tmp_path / "plain")] == [0, 2, 4]
    [entry] = entries(tmp_path / "cached" / "cache")  # default place: inside the run folder
    assert (entry / "manifest.json").is_file() and len(entries(tmp_path / "cached" / "cache", name="val-PIPAL")) == 1

    # row level: a step's F from the float16 cache against the CLIP path, on the same triplets and augmentations
    cfg = stage2_config(synth, tmp_path / "cached", stage1_run, cache="true", **over)
    data = TripletDataset.from_lists(synth, ["PIPAL"], "Train", seed=0)
    listed = cache.open_or_build(cache.SIMILARITY, tmp_path / "cached" / "cache", "train", data, model,
                                 json.loads((tmp_path / "cached" / "built_on.json").read_text()), Dist())
    assert listed.folder == entry  # found, not rebuilt
    plan = GlobalBatches(len(data), data.shape, 8, seed=0)
    table = cache.pair_table(data)
    same = {p for p, (x, y) in enumerate(table.pairs) if x == y}
    assert same  # the references are among the test images
    for step in (0, 5):  # epochs 0 and 1: other augmentations
        for keys in plan.micro_batches(step):
            f_clip = torch.cat(train_stage2.fidelity_scores(model, collate_triplets([data[k] for k in keys]), CPU,
                                                            cfg.amp))
            f_cached = torch.cat(train_stage2.cached_fidelity_scores(model, listed.read(keys), CPU))
            torch.testing.assert_close(f_cached, f_clip, rtol=0, atol=5e-4)
    rows = np.asarray(listed.arrays["similarity.npy"][sorted(same)])
    assert (rows == 1).all()  # a pair of an image with itself: S1 = S2 = 1, as the head computes them


def test_stage3_cached_run_ends_where_the_uncached_run_ends(synth, stage2_run, tmp_path):
    over = dict(train_datasets="PIPAL", val_datasets="PIPAL,DiffIQA", batch_size=8, total_iter=4, val_every=2)
    names = ("natural_scale", "fidelity_scale", "adapter")
    cfg = stage3_config(synth, tmp_path / "x", stage2_run, **over)
    train_stage3.resolve_stage_dirs(cfg)
    start = trained(train_stage3.build_model(cfg), names)
    plain = trained(train_stage3.train(stage3_config(synth, tmp_path / "plain", stage2_run, **over), Dist()), names)
    cached = trained(train_stage3.train(stage3_config(synth, tmp_path / "cached", stage2_run, cache="true", **over),
                                        Dist()), names)
    assert_close(cached, plain, atol=1e-4)
    assert all((plain[k] - start[k]).abs().max() > 1e-3 for k in plain)
    assert validations(tmp_path / "cached") == validations(tmp_path / "plain")
    assert len(entries(tmp_path / "cached" / "cache", cache.SCORES)) == 1


# ---------------------------------------------------------------------------------------------- the cache folder


@pytest.fixture(scope="module")
def square_s1(square, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "s1"
    train_stage1.train(stage1_config(square, out, total_iter=1), Dist())
    return out


def stage2(square, out, s1, **over) -> dict[str, torch.Tensor]:
    over = {"batch_size": 4, "total_iter": 4, **EXACT, **over}
    return trained(train_stage2.train(stage2_config(square, out, s1, **over), Dist()), ("fidelity",))


def test_a_changed_frozen_file_gets_a_new_cache_never_the_stale_one(square, square_s1, tmp_path):
    shared = tmp_path / "cache"
    s1 = tmp_path / "s1"
    shutil.copytree(square_s1, s1)
    stage2(square, tmp_path / "a", s1, cache="true", cache_dir=shared)
    [old] = entries(shared)
    stage2(square, tmp_path / "b", square_s1, cache="true", cache_dir=shared)  # the same CLIP in another folder
    assert entries(shared) == [old]
    clip = torch.load(s1 / "clip_model.pth", weights_only=True)
    clip["visual.ln_pre.bias"] += 0.5
    torch.save(clip, s1 / "clip_model.pth")
    cached = stage2(square, tmp_path / "c", s1, cache="true", cache_dir=shared)
    plain = stage2(square, tmp_path / "d", s1)
    assert len(entries(shared)) == 2  # a new entry; the old one still serves runs on the old CLIP
    assert_close(cached, plain, atol=1e-4)
    # the run folder's own cache keeps only the current entry
    stage2(square, tmp_path / "a", s1, cache="true", resume="false", overwrite="true")
    assert len(entries(tmp_path / "a" / "cache")) == 1


def test_a_half_written_cache_is_rebuilt(square, square_s1, tmp_path, monkeypatch):
    reference = stage2(square, tmp_path / "ref", square_s1, cache="true")
    write = cache._write_similarities
    calls = []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while writing the rows
        return write(*a, **k)

    monkeypatch.setattr(cache, "_write_similarities", dying)
    with pytest.raises(KeyboardInterrupt):
        stage2(square, tmp_path / "run", square_s1, cache="true")
    monkeypatch.undo()
    [entry] = entries(tmp_path / "run" / "cache")
    assert not (entry / "manifest.json").exists()
    again = stage2(square, tmp_path / "run", square_s1, cache="true")
    assert all(torch.equal(again[k], v) for k, v in reference.items())
    assert (entry / "manifest.json").is_file()
    (entry / "similarity.npy").write_bytes(b"truncated")  # damaged after the manifest: sizes no longer match
    key = json.loads((entry / "manifest.json").read_text())["key"]
    assert cache.entry_problem(entry, key) == "similarity.npy is not of the size the manifest records"


def test_killed_cached_run_resumes_bitwise(square, square_s1, tmp_path, monkeypatch):
    over = {"total_iter": 8, "save_every": 2, "cache": "true", "cache_dir": tmp_path / "cache"}
    reference = stage2(square, tmp_path / "a", square_s1, **over)
    losses = train_stage2.cached_losses
    calls = []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return losses(*a, **k)

    monkeypatch.setattr(train_stage2, "cached_losses", dying)
    with pytest.raises(KeyboardInterrupt):
        stage2(square, tmp_path / "b", square_s1, **over)
    monkeypatch.undo()
    resumed = stage2(square, tmp_path / "b", square_s1, **over)
    assert all(torch.equal(resumed[k], v) for k, v in reference.items())
    assert len(entries(tmp_path / "cache")) == 1


def test_an_unusable_cache_dir_is_a_one_line_error(square, square_s1, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = args(square, tmp_path / "s2", stage1_dir=square_s1, cache="true", cache_dir=tmp_path / "file")
    assert train_stage2.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the training progress bar
    assert last.startswith("error: ") and f"{tmp_path / 'file'}: cannot use as cache_dir" in last




# ---------------------------------------------------------------------------------------------- one list's entry


@pytest.fixture(scope="module")
def tiny_model():
    from tests.tiny import random_afine, tiny_clip

    return random_afine(tiny_clip())


def open_entry(root: Path, data_root: Path, model, name: str = "val") -> cache.CachedList:
    """The stage-3 entry of the corpus' validation list (one augmentation slot: a few tiny encodes)."""
    data = TripletDataset.from_lists(data_root, ["KADID10K"], "Validation", augment=False)
    return cache.open_or_build(cache.SCORES, root, name, data, model, {"net.pth": "0" * 64}, Dist(), progress=False)


def rewrite(path: Path, restore_times: bool) -> None:
    """Write the file's bytes again in place; with `restore_times`, set its modification time back (`touch -r`)."""
    before = path.stat()
    while path.stat().st_ctime_ns == before.st_ctime_ns:  # file times have a clock tick of a few ms
        path.write_bytes(path.read_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns if restore_times else before.st_mtime_ns + 10**9))
    after = path.stat()
    assert after.st_size == before.st_size and (after.st_mtime_ns == before.st_mtime_ns) == restore_times


def test_a_rewritten_image_gets_a_new_entry_even_with_its_size_and_time_set_back(square, tiny_model, tmp_path):
    data, shared = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(square, data)
    first = open_entry(shared, data, tiny_model).folder
    assert open_entry(shared, data, tiny_model).folder == first  # nothing changed: found again
    image = data / "KADID10K" / "images" / "I00_01.png"
    rewrite(image, restore_times=False)  # a plain rewrite: a new modification time
    second = open_entry(shared, data, tiny_model).folder
    rewrite(image, restore_times=True)  # size and modification time as before: only the change time tells
    third = open_entry(shared, data, tiny_model).folder
    moved = data / "KADID10K" / "images" / "new.png"  # replaced by another file (another inode)
    shutil.copy2(image, moved)
    os.replace(moved, image)
    fourth = open_entry(shared, data, tiny_model).folder
    assert len({first, second, third, fourth}) == 4 and len(list(shared.glob("scores-val-*"))) == 4


@pytest.mark.parametrize("field", ["st_ino", "st_size", "st_mtime_ns", "st_ctime_ns"])
def test_the_key_changes_with_each_stat_field_of_an_image_alone(tmp_path, monkeypatch, field):
    """The key from a faked stat of one image (Path.stat, which cache_key reads) with one field changed and the
    others as they are: each of inode, size, modification time and change time alone gives another key; the
    same stat gives the same key, and so does another access time (reading an image must not invalidate)."""
    test, ref = tmp_path / "test.png", tmp_path / "ref.png"
    test.write_bytes(b"test image")
    ref.write_bytes(b"reference")
    table = cache.PairTable([(test, ref)], [ref], np.zeros(1, dtype=np.int64), np.zeros((0, 3), dtype=np.int64),
                            np.zeros(0, dtype=np.float32), np.zeros(1, dtype=np.int64))
    real_stat, changed = Path.stat, {}

    def faked_stat(self, *args, **kwargs):
        st = real_stat(self, *args, **kwargs)
        fields = {name: getattr(st, name) for name in dir(st) if name.startswith("st_")}
        return SimpleNamespace(**{**fields, **changed}) if self == test else st

    monkeypatch.setattr(Path, "stat", faked_stat)

    def key() -> str:
        return cache.cache_key(cache.SCORES, table, {"net.pth": "0" * 64}, "fp32", 1)

    before = key()
    assert key() == before  # a stat alone: no clock, no randomness in the key
    changed["st_atime_ns"] = real_stat(test).st_atime_ns + 10**9
    assert key() == before
    changed[field] = getattr(real_stat(test), field) + 1
    assert key() != before


def test_a_damaged_npy_header_is_rebuilt_with_a_warning(square, tiny_model, tmp_path, capsys):
    entry = open_entry(tmp_path / "cache", square, tiny_model)
    expected = {name: np.array(a) for name, a in entry.arrays.items()}
    path = entry.folder / "pair_scores.npy"
    del entry
    for damage in (b"'descr': '<f8'", b"'descr': '|O' "):  # another float type; Python objects (numpy: allow_pickle)
        path.write_bytes(path.read_bytes().replace(b"'descr': '<f4'", damage))  # the same size
        capsys.readouterr()
        entry = open_entry(tmp_path / "cache", square, tiny_model)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"warning: {entry.folder}: cache entry damaged (the header "
                                                       "of pair_scores.npy differs"), lines
        assert all(np.array_equal(entry.arrays[name], a) for name, a in expected.items())
        del entry


def test_a_read_only_cache_dir_serves_its_complete_entries(square, tiny_model, tmp_path, monkeypatch):
    import builtins
    import errno

    shared = tmp_path / "cache"
    built = open_entry(shared, square, tiny_model)
    expected = np.array(built.arrays["pair_scores.npy"])

    def read_only(path, mode="r", *a, **k):  # what a read-only folder does (root would ignore permission bits)
        if any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(cache, "open", read_only, raising=False)
    again = open_entry(shared, square, tiny_model)
    assert again.folder == built.folder and np.array_equal(again.arrays["pair_scores.npy"], expected)
    with pytest.raises(cache.AfineError, match=f"{shared}: cannot use as cache_dir \\(permission denied\\)"):
        open_entry(shared, square, tiny_model, name="other")  # missing: it needs the lock


def test_two_processes_build_the_same_cache_and_train_alike(square, square_s1, tmp_path):
    common = {"stage1_dir": square_s1, "cache": "true", "total_iter": 4, "val_every": 2, "lr.fidelity": 1e-2, **EXACT}
    rank0, rank1 = on_two_processes(2, args(square, tmp_path / "two", batch_size=2, **common), tmp_path)
    one = trained(train_stage2.train(stage2_config(square, tmp_path / "one", square_s1, batch_size=4, **{
        k: v for k, v in common.items() if k != "stage1_dir"}), Dist()), ("fidelity",))
    for k, v in one.items():
        assert torch.equal(rank0[k], rank1[k])
        torch.testing.assert_close(rank0[k], v, rtol=0, atol=1e-5)
    for name in ("train", "val-KADID10K"):  # each rank wrote its share of the rows: together the whole
        [a], [b] = entries(tmp_path / "two" / "cache", name=name), entries(tmp_path / "one" / "cache", name=name)
        assert np.array_equal(np.load(a / "similarity.npy"), np.load(b / "similarity.npy"))
    assert validations(tmp_path / "two") == validations(tmp_path / "one")


def test_stage3_on_two_processes_ends_where_one_process_ends(square, square_s1, tmp_path):
    """Each rank divides its losses by the global batch (not its own share): the logged gradient norm, which
    Adam's update hides, and the weights agree with one process doing the whole batch."""
    s2 = tmp_path / "s2"
    stage2(square, s2, square_s1, total_iter=1)
    common = {"stage2_dir": s2, "cache": "true", "total_iter": 4, "val_every": 2, "lr.natural_scale": 1e-2,
              "lr.fidelity_scale": 1e-2, "lr.adapter": 1e-2, **EXACT}
    rank0, rank1 = on_two_processes(3, args(square, tmp_path / "two", batch_size=2, **common), tmp_path)
    names = ("natural_scale", "fidelity_scale", "adapter")
    start = trained(train_stage3.build_model(stage3_config(square, tmp_path / "x", s2, stage1_dir=square_s1)), names)
    one = trained(train_stage3.train(stage3_config(square, tmp_path / "one", s2, batch_size=4, **{
        k: v for k, v in common.items() if k != "stage2_dir"}), Dist()), names)
    for k, v in one.items():
        assert torch.equal(rank0[k], rank1[k])
        torch.testing.assert_close(rank0[k], v, rtol=0, atol=1e-5)
        assert (v - start[k]).abs().max() > 1e-3, k  # trained, far beyond the tolerance
    steps = {run: [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (tmp_path / run / "log.jsonl")
                                                                         .read_text().splitlines()) if "loss" in r]
             for run in ("one", "two")}
    assert [s for s, *_ in steps["two"]] == [1, 2, 3, 4]
    for (_, *a), (_, *b) in zip(steps["two"], steps["one"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert validations(tmp_path / "two") == validations(tmp_path / "one")
