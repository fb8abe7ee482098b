"""The three training stages on CPU with a tiny random CLIP: what each step trains, the official files,
exact resume, damaged states, the NaN guard, and validation accuracy against an independent per-image loop."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_stage1
import train_stage2
import train_stage3
from afine import config
from afine.batches import GlobalBatches, distinct_images
from afine.checkpoint import read_afine_parts, read_network_file, save_afine, state_dict_for_saving
from afine.datasets import TripletDataset, collate_triplets
from afine.distributed import Dist
from afine.errors import AfineError
from afine.labels import MOSRecord, nlogn_triplets, write_triplets
from afine.metrics import two_afc_accuracy
from afine.model import load_afine
from afine.runfolder import check_state_file, lock_folder, read_log, state_files
from tests import procs

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- corpora


def square_corpus(root: Path, refs: int = 2, dists: int = 4, size: int = 64, seed: int = 0) -> Path:
    """A KADID10K-layout corpus of square images (one shape whatever the augmentation): Train and Validation
    triplet lists over the same references (nlogn, 6 columns). Distortion d adds noise of strength d, and
    MOS falls with d, so the labels are learnable."""
    rng = np.random.default_rng(seed)
    images = root / "KADID10K" / "images"
    images.mkdir(parents=True)
    records = []
    for r in range(refs):
        base = rng.uniform(0, 1, (size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1)
        Image.fromarray((base * 255).astype(np.uint8)).save(images / f"I{r:02d}.png")
        for d in range(1, dists + 1):
            noisy = np.clip(base + rng.normal(0, 0.08 * d, base.shape), 0, 1)
            name = f"I{r:02d}_{d:02d}.png"
            Image.fromarray((noisy * 255).astype(np.uint8)).save(images / name)
            records.append(MOSRecord(name, f"I{r:02d}.png", 5.0 - d))
    for split, s in (("Train", seed), ("Validation", seed + 1)):
        write_triplets(root / "KADID10K" / split / "Triplet" / "Triplet.txt", nlogn_triplets(records, s))
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: fast on a small, busy machine, and identical arithmetic in every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth(tmp_path_factory, small_corpus) -> Path:
    root = tmp_path_factory.mktemp("synth")
    shutil.copytree(small_corpus, root, dirs_exist_ok=True)  # synth.generate(seed=0, scale="small"), made once a run
    return root


@pytest.fixture(scope="module")
def square(tmp_path_factory) -> Path:
    return square_corpus(tmp_path_factory.mktemp("square"))


def args(data_root: Path, out: Path, **over) -> list[str]:
    base = dict(data_root=data_root, out_dir=out, device="cpu", workers=0, batch_size=4, total_iter=2,
                val_every=0, save_every=0, log_every=1, amp="off", train_datasets="KADID10K",
                val_datasets="KADID10K")
    base.update(over)
    base.setdefault("schedule.periods", "[100]")
    base.setdefault("schedule.restart_weights", "[1]")
    return [f"--{k}={v}" for k, v in base.items()]


def stage1_config(data_root, out, **over) -> train_stage1.Stage1Config:
    over = {"clip": "random-tiny", "lr.clip": 1e-3, "lr.natural": 1e-3, **over}
    return config.parse_args(train_stage1.Stage1Config, args(data_root, out, **over))


def stage2_config(data_root, out, stage1_dir, **over) -> train_stage2.Stage2Config:
    over = {"stage1_dir": stage1_dir, "lr.fidelity": 1e-2, **over}
    return config.parse_args(train_stage2.Stage2Config, args(data_root, out, **over))


def stage3_config(data_root, out, stage2_dir, **over) -> train_stage3.Stage3Config:
    over = {"stage2_dir": stage2_dir, "lr.natural_scale": 1e-2, "lr.fidelity_scale": 1e-2, "lr.adapter": 1e-2,
            **over}
    return config.parse_args(train_stage3.Stage3Config, args(data_root, out, **over))


@pytest.fixture(scope="module")
def stage1_run(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "s1"
    train_stage1.train(stage1_config(synth, out, total_iter=3), Dist())
    return out


@pytest.fixture(scope="module")
def stage2_run(synth, stage1_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "s2"
    train_stage2.train(stage2_config(synth, out, stage1_run, total_iter=3), Dist())
    return out


def changed_keys(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- batches


def test_distinct_images_encodes_each_image_once():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    batch = {"x1": x[[0, 1, 2]], "x2": x[[1, 2, 3]], "y": x[[3, 3, 3]],
             "keys": [("a", "b", "r"), ("b", "c", "r"), ("c", "r", "r")]}
    images, index = distinct_images(batch)
    assert images.shape[0] == 4  # a, b, c, r
    for j, name in enumerate(("x1", "x2", "y")):
        assert torch.equal(images[index[j]], batch[name])
    images, index = distinct_images(batch, ("x1", "x2"))
    assert images.shape[0] == 4 and index.shape == (2, 3)


def first_batch(data_root: Path, datasets: list[str], size: int) -> dict:
    data = TripletDataset.from_lists(data_root, datasets, "Train", seed=0)
    micro = GlobalBatches(len(data), data.shape, size, seed=0).micro_batches(0)
    return collate_triplets([data[k] for k in max(micro, key=len)])


# ---------------------------------------------------------------------------------------------- what a step trains


def test_stage1_step_trains_clip_and_natural_head_only(synth, tmp_path):
    cfg = stage1_config(synth, tmp_path / "s1", total_iter=1, train_datasets="DiffIQA,KADID10K")
    before = weights(train_stage1.build_model(cfg))
    model = train_stage1.train(cfg, Dist())
    expected = {k for k in before if k.startswith("natural.proj") or (
        k.startswith("clip.visual.") and not k.startswith(("clip.visual.ln_post", "clip.visual.proj")))}
    assert changed_keys(before, weights(model)) == expected  # text tower, ln_post, proj: no gradient
    # the official files hold exactly the trained weights
    clip_file = torch.load(tmp_path / "s1" / "clip_model.pth", weights_only=True)
    assert clip_file.keys() == model.clip.state_dict().keys() and "token_embedding.weight" in clip_file
    assert all(torch.equal(clip_file[k], v) for k, v in model.clip.state_dict().items())
    head = read_network_file(tmp_path / "s1" / "net_qhead.pth")
    assert all(torch.equal(head[k], v) for k, v in model.natural.state_dict().items())


def test_stage1_gradients_reach_every_clip_block_also_with_checkpointing(synth):
    cfg = stage1_config(synth, "unused")
    batch = first_batch(synth, ["DiffIQA"], 4)
    grads = []
    for checkpoint_blocks in (False, True):
        model = train_stage1.build_model(cfg)
        train_stage1.triplet_losses(model, batch, CPU, "off", checkpoint_blocks).mean().backward()
        grads.append({n: p.grad for n, p in model.clip.visual.named_parameters()})
    for name, g in grads[0].items():
        if name.startswith(("ln_post", "proj")):
            assert g is None
        else:
            assert g is not None and g.abs().sum() > 0, name
            torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-8)


def test_stage2_step_trains_fidelity_head_only_and_encodes_each_image_once(synth, stage1_run, tmp_path,
                                                                            monkeypatch):
    cfg = stage2_config(synth, tmp_path / "s2", stage1_run, total_iter=1)
    before = weights(train_stage2.build_model(cfg))
    encoded, distinct = [], []
    encode = train_stage2.AFINE.encode
    monkeypatch.setattr(train_stage2.AFINE, "encode",
                        lambda self, images, *a, **k: encoded.append(images.shape[0]) or encode(self, images, *a, **k))
    losses = train_stage2.triplet_losses

    def counting(model, batch, *a):
        distinct.append(len({k for triplet in batch["keys"] for k in triplet}))
        return losses(model, batch, *a)

    monkeypatch.setattr(train_stage2, "triplet_losses", counting)
    model = train_stage2.train(cfg, Dist())
    assert encoded == distinct and distinct[0] < 3 * cfg.batch_size
    assert changed_keys(before, weights(model)) == {"fidelity.alpha", "fidelity.beta"}
    saved = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert saved["stage1_dir"] == os.path.relpath(stage1_run.resolve(), (tmp_path / "s2").resolve())  # a tree moves
    stage1_clip = torch.load(stage1_run / "clip_model.pth", weights_only=True)
    assert all(torch.equal(stage1_clip[k], v) for k, v in model.clip.state_dict().items())


def test_stage3_step_trains_mappings_and_adapter_only(synth, stage2_run, tmp_path):
    cfg = stage3_config(synth, tmp_path / "s3", stage2_run, total_iter=1, train_datasets="DiffIQA,KADID10K")
    train_stage3.resolve_stage_dirs(cfg)
    before = weights(train_stage3.build_model(cfg))
    model = train_stage3.train(cfg, Dist())
    assert changed_keys(before, weights(model)) == {
        "natural_scale.yita3", "natural_scale.yita4", "fidelity_scale.yita3", "fidelity_scale.yita4", "adapter.k"}
    assert before["natural_scale.yita3"].item() == pytest.approx(4.9592)
    assert before["natural_scale.yita4"].item() == pytest.approx(21.5968)
    saved = json.loads((tmp_path / "s3" / "config.json").read_text())
    assert saved["stage2_dir"] == os.path.relpath(stage2_run.resolve(), (tmp_path / "s3").resolve())
    used = json.loads((stage2_run / "config.json").read_text())["stage1_dir"]
    assert (tmp_path / "s3" / saved["stage1_dir"]).resolve() == (stage2_run / used).resolve()


def test_run_folders_load_in_our_tools(synth, stage1_run, stage2_run, tmp_path):
    cfg = stage3_config(synth, tmp_path / "s3", stage2_run, total_iter=2)
    trained = train_stage3.train(cfg, Dist())
    expected = weights(trained)
    s1 = load_afine(stage1_run, require=("natural",))
    s2 = load_afine(stage2_run, require=("natural", "fidelity"))
    for loaded in (load_afine(tmp_path / "s3", text_tower=True),
                   load_afine(tmp_path / "s3" / "afine.pth", text_tower=True)):
        got = loaded.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items())
    for part in ("clip", "natural"):
        for k, v in getattr(s1, part).state_dict().items():
            assert torch.equal(v, expected[f"{part}.{k}"])
    assert all(torch.equal(v, expected[f"fidelity.{k}"]) for k, v in s2.fidelity.state_dict().items())
    merged = torch.load(tmp_path / "s3" / "afine.pth", weights_only=True)
    assert sorted(merged) == sorted(["finetuned_clip", "natural", "fidelity", "fidelity_scale", "natural_scale",
                                     "adapter"])
    from afine import checkpoint

    hashed = []
    sha256 = checkpoint.sha256
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "sha256", lambda path: hashed.append(Path(path).resolve()) or sha256(path))
        parts, _ = read_afine_parts(tmp_path / "s3")
    assert set(parts) == set(merged)
    assert sorted(p.name for p in hashed) == ["clip_model.pth", "net_dhead.pth", "net_qhead.pth"]  # once each


def test_stage3_starts_from_fit_gamma_output(synth, stage2_run, tmp_path):
    fit = tmp_path / "fit_gamma.json"
    fit.write_text(json.dumps({"yita3": 0.25, "yita4": 3.0, "scale": 1}))
    cfg = stage3_config(synth, tmp_path / "s3", stage2_run, nr_init_file=fit)
    train_stage3.resolve_stage_dirs(cfg)
    train_stage3.read_nr_init(cfg)
    model = train_stage3.build_model(cfg)
    assert (model.natural_scale.yita3.item(), model.natural_scale.yita4.item()) == (0.25, 3.0)
    fit.write_text(json.dumps({"g3": 1}))
    with pytest.raises(AfineError, match="yita3"):
        train_stage3.read_nr_init(cfg)


# ---------------------------------------------------------------------------------------------- AMP


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps(square, tmp_path, amp):
    cfg = stage1_config(square, tmp_path / "s1", amp=amp, total_iter=2)
    before = weights(train_stage1.build_model(cfg))
    model = train_stage1.train(cfg, Dist())
    after = weights(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert changed_keys(before, after)
    state = torch.load(state_files(tmp_path / "s1" / "state")[0][1], weights_only=True)
    assert bool(state["scaler"]) == (amp == "fp16")


# ---------------------------------------------------------------------------------------------- resume


def run_uninterrupted(square, out, **over):
    return weights(train_stage1.train(stage1_config(square, out, **over), Dist()))


def kill_at(monkeypatch, step: int):
    """Make the training loop die (like a kill) while computing step `step`."""
    losses = train_stage1.triplet_losses
    calls = []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return losses(*a, **k)

    monkeypatch.setattr(train_stage1, "triplet_losses", dying)


def test_killed_run_resumes_bitwise(square, tmp_path, monkeypatch):
    over = dict(total_iter=8, save_every=2, train_datasets="KADID10K")  # 20 triplets: 5 steps an epoch
    reference = run_uninterrupted(square, tmp_path / "a", **over)
    kill_at(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train_stage1.train(stage1_config(square, tmp_path / "b", **over), Dist())
    monkeypatch.undo()
    assert [s for s, _ in state_files(tmp_path / "b" / "state")] == [6, 4]  # the last two kept
    resumed = weights(train_stage1.train(stage1_config(square, tmp_path / "b", **over), Dist()))
    assert all(torch.equal(resumed[k], v) for k, v in reference.items())
    steps = [r["step"] for r in map(json.loads, (tmp_path / "b" / "log.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 9))  # every step logged once, the re-run ones included


def test_killed_fp16_run_resumes_bitwise_with_its_gradient_scale(square, tmp_path, monkeypatch):
    from functools import partial

    # the scale doubles after every step without overflow (halves after one with): by the step-4 save it is far
    # from where it starts, so a resume that starts the scaler afresh scales (and skips) other steps
    monkeypatch.setattr(torch.amp, "GradScaler", partial(torch.amp.GradScaler, growth_interval=1))
    over = dict(total_iter=6, save_every=2, amp="fp16")
    reference = run_uninterrupted(square, tmp_path / "a", **over)
    losses = train_stage1.triplet_losses
    kill_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train_stage1.train(stage1_config(square, tmp_path / "b", **over), Dist())
    monkeypatch.setattr(train_stage1, "triplet_losses", losses)
    resumed = weights(train_stage1.train(stage1_config(square, tmp_path / "b", **over), Dist()))
    scales = [[torch.load(path, weights_only=True)["scaler"]["scale"] for _, path in state_files(tmp_path / run /
                                                                                                 "state")]
              for run in ("a", "b")]
    assert scales[0] == scales[1] and scales[0][1] >= 2.0**18  # (steps 6, 4) equal; the scale grew from 2**16
    assert all(torch.equal(resumed[k], v) for k, v in reference.items())


def test_a_resume_after_a_save_refuses_another_seed_or_order(square, tmp_path, capsys):
    argv = args(square, tmp_path / "s1", clip="random-tiny", total_iter=2, save_every=2)
    assert train_stage1.main(argv) == 0
    capsys.readouterr()
    for change, key in (("--seed=1", "seed"), ("--shuffle=false", "shuffle"), ("--optim.eps=1e-3", "optim.eps")):
        assert train_stage1.main([*argv, "--total_iter=4", change]) == 2
        assert capsys.readouterr().err == f"error: {tmp_path / 's1'}: config differs from the run being resumed in " \
            f"{key}; use the same values, or --resume=false --overwrite=true to start afresh\n"
    assert [s for s, _ in state_files(tmp_path / "s1" / "state")] == [2]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_state_is_detected_and_the_previous_one_used(square, tmp_path, capsys, damage):
    over = dict(total_iter=6, save_every=2)
    reference = run_uninterrupted(square, tmp_path / "a", **over)
    newest = tmp_path / "a" / "state" / "step_00000006.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(data)
    assert check_state_file(newest) is None
    capsys.readouterr()
    resumed = weights(train_stage1.train(stage1_config(square, tmp_path / "a", **over), Dist()))
    err = capsys.readouterr().err
    assert "step_00000006.pt: training state damaged" in err and "step_00000004.pt" in err
    assert all(torch.equal(resumed[k], v) for k, v in reference.items())
    assert check_state_file(newest) is not None  # rewritten by the re-run steps


def test_nan_loss_stops_the_run_and_keeps_the_last_good_state(square, tmp_path, monkeypatch, capsys):
    losses = train_stage1.triplet_losses
    calls = []

    def poisoned(*a, **k):
        calls.append(1)
        out = losses(*a, **k)
        return out * float("nan") if len(calls) == 3 else out

    monkeypatch.setattr(train_stage1, "triplet_losses", poisoned)
    argv = args(square, tmp_path / "s1", total_iter=5, save_every=2, **{"clip": "random-tiny"})
    assert train_stage1.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: step 3: loss is nan")
    states = state_files(tmp_path / "s1" / "state")
    assert [s for s, _ in states] == [2] and check_state_file(states[0][1]) is not None
    good = torch.load(states[0][1], weights_only=True)
    head = read_network_file(tmp_path / "s1" / "net_qhead.pth")
    assert all(torch.equal(head[k], v) for k, v in good["modules"]["natural"].items())
    assert all(math.isfinite(v) for t in good["modules"]["clip"].values() for v in t.flatten()[:50].tolist())


def test_finished_run_is_kept_unless_told(square, tmp_path, capsys):
    argv = args(square, tmp_path / "s1", total_iter=2, **{"clip": "random-tiny"})
    assert train_stage1.main(argv) == 0
    first = (tmp_path / "s1" / "net_qhead.pth").read_bytes()
    assert train_stage1.main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert train_stage1.main([*argv, "--resume=false"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert train_stage1.main([*argv, "--batch_size=2"]) == 2  # resuming with a different trajectory
    assert "batch_size" in capsys.readouterr().err
    assert train_stage1.main([*argv, "--resume=false", "--overwrite=true"]) == 0
    assert (tmp_path / "s1" / "net_qhead.pth").read_bytes() == first  # same seed, fresh run: same weights
    assert train_stage1.main([*argv, "--total_iter=3"]) == 0  # extend a finished run
    assert [s for s, _ in state_files(tmp_path / "s1" / "state")] == [3, 2]


def test_a_resume_refuses_other_training_lists_and_accepts_a_moved_copy_of_the_data(square, tmp_path, capsys):
    import shutil

    moved, other = tmp_path / "moved", tmp_path / "other"
    shutil.copytree(square, moved)
    shutil.copytree(square, other)
    triplets = other / "KADID10K" / "Train" / "Triplet" / "Triplet.txt"
    lines = triplets.read_text().splitlines(keepends=True)
    triplets.write_text("".join(lines[1:] + lines[:1]))  # the same triplets in another order: another trajectory
    argv = args(square, tmp_path / "s1", clip="random-tiny", total_iter=2, save_every=2)
    assert train_stage1.main(argv) == 0
    capsys.readouterr()
    assert train_stage1.main([*argv, f"--data_root={other}", "--total_iter=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 's1'}: the training lists under data_root {other} differ") and \
        err.count("\n") == 1, err
    assert train_stage1.main([*argv, f"--data_root={moved}", "--total_iter=4"]) == 0  # data_root may change
    assert [s for s, _ in state_files(tmp_path / "s1" / "state")] == [4, 2]


def test_user_mistakes_are_one_line_errors(square, tmp_path, capsys):
    assert train_stage2.main(args(square, tmp_path / "s2", stage1_dir=tmp_path / "nowhere")) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "clip_model.pth" in captured.err
    assert train_stage1.main(args(tmp_path / "nodata", tmp_path / "s1", clip="random-tiny")) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ---------------------------------------------------------------------------------------------- validation


def test_validation_accuracy_matches_a_per_image_loop(synth, stage1_run, tmp_path):
    cfg = stage2_config(synth, tmp_path / "s2", stage1_run, total_iter=1, val_every=1, batch_size=8,
                        val_datasets="PIPAL")
    train_stage2.train(cfg, Dist())
    logged = [r for r in map(json.loads, (tmp_path / "s2" / "log.jsonl").read_text().splitlines()) if "val" in r]
    assert [r["step"] for r in logged] == [0, 1]
    model = load_afine(tmp_path / "s2", require=("fidelity",))  # the weights after step 1
    data = TripletDataset.from_lists(synth, ["PIPAL"], "Validation", augment=False)
    u1, u2, g = [], [], []
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            x1, f1 = model.encode(item["x1"][None])
            x2, f2 = model.encode(item["x2"][None])
            y, fy = model.encode(item["y"][None])
            u1.append(model.fidelity(x1, f1, y, fy).item())
            u2.append(model.fidelity(x2, f2, y, fy).item())
            g.append(item["g12"].item())
    accuracy, _, pairs = two_afc_accuracy(u1, u2, g)
    assert logged[-1]["val_pairs"] == pairs
    assert logged[-1]["val"]["PIPAL"] == pytest.approx(accuracy, abs=1e-9)


# ---------------------------------------------------------------------------------------------- the global batch


def test_update_is_the_gradient_of_the_global_batch_mean(synth, stage1_run, tmp_path):
    # mixed datasets and shapes, micro-batches of 2 triplets: the logged loss and gradient norm of step 1 must be
    # those of the mean loss over the 8 triplets of global batch 0, computed here one triplet at a time
    cfg = stage2_config(synth, tmp_path / "s2", stage1_run, total_iter=1, batch_size=8, micro_batch=6,
                        train_datasets="KADID10K,PIPAL,TID2013")
    model = train_stage2.build_model(cfg)
    train_stage2.train(cfg, Dist())
    logged = next(r for r in map(json.loads, (tmp_path / "s2" / "log.jsonl").read_text().splitlines()) if "loss" in r)
    data = TripletDataset.from_lists(synth, cfg.train_datasets, "Train", seed=cfg.seed)
    plan = GlobalBatches(len(data), data.shape, 8, micro_batch=6, seed=cfg.seed)
    assert len({data.shape(k) for k in plan.keys(0)}) > 1 and len(plan.micro_batches(0)) > 1
    losses = torch.cat([train_stage2.triplet_losses(model, collate_triplets([data[k]]), CPU, "off")
                        for k in plan.keys(0)])
    losses.mean().backward()
    norm = torch.cat([model.fidelity.alpha.grad.flatten(), model.fidelity.beta.grad.flatten()]).norm().item()
    assert logged["loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert logged["grad_norm"] == pytest.approx(norm, rel=1e-4)  # a sum over the batch would be 8 times larger


def test_best_folder_holds_the_best_validation_and_keep_saves_every_save(square, tmp_path):
    cfg = stage1_config(square, tmp_path / "s1", total_iter=4, val_every=1, save_every=1, keep_saves="true")
    train_stage1.train(cfg, Dist())
    out = tmp_path / "s1"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_mean"]) for r in log if "val_mean" in r]
    best_step, best_mean = max(val, key=lambda sv: (sv[1], -sv[0]))  # the first of the highest
    assert [r["step"] for r in log if r.get("best")][-1] == best_step
    assert json.loads((out / "best" / "best.json").read_text()) == {"step": best_step, "val_mean": best_mean}
    assert sorted(p.name for p in (out / "saves").iterdir()) == [f"step_{s:08d}" for s in range(1, 5)]
    if best_step:
        same = out / "saves" / f"step_{best_step:08d}"
        for name in ("clip_model.pth", "net_qhead.pth"):
            a, b = (torch.load(f / name, weights_only=True) for f in (out / "best", same))
            a, b = a.get("params", a), b.get("params", b)
            assert all(torch.equal(a[k], b[k]) for k in b)


def scalar_events(tb: Path) -> dict[str, list]:
    """Every scalar event in the TensorBoard folder as written (nothing hidden as orphaned): tag -> events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def test_tensorboard_curves_continue_across_a_resume_with_every_step_once(square, tmp_path, monkeypatch):
    out = tmp_path / "b"
    over = dict(total_iter=8, save_every=4, val_every=2, tensorboard="true")
    kill_at(monkeypatch, 7)  # dies in step 7: steps 5 and 6 were logged after the last save (step 4)
    with pytest.raises(KeyboardInterrupt):
        train_stage1.train(stage1_config(square, out, **over), Dist())
    monkeypatch.undo()
    assert [e.step for e in scalar_events(out / "tb")["train/loss"]] == [1, 2, 3, 4, 5, 6]
    train_stage1.train(stage1_config(square, out, **over), Dist())
    curves = scalar_events(out / "tb")
    assert set(curves) == {"train/loss", "train/grad_norm", "train/steps_per_s", "lr/clip", "lr/natural",
                           "val/KADID10K", "val/mean"}
    records = read_log(out / "log.jsonl")
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val" in r]
    assert [r["step"] for r in steps] == list(range(1, 9)) and [r["step"] for r in vals] == [0, 2, 4, 6, 8]
    expected = {"train/loss": [(r["step"], r["loss"]) for r in steps],
                "train/grad_norm": [(r["step"], r["grad_norm"]) for r in steps],
                "train/steps_per_s": [(r["step"], r["steps_per_s"]) for r in steps],
                "lr/clip": [(r["step"], r["lr"]["clip"]) for r in steps],
                "lr/natural": [(r["step"], r["lr"]["natural"]) for r in steps],
                "val/KADID10K": [(r["step"], r["val"]["KADID10K"]) for r in vals],
                "val/mean": [(r["step"], r["val_mean"]) for r in vals]}
    for tag, points in expected.items():  # each step once, in order, with the value of the run that counts
        assert [e.step for e in curves[tag]] == [s for s, _ in points], tag
        assert [e.value for e in curves[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    # the resume ran steps 5-8 again: their curves are those of the resumed run (logged after it started)
    resumed = next(r["time"] for r in records if r.get("event") == "resume")
    assert all(e.wall_time >= resumed for e in curves["train/loss"][4:])

    # extended without curves, then with: tb/ holds the whole run, every step once
    train_stage1.train(stage1_config(square, out, **{**over, "total_iter": 9, "tensorboard": "false"}), Dist())
    train_stage1.train(stage1_config(square, out, **{**over, "total_iter": 10}), Dist())
    assert [e.step for e in scalar_events(out / "tb")["train/loss"]] == list(range(1, 11))


def test_a_damaged_log_line_is_named_and_never_dropped_before_the_resumed_step(square, tmp_path, monkeypatch,
                                                                               capsys):
    """`afine curves` (plots.run_curves) and a resume read log.jsonl: a line that is not a record (cut short, or
    without its "step") is skipped with a warning naming the file and line; a resume keeps it where it lies before
    the resumed step and drops it only past that step, with the lines it cuts back."""
    from afine import plots

    out, over = tmp_path / "s1", dict(total_iter=6, save_every=4)
    kill_at(monkeypatch, 6)  # dies in step 6: step 5 was logged past the step-4 save
    with pytest.raises(KeyboardInterrupt):
        train_stage1.train(stage1_config(square, out, **over), Dist())
    monkeypatch.undo()
    log = out / "log.jsonl"
    lines = log.read_text().splitlines()
    at = {json.loads(line)["step"]: i for i, line in enumerate(lines) if "loss" in json.loads(line)}
    lines[at[2]] = lines[at[2]][:30]  # cut short: not JSON
    lines[at[5]] = '{"loss": 0.5}'  # no step
    log.write_text("".join(line + "\n" for line in lines))
    capsys.readouterr()
    assert [step for step, _ in plots.run_curves(out)["loss"]] == [1, 3, 4]
    what = 'not a log record (a JSON object with an integer "step")'
    assert capsys.readouterr().err == f"warning: {log}: lines {at[2] + 1}, {at[5] + 1} {what}; skipped\n"
    train_stage1.train(stage1_config(square, out, **over), Dist())
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: {log}: line {at[2] + 1} {what}; kept (before the resumed step)",
                        f"warning: {log}: line {at[5] + 1} {what}; dropped (past the resumed step)"]
    resumed = log.read_text().splitlines()
    saved = next(i for i, line in enumerate(lines) if '"saved"' in line)
    assert resumed[:saved + 1] == lines[:saved + 1]  # up to the step-4 save, byte for byte, the damaged line too
    assert [r["step"] for r in read_log(log, quiet=True) if "loss" in r] == [1, 3, 4, 5, 6]


def test_tensorboard_missing_is_one_error_line_before_any_work(square, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    argv = args(square, tmp_path / "s1", clip="random-tiny", tensorboard="true")
    assert train_stage1.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: --tensorboard=true needs the optional package tensorboard")
    assert "pip install tensorboard" in captured.err
    assert not (tmp_path / "s1").exists()


# ---------------------------------------------------------------------------------------------- run folder


KILLED_IN_STEP = """
import os, signal, sys, torch
torch.set_num_threads(1)
import train_stage1
step, losses, calls = int(sys.argv[1]), train_stage1.triplet_losses, []
def dying(*a, **k):  # a SIGKILL while computing step `step`: no handler, no clean-up runs
    calls.append(1)
    if len(calls) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return losses(*a, **k)
train_stage1.triplet_losses = dying
sys.exit(train_stage1.main(sys.argv[2:]))
"""


def test_sigkill_mid_training_then_resume_ends_bitwise_like_an_uninterrupted_run(square, tmp_path):
    """Run b is killed by the test right after a save (the step-4 state appears; the kill lands a few steps later
    at most), run c kills itself between saves: in step 6, after step 5 was logged past the step-4 save. Both
    resume to the weights of an uninterrupted run, with every step logged once."""
    over = dict(total_iter=14, save_every=2, train_datasets="KADID10K")
    reference = run_uninterrupted(square, tmp_path / "a", **over)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    code = "import sys, torch; torch.set_num_threads(1); import train_stage1; sys.exit(train_stage1.main(sys.argv[1:]))"
    runs = {}
    for run, program in (("b", [code]), ("c", [KILLED_IN_STEP, "6"])):
        argv = args(square, tmp_path / run, clip="random-tiny", **{"lr.clip": 1e-3, "lr.natural": 1e-3}, **over)
        runs[run] = procs.start([sys.executable, "-c", *program, *argv], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "b" / "state" / "step_00000004.json").is_file():
            assert runs["b"].poll() is None and time.time() < deadline, "run b ended before its step-4 save"
            time.sleep(0.02)
        os.killpg(runs["b"].pid, signal.SIGKILL)
        assert runs["c"].wait(timeout=max(1, deadline - time.time())) == -signal.SIGKILL
    finally:
        for proc in runs.values():  # the whole process group, whatever happened: nothing is left behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed_at = max(s for s, _ in state_files(tmp_path / "b" / "state"))
    assert 4 <= killed_at < 14
    assert [s for s, _ in state_files(tmp_path / "c" / "state")] == [4, 2]
    assert [r["step"] for r in read_log(tmp_path / "c" / "log.jsonl") if "loss" in r] == [1, 2, 3, 4, 5]
    orphan = tmp_path / "b" / "state" / ".step_00000099.pt.x.tmp"  # what a kill inside a save leaves behind
    orphan.write_bytes(b"partial")
    for run, saved in (("b", killed_at), ("c", 4)):
        resumed = weights(train_stage1.train(stage1_config(square, tmp_path / run, **over), Dist()))
        assert all(torch.equal(resumed[k], v) for k, v in reference.items()), run
        records = read_log(tmp_path / run / "log.jsonl")
        assert [r["step"] for r in records if r.get("event") == "resume"] == [saved]  # from the newest state
        assert [r["step"] for r in records if "loss" in r] == list(range(1, 15))  # every step logged once
    assert not orphan.exists()


HOLD_LOCK = """
import os, sys, time
from pathlib import Path
from afine.runfolder import lock_folder
handle = lock_folder(Path(sys.argv[1]))
child = os.fork()  # a child that outlives this process, as DataLoader workers do for a few seconds
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_the_run_lock_names_its_holder_and_dies_with_it_not_with_its_children(square, tmp_path, capsys):
    out = tmp_path / "s1"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    holder = procs.start([sys.executable, "-c", HOLD_LOCK, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        assert train_stage1.main(args(square, out, clip="random-tiny")) == 2
        err = capsys.readouterr().err
        assert "in use by another training run" in err and f"pid {holder.pid}" in err and err.count("\n") == 1
        holder.kill()  # SIGKILL of the main process alone: its child still runs
        holder.wait()
        os.kill(child, 0)
        lock_folder(out).close()  # at once: the lock went with its holder
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    assert train_stage1.main(args(square, out, clip="random-tiny")) == 0


def test_a_fresh_start_never_deletes_an_unfinished_run_without_overwrite(square, tmp_path, capsys):
    argv = args(square, tmp_path / "s1", clip="random-tiny", total_iter=4, save_every=2)
    kill = [*argv, "--total_iter=2"]
    assert train_stage1.main(kill) == 0  # a run stopped at step 2 of what will be 4
    assert train_stage1.main([*argv, "--resume=false"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert [s for s, _ in state_files(tmp_path / "s1" / "state")] == [2]
    out_file = tmp_path / "file"
    out_file.write_text("x")
    assert train_stage1.main(args(square, out_file, clip="random-tiny")) == 2
    assert "is a file" in capsys.readouterr().err


def test_stage2_refuses_to_resume_or_load_on_a_changed_stage1(synth, stage1_run, tmp_path, capsys):
    import shutil

    s1 = tmp_path / "s1"
    shutil.copytree(stage1_run, s1)
    argv = args(synth, tmp_path / "s2", stage1_dir=s1, total_iter=1, train_datasets="KADID10K")
    assert train_stage2.main(argv) == 0
    load_afine(tmp_path / "s2", require=("fidelity",))  # consistent: loads
    clip = torch.load(s1 / "clip_model.pth", weights_only=True)
    clip["visual.ln_pre.bias"] += 0.1
    torch.save(clip, s1 / "clip_model.pth")  # stage 1 changed after stage 2 was trained on it
    assert train_stage2.main([*argv, "--total_iter=2"]) == 2
    assert "clip_model.pth" in capsys.readouterr().err
    with pytest.raises(AfineError, match="clip_model.pth.*changed"):
        load_afine(tmp_path / "s2", require=("fidelity",))


def test_a_run_folder_now_pointing_to_another_earlier_run_is_refused_a_moved_copy_loads(synth, stage1_run,
                                                                                          stage2_run, tmp_path, capsys):
    import shutil

    def point(run: Path, stage1: Path) -> None:
        saved = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**saved, "stage1_dir": str(stage1)}))

    other = tmp_path / "s1b"  # another stage-1 run: the same files but for its CLIP
    shutil.copytree(stage1_run, other)
    clip = torch.load(other / "clip_model.pth", weights_only=True)
    clip["visual.ln_pre.bias"] += 0.1
    torch.save(clip, other / "clip_model.pth")
    edited = tmp_path / "s2e"
    shutil.copytree(stage2_run, edited)
    point(edited, other)
    message = f"{edited} was trained on another clip_model.pth than {other / 'clip_model.pth'} (its built_on.json"
    with pytest.raises(AfineError) as refused:
        load_afine(edited, require=("fidelity",))  # what evaluate.py --weights s2e --stage 2 loads
    assert str(refused.value).startswith(message)
    assert train_stage3.main(args(synth, tmp_path / "s3", stage2_dir=edited)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    moved = tmp_path / "moved"  # both runs moved elsewhere together: the files loaded are the recorded ones
    shutil.copytree(stage1_run, moved / "s1")
    shutil.copytree(stage2_run, moved / "s2")
    point(moved / "s2", moved / "s1")
    shutil.move(stage1_run, tmp_path / "gone")  # the recorded paths are gone
    try:
        model = load_afine(moved / "s2", require=("natural", "fidelity"))
    finally:
        shutil.move(tmp_path / "gone", stage1_run)
    assert torch.equal(model.clip.visual.ln_pre.bias, torch.load(stage1_run / "clip_model.pth",
                                                                  weights_only=True)["visual.ln_pre.bias"])


def runs_tree(stage1_run: Path, stage2_run: Path, tree: Path) -> tuple[Path, Path]:
    """Copies of the stage-1 and stage-2 runs side by side in `tree`, the stage 2 naming its stage 1 as runs do."""
    import shutil

    s1, s2 = shutil.copytree(stage1_run, tree / "s1"), shutil.copytree(stage2_run, tree / "s2")
    (s2 / "config.json").write_text(json.dumps({**json.loads((s2 / "config.json").read_text()), "stage1_dir": "../s1"}))
    return Path(s1), Path(s2)


def change_clip(stage1: Path) -> None:
    clip = torch.load(stage1 / "clip_model.pth", weights_only=True)
    clip["visual.ln_pre.bias"] += 0.1
    torch.save(clip, stage1 / "clip_model.pth")


@pytest.mark.parametrize("damage", ["empty", "renamed key", "folder", "not JSON", "a list", "not a digest"])
def test_a_damaged_built_on_record_is_one_error_line_naming_it(synth, stage1_run, stage2_run, tmp_path, capsys,
                                                               damage):
    s1, s2 = runs_tree(stage1_run, stage2_run, tmp_path / "R")
    change_clip(s1)  # beside a damaged record, a changed stage 1 must not pass unnoticed
    record = s2 / "built_on.json"
    saved = json.loads(record.read_text())
    [(path, digest)] = saved.items()
    if damage == "folder":
        record.unlink()
        record.mkdir()
    else:
        record.write_text({"empty": "{}", "renamed key": json.dumps({path + ".old": digest}), "not JSON": "{'a': 1",
                           "a list": json.dumps([path, digest]), "not a digest": json.dumps({path: 5})}[damage])
    with pytest.raises(AfineError) as refused:
        load_afine(s2, require=("fidelity",))  # what evaluate.py --weights s2 --stage 2 loads
    message = str(refused.value)
    assert message.startswith(f"{record}: ") and "\n" not in message, message
    assert train_stage3.main(args(synth, tmp_path / "s3", stage2_dir=s2)) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "s3" / "log.jsonl").exists()


def test_a_run_without_built_on_record_loads_with_a_warning_naming_it(stage1_run, stage2_run, tmp_path, capsys):
    """Runs made before built_on.json existed: nothing to check against, which is said; stage 1 has nothing."""
    s1, s2 = runs_tree(stage1_run, stage2_run, tmp_path / "R")
    (s1 / "built_on.json").unlink()
    (s2 / "built_on.json").unlink()
    model = load_afine(s2, require=("natural", "fidelity"))
    assert capsys.readouterr().err == f"warning: {s2}: no built_on.json (a run made before runs recorded it): the " \
        "earlier stages' files it is combined with are not checked\n"
    fidelity = read_network_file(s2 / "net_dhead.pth")
    assert all(torch.equal(v, fidelity[k]) for k, v in model.fidelity.state_dict().items())
    load_afine(s1, require=("natural",))
    assert capsys.readouterr().err == ""


def test_a_run_folder_naming_no_stage1_is_not_combined_with_another_clip(stage1_run, stage2_run, tmp_path):
    """config.json tells where the earlier stages are, built_on.json what they were: with stage1_dir removed the
    record names a CLIP that nothing provides, and a CLIP given apart (--clip) is not taken in its place."""
    s1, s2 = runs_tree(stage1_run, stage2_run, tmp_path / "R")
    saved = json.loads((s2 / "config.json").read_text())
    del saved["stage1_dir"]
    (s2 / "config.json").write_text(json.dumps(saved))
    other = tmp_path / "other_clip.pth"
    torch.save(torch.load(s1 / "clip_model.pth", weights_only=True), other)
    with pytest.raises(AfineError) as refused:
        load_afine(s2, clip=other, require=("fidelity",))
    assert str(refused.value) == f"{s2} was trained on a clip_model.pth (its built_on.json), but its config.json " \
        "names no run folder holding one; restore the stage folder keys (stage1_dir, stage2_dir) it was trained with"


def test_a_runs_tree_moved_whole_resumes_and_evaluates_from_its_new_place(synth, tmp_path, monkeypatch, capsys):
    """R holds s1, s2 and s3, named relatively on the command line; after `mv R R2` (R gone) stages 2 and 3 resume
    and evaluate.py scores with them: config.json and built_on.json name the earlier stages relative to the run
    folder, and a resume compares the earlier stages' files by content, not by path."""
    import evaluate

    monkeypatch.chdir(tmp_path)
    assert train_stage1.main(args(synth, "R/s1", clip="random-tiny", total_iter=1)) == 0
    assert train_stage2.main(args(synth, "R/s2", stage1_dir="R/s1", total_iter=1)) == 0
    assert train_stage3.main(args(synth, "R/s3", stage2_dir="R/s2", total_iter=1)) == 0
    assert json.loads(Path("R/s2/config.json").read_text())["stage1_dir"] == "../s1"
    assert json.loads(Path("R/s3/config.json").read_text())["stage2_dir"] == "../s2"
    assert list(json.loads(Path("R/s3/built_on.json").read_text())) == [
        "../s1/clip_model.pth", "../s1/net_qhead.pth", "../s2/net_dhead.pth"]
    os.rename("R", "R2")
    capsys.readouterr()
    bench = ["--data-root", str(synth), "--bench", "kadid10k", "--workers", "0", "--no-progress"]
    assert train_stage3.main(args(synth, "R2/s3", stage2_dir="R2/s2", total_iter=2)) == 0
    adapter, saved = load_afine("R2/s3").adapter, read_network_file("R2/s3/net_finalscore.pth")
    assert all(torch.equal(v, saved[k]) for k, v in adapter.state_dict().items())
    assert train_stage2.main(args(synth, "R2/s2", stage1_dir="R2/s1", total_iter=2)) == 0
    assert evaluate.main([*bench, "--weights", "R2/s2", "--stage", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.count("\nkadid10k ") == 1 and "error" not in out.err and "warning" not in out.err, out.err
    for run in ("s2", "s3"):
        assert [(r["event"], r["step"]) for r in read_log(Path("R2") / run / "log.jsonl") if "event" in r] == [
            ("fresh", 0), ("resume", 1)]
    assert not Path("R").exists()
    with pytest.raises(AfineError, match="R2/s3 was trained on another net_dhead.pth"):
        load_afine("R2/s3")  # by content: s3 was trained on the s2 of step 1, which the resume replaced


# ---------------------------------------------------------------------------------------------- fine-tuning


def test_fine_tuning_from_an_afine_pth_starts_exactly_at_its_scores(synth, tmp_path):
    from tests.tiny import random_afine, tiny_clip

    released = tmp_path / "released.pth"
    model = random_afine(tiny_clip(seed=3), seed=4)
    save_afine(released, model.parts())
    # learning rate 0 everywhere: each stage writes the weights it started from, so the chain shows what
    # init_from loads: the CLIP and naturalness head (stage 1), fidelity head (2), mappings and adapter (3)
    frozen = {"schedule.eta_min": 0, "init_from": released, "train_datasets": "KADID10K", "total_iter": 1}
    runs = {n: tmp_path / f"s{n}" for n in (1, 2, 3)}
    train_stage1.train(stage1_config(synth, runs[1], **frozen, **{"lr.clip": 0, "lr.natural": 0}), Dist())
    train_stage2.train(stage2_config(synth, runs[2], runs[1], **frozen, **{"lr.fidelity": 0}), Dist())
    train_stage3.train(stage3_config(synth, runs[3], runs[2], **frozen, **{"lr.natural_scale": 0,
                                     "lr.fidelity_scale": 0, "lr.adapter": 0}), Dist())
    tuned = load_afine(runs[3] / "afine.pth")
    rng = torch.Generator().manual_seed(0)
    dis, ref = torch.rand(3, 3, 64, 96, generator=rng), torch.rand(3, 3, 64, 96, generator=rng)
    with torch.no_grad():
        before, after = model(dis, ref), tuned(dis, ref)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(AfineError, match="init_from holds no fidelity"):
        train_stage2.build_model(stage2_config(synth, tmp_path / "x", runs[1], init_from=runs[1]))


@pytest.mark.parametrize("part,key,value", [("finetuned_clip", "visual.ln_pre.bias", math.inf),
                                            ("fidelity", "alpha", math.nan), ("adapter", "k", -math.inf)])
def test_init_from_weights_holding_nan_or_infinity_are_refused(synth, stage1_run, stage2_run, tmp_path, capsys, part,
                                                               key, value):
    from tests.tiny import random_afine, tiny_clip

    parts = {name: state_dict_for_saving(m) for name, m in random_afine(tiny_clip()).parts().items()}
    parts[part][key].view(-1)[3 % parts[part][key].numel()] = value
    save_afine(tmp_path / "bad.pth", parts)
    stage = {"finetuned_clip": 1, "fidelity": 2, "adapter": 3}[part]
    script, over = {1: (train_stage1, {"clip": "random-tiny"}), 2: (train_stage2, {"stage1_dir": stage1_run}),
                    3: (train_stage3, {"stage2_dir": stage2_run})}[stage]
    assert script.main(args(synth, tmp_path / "run", init_from=tmp_path / "bad.pth", **over)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'bad.pth'}[{part}]: tensor {key!r} holds NaN or infinity\n"
    assert not (tmp_path / "run" / "best").exists()


# ---------------------------------------------------------------------------------------------- one-line failures


def test_disk_full_while_saving_is_one_line_and_keeps_the_last_good_state(square, tmp_path, monkeypatch, capsys):
    import errno

    from afine import atomic, checkpoint

    calls = []

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    def filling(path, write):  # the disk is full when the state of step 4 is written
        if Path(path).name == "step_00000004.pt":
            calls.append(path)
            write = full
        return atomic.atomic_write(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write", filling)
    argv = args(square, tmp_path / "s1", clip="random-tiny", total_iter=4, save_every=2)
    assert train_stage1.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert calls and err[-1].startswith("error: ") and "no space left on device" in err[-1]
    states = state_files(tmp_path / "s1" / "state")
    assert [s for s, _ in states] == [2] and check_state_file(states[0][1]) is not None
    assert not list((tmp_path / "s1" / "state").glob(".*.tmp"))


def test_a_bad_image_in_a_loader_worker_is_the_same_one_line_error(square, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(square, data)
    image = data / "KADID10K" / "images" / "I01_02.png"
    image.write_bytes(image.read_bytes()[:80])  # the header (size) reads, the pixels do not: fails in the loader
    for workers in (0, 1):
        argv = args(data, tmp_path / f"s1_{workers}", clip="random-tiny", total_iter=20, workers=workers)
        assert train_stage1.main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(err) == 1 and "I01_02.png" in err[0] and "Traceback" not in err[0], err


def test_nan_before_any_save_says_no_state_was_saved(square, tmp_path, monkeypatch, capsys):
    losses = train_stage1.triplet_losses
    monkeypatch.setattr(train_stage1, "triplet_losses", lambda *a, **k: losses(*a, **k) * float("nan"))
    assert train_stage1.main(args(square, tmp_path / "s1", clip="random-tiny", total_iter=3, save_every=2)) == 2
    assert "step 1: loss is nan; training stopped (no training state was saved yet)" in capsys.readouterr().err


def test_ctrl_c_while_loader_workers_start_stops_the_run_with_one_line(square, tmp_path):
    """Without care the interrupt lands in os.fork's hooks (Python prints and drops it) and the workers die of it,
    so the run goes on or fails with 'DataLoader worker exited unexpectedly'."""
    from tests.tiny import ctrl_c_at_worker

    argv = args(square, tmp_path / "s1", clip="random-tiny", workers=2, total_iter=50, save_every=10)
    code, err = ctrl_c_at_worker(ROOT / "train_stage1.py", argv, tmp_path)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert code == 130, err
    assert lines == ["interrupted before the first save; run the same command again to start afresh"], err


def test_a_second_ctrl_c_while_validation_stops_is_silent(square, tmp_path):
    """The second lands as the validation loader's workers are shut down, after the run printed its line: Python
    would print 'Exception ignored ... KeyboardInterrupt' there."""
    from tests.tiny import ctrl_c_at_worker

    argv = args(square, tmp_path / "s1", clip="random-tiny", workers=2, total_iter=50, val_every=2, save_every=10)
    code, err = ctrl_c_at_worker(ROOT / "train_stage1.py", argv, tmp_path, fork=1, again=True)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert code == 130, err
    assert lines == ["interrupted before the first save; run the same command again to start afresh"], err


def test_a_run_stopped_before_its_first_save_starts_again_with_the_same_command(square, tmp_path):
    """Stopped after the step-0 validation wrote best/ but before any training state: the same command starts
    afresh (nothing is lost) and ends where an uninterrupted run ends; another config still needs --overwrite."""
    from tests.tiny import ctrl_c_at_worker

    over = dict(clip="random-tiny", workers=2, total_iter=4, val_every=2, save_every=2,
                **{"lr.clip": 1e-3, "lr.natural": 1e-3})
    argv = args(square, tmp_path / "b", **over)
    code, err = ctrl_c_at_worker(ROOT / "train_stage1.py", argv, tmp_path, fork=3)  # the training loader's first
    assert code == 130 and err.rstrip().endswith("run the same command again to start afresh"), err
    assert (tmp_path / "b" / "best").is_dir() and not state_files(tmp_path / "b" / "state")
    assert train_stage1.main([*argv, "--seed=1"]) == 2  # another run's start is not replaced silently
    assert train_stage1.main(argv) == 0
    assert train_stage1.main(args(square, tmp_path / "a", **over)) == 0
    for name, read in (("clip_model.pth", lambda f: torch.load(f, weights_only=True)),
                       ("net_qhead.pth", read_network_file)):
        a, b = (read(tmp_path / run / name) for run in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_ctrl_c_after_a_save_names_the_step_the_same_command_resumes_from(square, tmp_path):
    from tests.tiny import ctrl_c_at_worker

    over = dict(clip="random-tiny", workers=2, total_iter=6, val_every=2, save_every=2,
                **{"lr.clip": 1e-3, "lr.natural": 1e-3})
    argv = args(square, tmp_path / "b", **over)
    # forks: step-0 validation 1-2, training loader 3-4, step-2 validation 5-6 (then the step-2 save), step 4: 7
    code, err = ctrl_c_at_worker(ROOT / "train_stage1.py", argv, tmp_path, fork=7)
    assert code == 130 and err.rstrip().endswith("resume from step 2 (the last save)"), err
    assert train_stage1.main(argv) == 0
    assert train_stage1.main(args(square, tmp_path / "a", **over)) == 0
    a, b = (read_network_file(tmp_path / run / "net_qhead.pth") for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
