"""evaluate.py and the cached scorer: hand-counted accuracies, SRIQA pairs, cached == direct, CLI errors."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from afine.benchmarks import BENCHMARKS, load_benchmark
from afine.checkpoint import save_network_file
from afine.evaluation import STAGE_PARTS, TermCache, compute_terms, item_scores, plan, triplet_scores
from afine.image import load_image
from afine.metrics import two_afc_accuracy
from afine.model import AFINE, load_afine
from evaluate import main
from tests import procs
from tests.tiny import random_afine, tiny_clip, write_checkpoints

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- known scores


def red_model() -> AFINE:
    """A stage-1 model whose N_raw is 100 * (mean red value) + 10: a score known from the image alone.

    proj_head = Linear -> GELU -> Linear; hidden unit 0 gets 100 * level-0 mean(R) + 10 >= 10, where GELU is
    the identity in float32, and the output copies it. Everything else is zero.
    """
    model = AFINE(tiny_clip(seed=3))
    head = model.natural
    with torch.no_grad():
        for p in head.proj_head.parameters():
            p.zero_()
        head.proj_head[0].weight[0, 0] = 100.0
        head.proj_head[0].bias[0] = 10.0
        head.proj_head[2].weight[0, 0] = 1.0
    return model.eval()


def flat(path: Path, red: int, size=(64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((*size, 3), dtype=np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = red, 90, 30
    Image.fromarray(a).save(path)


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    """A stage-1 run folder of red_model and a hand-built corpus: KADID10K and SRIQA-Bench only."""
    root = tmp_path_factory.mktemp("hand")
    run = root / "run_s1"
    run.mkdir()
    model = red_model()
    torch.save(model.clip.state_dict(), run / "clip_model.pth")
    save_network_file(run / "net_qhead.pth", model.natural)
    data = root / "data"
    images = data / "KADID10K" / "images"
    for name, red in {"I01.png": 10, "I01_01_01.png": 50, "I01_01_02.png": 100, "I01_01_03.png": 100,
                      "I01_01_04.png": 200}.items():
        flat(images / name, red)
    lines = [  # u = red: lower is better
        "I01_01_01.png,I01_01_02.png,I01.png,1,0,0",    # 50 < 100, x1 better: correct
        "I01_01_02.png,I01_01_03.png,I01.png,0.5,0,0",  # tie, same: correct
        "I01_01_02.png,I01_01_03.png,I01.png,1,0,0",    # tie, strict label: wrong
        "I01_01_04.png,I01_01_01.png,I01.png,1,0,0",    # 200 > 50 but x1 said better: wrong
        "I01_01_04.png,I01_01_01.png,I01.png,0,0,0",    # correct
        "I01_01_01.png,I01.png,I01.png,0,0,0.5",        # reference as x2, better: correct
        "I01_01_01.png,I01_01_04.png,I01.png,0.5,0,0",  # not a tie: wrong
    ]
    (data / "KADID10K" / "Test" / "Triplet").mkdir(parents=True)
    (data / "KADID10K" / "Test" / "Triplet" / "Triplet.txt").write_text("\n".join(lines) + "\n")
    (data / "KADID10K" / "Test" / "MOS").mkdir()
    (data / "KADID10K" / "Test" / "MOS" / "I01.txt").write_text(
        "I01_01_01.png,I01.png,4.5,0.1\nI01_01_02.png,I01.png,3.0,0.1\nI01_01_04.png,I01.png,1.0,0.1\n")
    # SRIQA-Bench: 2 scenes x (original + 10 SR results), method folders; reds and MOS with repeats
    sriqa = data / "SRIQA-Bench"
    scenes = {}
    rng = np.random.default_rng(5)
    for scene in ("0001", "0002"):
        reds = [int(v) for v in rng.choice([20, 40, 60, 80], size=11)]
        mos = [float(v) for v in rng.choice([10.0, 30.0, 50.0, 70.0], size=11)]
        names = [f"{scene}_Original.png"] + [f"{scene}_M{k}x4.png" for k in range(10)]
        for k, (name, red) in enumerate(zip(names, reds)):
            flat(sriqa / "images" / ("Original" if k == 0 else f"M{k}") / name, red, size=(48, 80))
        order = rng.permutation(11)
        scenes[scene] = [(names[k], reds[k], mos[k]) for k in order]
        (sriqa / "MOS").mkdir(parents=True, exist_ok=True)
        (sriqa / "MOS" / f"{scene}.txt").write_text("".join(f"{n},{m}\n" for n, _, m in scenes[scene]))
        (sriqa / "MOS_Reg").mkdir(exist_ok=True)
        reg = [s for s in scenes[scene] if s[0].endswith("_Original.png") or int(s[0].split("_M")[1][0]) < 5]
        (sriqa / "MOS_Reg" / f"{scene}.txt").write_text("".join(f"{n} {m}\n" for n, _, m in reg))
        (sriqa / "MOS_Gen").mkdir(exist_ok=True)
        gen = [s for s in scenes[scene] if s not in reg or s[0].endswith("_Original.png")]
        (sriqa / "MOS_Gen" / f"{scene}.txt").write_text("".join(f"{n} {m}\n" for n, _, m in gen))
    return run, data, scenes


def run_cli(capsys, *args):
    code = main(["--no-progress", "--workers", "0", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def hand_count(entries) -> int:
    """Correct unordered pairs of (name, score, mos) entries; lower score better, higher MOS better."""
    return sum((ra < rb and ma > mb) or (ra > rb and ma < mb) or (ra == rb and ma == mb)
               for (_, ra, ma), (_, rb, mb) in itertools.combinations(entries, 2))


def test_hand_built_accuracies_equal_hand_counts(hand, capsys, tmp_path):
    run, data, scenes = hand
    out_json = tmp_path / "r.json"
    code, out, err = run_cli(capsys, "--bench", "all", "--data-root", data, "--weights", run, "--stage", "1",
                             "--json", out_json)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["kadid10k"]["correct"] == 4 and result["kadid10k"]["pairs"] == 7
    assert result["kadid10k"]["accuracy"] == 4 / 7
    # MOS order is exactly the reverse of the red order for the three MOS images
    assert result["kadid10k"]["srcc"] == pytest.approx(1.0) and result["kadid10k"]["krcc"] == pytest.approx(1.0)
    expected_all = sum(hand_count(s) for s in scenes.values())
    assert result["sriqa-all"]["pairs"] == 2 * 55
    assert result["sriqa-all"]["correct"] == expected_all
    reg = {k: [e for e in s if e[0].endswith("_Original.png") or int(e[0].split("_M")[1][0]) < 5]
           for k, s in scenes.items()}
    assert result["sriqa-reg"]["pairs"] == 2 * 15
    assert result["sriqa-reg"]["correct"] == sum(hand_count(s) for s in reg.values())
    assert set(result) == {"kadid10k", "sriqa-all", "sriqa-reg", "sriqa-gen"}
    assert set(result["kadid10k"]) == {"accuracy", "pairs", "correct", "seconds", "srcc", "plcc", "krcc",
                                       "mos_images"}
    # the table lists every benchmark; those without a dataset folder as skipped
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert list(rows) == list(BENCHMARKS)
    assert "skipped" in rows["tid2013"] and "skipped" in rows["diffiqa-psy"]
    assert rows["kadid10k"].split()[1:4] == ["7", "4", "0.5714"]


def test_sriqa_pairs_every_unordered_pair_with_the_scene_original(hand):
    _, data, scenes = hand
    bench = load_benchmark(data, "sriqa-all")
    assert len(bench.x1) == 110
    for scene, entries in scenes.items():
        mine = [(a.name, b.name) for a, b, y in zip(bench.x1, bench.x2, bench.y) if y.name == f"{scene}_Original.png"]
        assert len(mine) == 55
        names = [e[0] for e in entries]
        assert {frozenset(p) for p in mine} == {frozenset(p) for p in itertools.combinations(names, 2)}
        assert any(f"{scene}_Original.png" in p for p in mine)  # the original is compared too
    g = {(a.name, b.name): v for a, b, v in zip(bench.x1, bench.x2, bench.g)}
    mos = {n: m for s in scenes.values() for n, _, m in s}
    assert all(v == (1.0 if mos[a] > mos[b] else 0.0 if mos[a] < mos[b] else 0.5) for (a, b), v in g.items())


def test_named_missing_benchmark_and_unknown_name_are_errors(hand, capsys):
    run, data, _ = hand
    for bench in ("tid2013", "kadid10k,nope"):
        code, out, err = run_cli(capsys, "--bench", bench, "--data-root", data, "--weights", run, "--stage", "1")
        assert code == 2 and out == ""
        assert err.startswith("error: ") and err.count("\n") == 1
    code, out, err = run_cli(capsys, "--bench", "kadid10k", "--data-root", data, "--weights", run)  # stage 3
    assert code == 2 and "fidelity" in err and out == ""


@pytest.mark.parametrize("device", ["meta", "nonsense"])
def test_a_bad_device_is_one_error_line_before_the_benchmarks_are_read(hand, capsys, monkeypatch, device):
    run, data, _ = hand
    monkeypatch.setattr("evaluate.load_benchmark", lambda *a, **k: pytest.fail("a benchmark was read"))
    code, out, err = run_cli(capsys, "--bench", "kadid10k", "--data-root", data, "--weights", run, "--stage", "1",
                             "--device", device)
    assert (code, out) == (2, "")
    assert err == {"meta": "error: --device meta: the meta device holds no data, nothing can be scored on it (use "
                           "cpu, cuda or cuda:N)\n",
                   "nonsense": "error: --device nonsense: not a device name (use cpu, cuda or cuda:N)\n"}[device]


# ---------------------------------------------------------------------------------------------- cached == direct


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_corpus):
    root = tmp_path_factory.mktemp("synth")
    shutil.copytree(small_corpus, root / "data")  # synth.generate(seed=0, scale="small"), made once a run
    paths = write_checkpoints(root / "ckpt", random_afine(tiny_clip(seed=4), seed=5))
    return root / "data", paths


def direct(model, bench, stage, keep):
    """The official tester's way: every kept triplet encodes its three images."""
    u = np.array([triplet_scores(model, bench.x1[i], bench.x2[i], bench.y[i], stage) for i in keep])
    return u[:, 0], u[:, 1]


@pytest.mark.parametrize("stage,names,batch_size", [
    (3, BENCHMARKS, 5),
    (1, ("sriqa-all", "diffiqa-pyy", "kadid10k"), 7),
    (2, ("sriqa-gen", "diffiqa-nyy", "pipal"), 4),
])
def test_cached_accuracies_equal_direct_scoring(corpus, stage, names, batch_size):
    data, paths = corpus
    model = load_afine(paths["afine"], require=STAGE_PARTS[stage])
    cache = TermCache()
    benches = [load_benchmark(data, n) for n in names]
    every = list(dict.fromkeys(it for b in benches for it in b.items()))
    compute_terms(model, every, stage, cache, batch_size=batch_size, progress=False)
    distinct = {p for it in every for p in (it if stage != 1 else it[:1])}
    assert cache.encoded == len(distinct)  # one CLIP pass per distinct image
    for bench in benches:
        items = bench.items()
        scores = dict(zip(items, item_scores(model, cache, items, stage)))
        keep = np.unique(np.linspace(0, len(bench.x1) - 1, 24).round().astype(int))  # direct scoring is slow
        u1 = np.array([scores[(bench.x1[i], bench.y[i])] for i in keep])
        u2 = np.array([scores[(bench.x2[i], bench.y[i])] for i in keep])
        d1, d2 = direct(model, bench, stage, keep)
        # D sums terms that reach tens here and can cancel: float32 rounding is relative to the largest of them
        atol = 1e-5 + 1e-6 * max(np.abs(d1).max(), np.abs(d2).max())
        np.testing.assert_allclose(u1, d1, rtol=1e-4, atol=atol)
        np.testing.assert_allclose(u2, d2, rtol=1e-4, atol=atol)
        g = np.asarray(bench.g)[keep]
        assert two_afc_accuracy(u1, u2, g) == two_afc_accuracy(d1, d2, g), bench.name


def test_image_with_two_references_is_encoded_once(corpus):
    data, paths = corpus
    model = load_afine(paths["afine"])
    images = sorted((data / "KADID10K" / "images").glob("I01*.png"))[:4]  # same size: the reference + 3
    ref, a, b, c = images
    items = [(a, ref), (a, b), (b, ref), (ref, ref), (c, b), (c, ref)]  # b is a reference and a test image
    for batch_size in (1, 2, 5):
        cache = TermCache()
        compute_terms(model, items, 3, cache, batch_size=batch_size, progress=False)
        assert cache.encoded == 4
        with torch.no_grad():
            for img, r in items:
                want = model(load_image(img)[None], load_image(r)[None])["afine_all"].item()
                assert item_scores(model, cache, [(img, r)], 3)[0] == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_sharded_plans_cover_every_item_once(corpus):
    data, _ = corpus
    bench = load_benchmark(data, "kadid10k")
    items = bench.items()
    images = list(dict.fromkeys(p for it in items for p in it))
    encoded, computed = [], []
    for rank in range(3):
        work = plan(images, items, 8, rank, 3)
        encoded += [p for batch in work.batches for p in batch]
        computed += [(img, ref) for due in work.fidelity for ref, imgs in due.items() for img in imgs]
        for batch in work.batches:  # one shape per batch
            assert len({load_image(p).shape for p in batch}) == 1
    assert sorted(encoded) == sorted(images)
    assert sorted(computed) == sorted(items)


def test_precision_reaches_clip_and_fp32_is_the_default(corpus, capsys, tmp_path):
    data, paths = corpus
    model = load_afine(paths["afine"])
    items = load_benchmark(data, "kadid10k").items()[:60]
    caches = {}
    for precision in (None, "fp32", "bf16"):
        caches[precision] = TermCache()
        kwargs = {"precision": precision} if precision else {}
        compute_terms(model, items, 3, caches[precision], batch_size=8, progress=False, **kwargs)
    assert caches["fp32"].n == caches[None].n and caches["fp32"].f == caches[None].f  # exact
    n32, n16 = (np.array([caches[p].n[k] for k in caches["fp32"].n]) for p in ("fp32", "bf16"))
    assert 0 < np.abs(n16 - n32).max() < 0.2 * n32.std()  # bf16 ran; it moves this tiny random N by 4% of its spread
    runs = {}
    for precision in ("fp32", "bf16"):
        code, _, err = run_cli(capsys, "--bench", "sriqa-reg", "--data-root", data, "--weights", paths["afine"],
                               "--precision", precision, "--json", tmp_path / f"{precision}.json")
        assert code == 0, err
        runs[precision] = json.loads((tmp_path / f"{precision}.json").read_text())["sriqa-reg"]
    assert runs["fp32"]["pairs"] == runs["bf16"]["pairs"]
    assert abs(runs["fp32"]["accuracy"] - runs["bf16"]["accuracy"]) < 0.1
    code, out, err = run_cli(capsys, "--bench", "kadid10k", "--data-root", data, "--weights", paths["afine"],
                             "--precision", "half")
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and "--precision" in err


def test_torchrun_two_ranks_equals_one_process(corpus, tmp_path, capsys):
    data, paths = corpus
    args = ["evaluate.py", "--bench", "kadid10k,diffiqa-psy,sriqa-reg", "--data-root", str(data), "--weights",
            str(paths["afine"]), "--no-progress", "--workers", "0", "--batch-size", "6", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = main([*args[1:], "--json", str(tmp_path / "one.json")])  # one process: this one
    one = subprocess.CompletedProcess(args, code, *capsys.readouterr())
    assert one.returncode == 0, one.stderr
    two = procs.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args,
                     "--json", tmp_path / "two.json"], cwd=ROOT, env=env)
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name]["correct"], a[name]["pairs"]) == (b[name]["correct"], b[name]["pairs"])
    assert two.stdout.count("kadid10k") == 1  # only rank 0 prints
    # each image goes through CLIP once, on one of the ranks: as many passes, summed over ranks, as one process
    passes = [re.findall(r"(\d+) distinct images, (\d+) CLIP passes", run.stderr) for run in (one, two)]
    assert passes[0] == passes[1] and len(passes[0]) == 1 and passes[0][0][0] == passes[0][0][1], passes


def test_unwritable_json_fails_before_the_work_and_results_print_before_writing(hand, capsys, tmp_path,
                                                                                monkeypatch):
    import evaluate

    run, data, _ = hand
    (tmp_path / "file").write_text("")
    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "load_afine", lambda *a, **k: pytest.fail("the work started before the check"))
        for target in (tmp_path / "file" / "r.json", tmp_path):  # under a file; a folder
            code, out, err = run_cli(capsys, "--bench", "kadid10k", "--data-root", data, "--weights", run,
                                     "--stage", "1", "--json", target)
            assert code == 2 and out == "" and err.startswith(f"error: {target}: cannot write")
            assert err.count("\n") == 1

    def full(path, obj):
        raise evaluate.AfineError(f"{path}: cannot write (no space left on device)")

    monkeypatch.setattr(evaluate, "write_json", full)  # the disk fills up after the check: results still shown
    code, out, err = run_cli(capsys, "--bench", "kadid10k", "--data-root", data, "--weights", run, "--stage", "1",
                             "--json", tmp_path / "r.json")
    assert code == 2 and "no space left on device" in err
    assert out.splitlines()[1].split()[:4] == ["kadid10k", "7", "4", "0.5714"]


def test_bad_image_in_a_loader_worker_is_one_error_line(hand, capsys, tmp_path):
    """A file whose header reads but whose pixels do not fails inside a DataLoader worker: one line, as without."""
    import shutil

    run, data, _ = hand
    copy = tmp_path / "data"
    shutil.copytree(data / "KADID10K", copy / "KADID10K")
    bad = copy / "KADID10K" / "images" / "I01_01_04.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated: the header is intact
    for workers in ("1", "0"):
        code, out, err = run_cli(capsys, "--bench", "kadid10k", "--data-root", copy, "--weights", run, "--stage", "1",
                                 "--workers", workers)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith(f"error: {bad}: cannot read image ("), err


@pytest.mark.parametrize("workers,batch_size,changed", [
    ("0", "16", "I01_01_04.png"),  # a batch of five: before, a raw torch.stack error
    ("2", "16", "I01_01_04.png"),  # the same in a DataLoader worker
    ("0", "1", "I01_01_04.png"),   # a batch of one: before, scored at its new size (a silent wrong score)
    ("2", "1", "I01.png"),         # a reference, kept for later batches' fidelity
])
def test_an_image_changed_after_the_header_check_is_one_error_line(hand, capsys, tmp_path, monkeypatch, workers,
                                                                   batch_size, changed):
    """An image rewritten to another size between the header check (plan) and its decoding: benchmark numbers
    need every image, so one error line naming the file and both sizes, exit 2, nothing printed."""
    import afine.evaluation as evaluation

    run, data, _ = hand
    copy = tmp_path / "data"
    shutil.copytree(data / "KADID10K", copy / "KADID10K")
    path = copy / "KADID10K" / "images" / changed
    real_sizes = evaluation.image_sizes

    def sizes_then_rewrite(*a, **k):
        sizes = real_sizes(*a, **k)
        flat(path, 70, size=(24, 32))
        return sizes

    monkeypatch.setattr(evaluation, "image_sizes", sizes_then_rewrite)
    code, out, err = run_cli(capsys, "--bench", "kadid10k", "--data-root", copy, "--weights", run, "--stage", "1",
                             "--workers", workers, "--batch-size", batch_size)
    assert (code, out) == (2, "")
    assert err == f"error: {path}: changed during the run: 32x24 now, 64x64 when checked\n"


def test_a_bad_image_on_one_torchrun_rank_stops_every_rank_with_its_line(corpus, tmp_path):
    """A truncated image (its header intact) fails on the one rank that decodes it: every rank stops with its
    error line within seconds, none waits for the others in a collective."""
    data, paths = corpus
    copy = tmp_path / "data"
    shutil.copytree(data / "KADID10K", copy / "KADID10K")
    bad = load_benchmark(copy, "kadid10k").x1[0]
    bad.write_bytes(bad.read_bytes()[:200])
    args = ["evaluate.py", "--bench", "kadid10k", "--data-root", str(copy), "--weights", str(paths["afine"]),
            "--no-progress", "--workers", "0", "--batch-size", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = procs.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                     cwd=ROOT, env=env, timeout=90)
    err = proc.stderr
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 2 and all(line.startswith(f"error: {bad}: cannot read image (") for line in ours), err
    assert "gloo" not in err.lower() and "Connection closed" not in err, err


def test_unwrap_worker_error():
    from afine.errors import AfineError, unwrap_worker_error

    wrapped = AfineError("Caught AfineError in DataLoader worker process 3.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\n    g()\nafine.errors.AfineError: a.png: broken\n")
    clean = unwrap_worker_error(wrapped)
    assert isinstance(clean, AfineError) and str(clean) == "a.png: broken"
    for unchanged in (AfineError("a.png: broken"), ValueError("x"),
                      RuntimeError("Caught ValueError in DataLoader worker process 0.\nTraceback\nValueError: x")):
        assert unwrap_worker_error(unchanged) is unchanged


def test_defaults_are_the_training_paths_and_both_spellings_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--bench", "all"]) == 2
    assert "data: data folder not found (--data-root points elsewhere)" in capsys.readouterr().err
    (tmp_path / "data").mkdir()
    assert main(["--bench", "all"]) == 2
    assert "data/afine.pth: A-FINE weights not found (--weights points elsewhere)" in capsys.readouterr().err
    released = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / "afine.pth"  # where `afine score` keeps it
    released.parent.mkdir(parents=True)
    released.touch()
    assert main(["--bench", "all"]) == 2
    assert (f"data/afine.pth: A-FINE weights not found (--weights points elsewhere; the released afine.pth that "
            f"`afine score` uses is {released})") in capsys.readouterr().err
    for spelling in ("--data_root", "--data-root", "--data_root=elsewhere"):
        assert main(["--bench", "all", *([spelling, "elsewhere"] if "=" not in spelling else [spelling])]) == 2
        assert "elsewhere: data folder not found" in capsys.readouterr().err


def test_the_default_clip_is_read_only_when_the_weights_hold_none(corpus, tmp_path, monkeypatch, capsys):
    data, paths = corpus
    monkeypatch.chdir(tmp_path)  # no data/ViT-B-32.pt here: fine while the weights hold their own CLIP
    assert main(["--bench", "kadid10k", "--data-root", str(data), "--weights", str(paths["afine"]),
                 "--no-progress"]) == 0
    heads = tmp_path / "heads"
    shutil.copytree(paths["folder"], heads)
    (heads / "clip_model.pth").unlink()
    assert main(["--bench", "kadid10k", "--data-root", str(data), "--weights", str(heads), "--no-progress"]) == 2
    assert "data/ViT-B-32.pt: CLIP checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize("again", [False, True])  # True: a second Ctrl-C as the loader's workers are shut down
def test_ctrl_c_while_loader_workers_start_is_one_line_and_exit_130(hand, tmp_path, again):
    from tests.tiny import ctrl_c_at_worker

    run, data, _ = hand
    script = Path(__file__).resolve().parents[1] / "evaluate.py"
    code, err = ctrl_c_at_worker(script, ["--bench", "kadid10k", "--data-root", data, "--weights", run,
                                                "--stage", "1", "--workers", "2", "--batch-size", "1",
                                                "--no-progress"], tmp_path, again=again)
    assert (code, err) == (130, "interrupted\n")


@pytest.mark.parametrize("gap", [0.0, 0.02, 0.05])
def test_two_ctrl_c_while_loader_workers_decode_are_one_line_and_exit_130(corpus, tmp_path, gap):
    """A terminal's Ctrl-C lands anywhere, such as in a batch's hand-over from a worker, and a second one `gap`
    seconds later in the cleanup the first one runs: Python printed "Exception ignored in ... __del__" there, and
    a worker a traceback of the broken hand-over. One line, exit code 130, and no process left (ctrl_c_at_batch
    fails the test otherwise)."""
    from tests.tiny import ctrl_c_at_batch

    data, paths = corpus
    code, err = ctrl_c_at_batch(ROOT / "evaluate.py", ["--bench", "kadid10k", "--data-root", data, "--weights",
                                                       paths["afine"], "--workers", "2", "--batch-size", "2",
                                                       "--no-progress"], tmp_path, batch=10, gap=gap)
    assert (code, err) == (130, "interrupted\n")


@pytest.mark.parametrize("case", ["weights", "clip", "triplet_list", "mos_list", "image_through_a_link"])
def test_json_over_a_file_it_reads_is_refused_before_the_work(hand, capsys, tmp_path, monkeypatch, case):
    import evaluate

    run, data, _ = hand
    kadid = data / "KADID10K"
    extra = []
    if case == "clip":
        extra = ["--clip", run / "clip_model.pth"]
    if case == "image_through_a_link":
        (tmp_path / "images").symlink_to(kadid / "images")
    target = {"weights": run / "net_qhead.pth", "clip": run / "clip_model.pth",
              "triplet_list": kadid / "Test" / "Triplet" / "Triplet.txt",
              "mos_list": kadid / "Test" / "MOS" / "I01.txt",
              "image_through_a_link": tmp_path / "images" / "I01_01_04.png"}[case]
    before = target.read_bytes()
    monkeypatch.setattr(evaluate, "load_afine", lambda *a, **k: pytest.fail("the work started before the check"))
    code, out, err = run_cli(capsys, "--bench", "kadid10k", "--data-root", data, "--weights", run, "--stage", "1",
                             *extra, "--json", target)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {target}: cannot write, this command reads that file"), err
    assert target.read_bytes() == before


def test_a_mos_list_naming_a_missing_image_is_named_by_file_and_line(hand, capsys, tmp_path):
    _, data, _ = hand
    copy = tmp_path / "data"
    shutil.copytree(data / "KADID10K", copy / "KADID10K")
    mos = copy / "KADID10K" / "Test" / "MOS" / "I01.txt"
    mos.write_text("I01_01_01.png,I01.png,4.5,0.1\nI01_01_09.png,I01.png,3.0,0.1\n")
    code, out, err = run_cli(capsys, "--bench", "kadid10k", "--data-root", copy, "--weights", tmp_path)
    assert (code, out) == (2, "")
    assert err == f"error: {mos}:2: image 'I01_01_09.png' not found under {copy / 'KADID10K' / 'images'}\n"


def test_json_dash_is_the_json_alone_on_stdout_and_the_table_goes_to_stderr(hand, capsys, tmp_path, monkeypatch):
    run, data, _ = hand
    monkeypatch.chdir(tmp_path)  # a wrong '-' is a file here, not in the repository
    common = ["--bench", "kadid10k", "--data-root", data, "--weights", run, "--stage", "1"]
    code, table, _ = run_cli(capsys, *common, "--json", tmp_path / "r.json")
    assert code == 0
    code, out, err = run_cli(capsys, *common, "--json", "-")
    assert code == 0
    no_time = [{name: {k: v for k, v in r.items() if k != "seconds"} for name, r in results.items()}
               for results in (json.loads(out), json.loads((tmp_path / "r.json").read_text()))]
    assert no_time[0] == no_time[1]  # stdout is the JSON file, whole
    shown = err.splitlines()
    assert [line.split()[:4] for line in shown[:2]] == [line.split()[:4] for line in table.splitlines()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


@pytest.mark.parametrize("target, message", [
    ("s3/log.jsonl", "it is a file of the training run folder"),
    ("s3/best/net_qhead.pth", "it is a file of the training run folder"),
    ("s3/best/best.json", "it is a file of the training run folder"),
    ("s3/built_on.json", "it is a file of the training run folder"),
    ("results.pth", "the file name must end in .json for what is written there (it ends in '.pth')"),
    ("results.jsonl", "the file name must end in .json for what is written there (it ends in '.jsonl')"),
])
def test_json_over_a_training_runs_files_or_under_another_suffix_is_refused(hand, capsys, tmp_path, monkeypatch,
                                                                            target, message):
    """A run the command does not read (s3) keeps its log, records and weights; results are JSON in a .json."""
    import evaluate

    run, data, _ = hand
    s3 = tmp_path / "s3"
    (s3 / "best").mkdir(parents=True)
    for name in ("config.json", "built_on.json", "log.jsonl", "best/best.json"):
        (s3 / name).write_text("{}\n")
    save_network_file(s3 / "best" / "net_qhead.pth", red_model().natural)
    before = {p: p.read_bytes() for p in s3.rglob("*") if p.is_file()}
    monkeypatch.setattr(evaluate, "load_afine", lambda *a, **k: pytest.fail("the work started before the check"))
    code, out, err = run_cli(capsys, "--bench", "kadid10k", "--data-root", data, "--weights", run, "--stage", "1",
                             "--json", tmp_path / target)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / target}: cannot write") and message in err, err
    assert {p: p.read_bytes() for p in s3.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "results.pth").exists() and not (tmp_path / "results.jsonl").exists()


# ---------------------------------------------------------------------------------------------- --plots


def test_plots_are_a_png_per_benchmark_of_the_set_size_and_leave_the_numbers_alone(hand, capsys, tmp_path):
    run, data, _ = hand
    common = ["--bench", "all", "--data-root", data, "--weights", run, "--stage", "1"]
    code, plain, _ = run_cli(capsys, *common, "--json", tmp_path / "plain.json")
    assert code == 0
    code, out, err = run_cli(capsys, *common, "--json", tmp_path / "plotted.json", "--plots", tmp_path / "plots")
    assert code == 0 and f"plots: 4 PNG files in {tmp_path / 'plots'}" in err
    plain_results, plotted = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "plotted"))
    for name, result in plotted.items():  # the same numbers, with or without pictures
        assert {k: v for k, v in result.items() if k != "seconds"} == \
            {k: v for k, v in plain_results[name].items() if k != "seconds"}
    assert [line.split()[:4] for line in out.splitlines()] == [line.split()[:4] for line in plain.splitlines()]
    pictures = sorted((tmp_path / "plots").iterdir())
    assert [p.name for p in pictures] == ["kadid10k.png", "sriqa-all.png", "sriqa-gen.png", "sriqa-reg.png"]
    for picture in pictures:  # MOS scatter beside the accuracy per method / type: two 6.4 x 4.8 in panels
        with Image.open(picture) as png:
            assert png.format == "PNG" and png.size == (1280, 480)


def method(name: str) -> str:
    """The SR method of a hand-built SRIQA name: 0001_M3x4.png -> M3, 0001_Original.png -> Original."""
    return name.split("_", 1)[1].removesuffix(".png").removesuffix("x4")


def test_accuracy_per_method_and_type_counts_the_pairs_holding_each(hand):
    from afine.plots import group_accuracy, image_groups

    _, data, scenes = hand
    bench = load_benchmark(data, "sriqa-all")
    reds = {n: r for entries in scenes.values() for n, r, _ in entries}
    scores = {(x, y): float(reds[x.name]) for x, y in bench.items()}  # lower red is better, as red_model says
    kind, groups = image_groups(bench)
    assert kind == "SR method" and set(groups.values()) == {"Original", *(f"M{k}" for k in range(10))}
    counts = group_accuracy(bench, scores, groups)
    assert list(counts) == ["Original", *(f"M{k}" for k in range(10))]
    for label, (correct, pairs) in counts.items():
        expected = [(a, b) for entries in scenes.values() for a, b in itertools.combinations(entries, 2)
                    if label in (method(a[0]), method(b[0]))]
        assert pairs == len(expected) == 2 * 10
        assert correct == sum(hand_count([a, b]) for a, b in expected)
    kadid = load_benchmark(data, "kadid10k")
    kind, groups = image_groups(kadid)  # I01_01_0N.png: distortion type 01; the reference I01.png has none
    assert kind == "distortion type" and groups == {p: "01" for p in kadid.x1 + kadid.x2 if p.name != "I01.png"}


def test_names_that_carry_no_group_give_one_bar_or_the_scatter_alone(corpus, hand, tmp_path):
    import dataclasses

    from afine.plots import benchmark_plot, image_groups

    data, _ = corpus
    # the small scale's 6, 5 and 6 distortion types, numbered from 01 (PIPAL from 00) as in the real names
    for name, types in (("kadid10k", range(1, 7)), ("tid2013", range(1, 7)), ("pipal", range(5))):
        kind, groups = image_groups(load_benchmark(data, name))
        assert kind == "distortion type" and set(groups.values()) == {f"{t:02d}" for t in types}
    diffiqa = load_benchmark(data, "diffiqa-psy")
    assert image_groups(diffiqa) is None  # <reference>_<NN>.png: the names say nothing of the generated image
    scores = {item: float(k % 7) for k, item in enumerate(diffiqa.items())}
    u1, u2 = [scores[it] for it in zip(diffiqa.x1, diffiqa.y)], [scores[it] for it in zip(diffiqa.x2, diffiqa.y)]
    accuracy, correct, pairs = two_afc_accuracy(u1, u2, diffiqa.g)
    benchmark_plot(diffiqa, scores, {"accuracy": accuracy, "pairs": pairs, "correct": correct}, "A-FINE D",
                   tmp_path / "diffiqa-psy.png")
    # a MOS set whose test images are named otherwise: the scatter alone
    _, hand_data, _ = hand
    kadid = load_benchmark(hand_data, "kadid10k")
    renamed = {p: p.with_name(p.name.replace("_01_", "-")) for p in {*kadid.x1, *kadid.x2, *kadid.mos_images}}
    renamed.update({y: y for y in kadid.y})
    odd = dataclasses.replace(kadid, name="MyIQA", x1=[renamed[p] for p in kadid.x1],
                              x2=[renamed[p] for p in kadid.x2], mos_images=[renamed[p] for p in kadid.mos_images])
    assert image_groups(odd) is None
    scores = {item: float(k) for k, item in enumerate(odd.items())}
    benchmark_plot(odd, scores, {"accuracy": 0.5, "pairs": 7, "correct": 3, "srcc": 0.5, "plcc": 0.5},
                   "A-FINE D", tmp_path / "MyIQA.png")
    for name in ("diffiqa-psy", "MyIQA"):  # one 6.4 x 4.8 in panel
        with Image.open(tmp_path / f"{name}.png") as png:
            assert png.size == (640, 480)


def test_the_mos_panel_draws_the_fitted_logistic_over_the_scores_and_titles_srcc_then_plcc(tmp_path, monkeypatch):
    """The MOS panel of a set of 40 images whose MOS follow a logistic of -score plus noise: the scatter is
    (score, MOS), the line is the 4-parameter logistic fitted here with scipy, drawn over the score range, and
    the title holds SRCC and PLCC computed here with scipy (0.758 and 0.950: apart, so a swap shows)."""
    from scipy import optimize, stats

    from afine import plots
    from afine.benchmarks import Benchmark
    from afine.metrics import correlations

    rng = np.random.default_rng(4)
    x = rng.uniform(-2, 3, 40)  # scores, lower is better
    mos = 1 + 4 / (1 + np.exp((x + 0.5) / 0.6)) + rng.normal(0, 0.4, 40)
    images = [tmp_path / f"{k}.png" for k in range(40)]
    bench = Benchmark("MyIQA", [], [], [], np.zeros(0), images, [tmp_path / "ref.png"] * 40, mos)
    drawn = []
    monkeypatch.setattr(plots, "save_picture", lambda fig, path: drawn.append(fig))
    plots.benchmark_plot(bench, dict(zip(zip(images, bench.mos_refs), x)), correlations(x, mos), "A-FINE D",
                         tmp_path / "MyIQA.png")
    [ax] = drawn[0].axes  # no pairs: the MOS panel alone

    def logistic(t, b1, b2, b3, b4):
        return (b1 - b2) / (1 + np.exp(-(t - b3) / abs(b4))) + b2

    fitted, _ = optimize.curve_fit(logistic, -x, mos, p0=[mos.max(), mos.min(), -x.mean(), x.std()], method="trf")
    srcc, plcc = stats.spearmanr(-x, mos)[0], stats.pearsonr(logistic(-x, *fitted), mos)[0]
    assert abs(srcc - plcc) > 0.1
    assert ax.get_title() == f"MyIQA: SRCC {srcc:.3f}, PLCC {plcc:.3f} (40 images)"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("A-FINE D (lower is better)", "MOS (higher is better)")
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), np.column_stack([x, mos]))
    [line] = [line for line in ax.lines if line.get_label() == "4-parameter logistic fit"]
    grid = np.linspace(x.min(), x.max(), 200)
    np.testing.assert_allclose(line.get_xdata(), grid)
    np.testing.assert_allclose(line.get_ydata(), logistic(-grid, *fitted), atol=1e-4)
    assert line.get_ydata()[0] > line.get_ydata()[-1] + 3  # high MOS at low scores: falling from left to right


def test_plots_without_matplotlib_or_a_writable_folder_fail_before_the_work(hand, capsys, tmp_path, monkeypatch):
    import evaluate

    run, data, _ = hand
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(evaluate, "load_afine", lambda *a, **k: pytest.fail("the work started before the check"))
    common = ["--bench", "kadid10k", "--data-root", data, "--weights", run, "--stage", "1"]
    (tmp_path / "mixed").mkdir()  # a folder where a picture would go over an image the benchmark reads
    image = data / "KADID10K" / "images" / "I01_01_04.png"
    (tmp_path / "mixed" / "kadid10k.png").symlink_to(image)
    before = image.read_bytes()
    for target, message in ((tmp_path / "file", "--plots names a file"),
                            (tmp_path / "file" / "plots", "cannot write"),
                            (tmp_path / "mixed", "this command reads that file")):
        code, out, err = run_cli(capsys, *common, "--plots", target)
        assert code == 2 and out == "" and err.count("\n") == 1 and message in err
    assert image.read_bytes() == before
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code, out, err = run_cli(capsys, *common, "--plots", tmp_path / "plots")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: evaluate.py --plots needs the optional package matplotlib")
    assert "pip install matplotlib" in err and not (tmp_path / "plots").exists()
