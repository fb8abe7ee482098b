"""Compiled kernels (afine/compiled.py): compiled results equal eager ones, each shape compiled once and reused
(smaller batches padded), the cap on shapes, the fallback when compiling fails, and every entry point (the score
command, the loss, a training stage). The plumbing is checked with torch's counting backend or aot_eager (no code
generation: seconds); one test compiles with inductor, as `--compile` does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.testing import CompileCounter

import train_stage1
from afine import compiled
from afine.__main__ import main
from afine.afine_loss import AFINELoss
from afine.compiled import compile_model
from afine.distributed import Dist
from afine.model import TERMS
from tests.test_train import square_corpus, stage1_config, weights
from tests.tiny import random_afine, tiny_clip, write_checkpoints


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # no compiled code shared between tests
    yield
    torch._dynamo.reset()


def model():
    return random_afine(tiny_clip(seed=3))


def images(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def assert_terms_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    for t in TERMS:
        torch.testing.assert_close(a[t], b[t], rtol=tol, atol=tol)


@torch.inference_mode()
def test_each_shape_compiled_once_and_smaller_batches_reuse_it():
    eager, counter = model(), CompileCounter()
    fast = compile_model(model(), backend=counter)
    calls = [(2, 64, 64, 0), (1, 64, 64, 1), (2, 64, 64, 2), (3, 48, 80, 3), (2, 48, 80, 4)]
    for b, h, w, seed in calls:
        dis, ref = images(b, h, w, seed), images(b, h, w, seed + 10)
        assert_terms_close(fast(dis, ref), eager(dis, ref), 1e-6)
    # two sizes, each at its first batch (dis and ref together: 4 and 6 images); the smaller batches were padded
    assert counter.frame_count == 2
    assert fast.compiled_tower.shapes() == 2


@torch.inference_mode()
def test_shapes_beyond_the_cap_run_eager_after_one_warning(capsys):
    eager, counter = model(), CompileCounter()
    fast = compile_model(model(), backend=counter, max_shapes=1)
    for h, w in ((64, 64), (96, 64), (64, 96), (96, 64)):
        dis, ref = images(2, h, w, h), images(2, h, w, w)
        assert_terms_close(fast(dis, ref), eager(dis, ref), 1e-6)
    assert counter.frame_count == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: compile: 1 input shapes compiled") \
        and "4x3x96x64" in err[0], err


@torch.inference_mode()
def test_a_failed_compile_is_one_warning_and_eager_results(capsys):
    def no_compiler(gm, example_inputs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    eager, fast = model(), compile_model(model(), backend=no_compiler)
    for size in (64, 96):
        dis, ref = images(2, size, size, 0), images(2, size, size, 1)
        assert_terms_close(fast(dis, ref), eager(dis, ref), 0)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: compile: torch.compile failed") \
        and "no C++ compiler found" in err[0] and err[0].endswith("running uncompiled"), err
    with pytest.raises(RuntimeError):  # a mistake of the caller's is still an error, not a warning
        fast.encode(torch.rand(1, 4, 64, 64))


def test_bad_options():
    with pytest.raises(ValueError, match="backend"):
        compile_model(model(), backend="nonsense")
    with pytest.raises(ValueError, match="max_shapes"):
        compile_model(model(), max_shapes=0)


@pytest.mark.parametrize("term", ["afine_all"])  # F, N, mappings and adapter: all of the loss
def test_compiled_loss_value_and_gradient_equal_eager(monkeypatch, term):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")  # AOTAutograd's forward and backward graphs, no codegen
    eager, fast = AFINELoss(model(), term=term), AFINELoss(model(), term=term, compile=True)
    reference = images(2, 64, 96, 0)
    for b, seed in ((2, 1), (1, 2)):  # the second batch is padded: its gradient must still be its own
        outputs = [images(b, 64, 96, seed).requires_grad_() for _ in range(2)]
        losses = [loss(out, reference[:b]) for loss, out in zip((eager, fast), outputs)]
        for loss in losses:
            loss.backward()
        # float noise: the compiled graph's decompositions reorder float32 sums (4.5e-6 relative seen on the loss
        # of the padded batch on an AVX2 CPU); a wrong pairing or a padded row leaking in moves it by far more
        torch.testing.assert_close(losses[1], losses[0], rtol=2e-5, atol=1e-6)
        scale = outputs[0].grad.abs().max().item()  # float noise: relative to the gradient's size, not per pixel
        torch.testing.assert_close(outputs[1].grad, outputs[0].grad, rtol=1e-4, atol=1e-4 * scale)
        assert (outputs[1].grad - outputs[0].grad).norm() < 1e-5 * outputs[0].grad.norm()
    assert fast.afine.compiled_tower.shapes() == 2  # output (with grad) and reference (without) at one batch


@torch.inference_mode()
def test_inductor_scores_equal_eager():
    """The compiler `--compile` uses, generating C++ (the one slow test here: tens of seconds on a busy CPU)."""
    eager, fast = model(), compile_model(model())
    dis, ref = images(2, 48, 80, 0), images(1, 48, 80, 1)
    assert_terms_close(fast(dis, ref), eager(dis, ref), 1e-5)
    assert_terms_close(fast(dis[:1], ref), eager(dis[:1], ref), 1e-5)  # padded to the compiled batch
    assert fast.compiled_tower.shapes() == 1 and not fast.compiled_tower.failed


def test_score_command_compiled_equals_uncompiled(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    paths = write_checkpoints(tmp_path / "ckpt", model())
    rng = np.random.default_rng(0)
    for kind in ("dis", "ref"):
        (tmp_path / kind).mkdir()
        for i, (h, w) in enumerate([(64, 80), (64, 80), (64, 80), (50, 70)]):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / kind / f"{i}.png")
    outputs = []
    for extra in ([], ["--compile"]):
        code = main(["score", "--no-progress", "--json", "--batch-size", "2", "--weights", str(paths["afine"]),
                     *extra, str(tmp_path / "dis"), str(tmp_path / "ref")])
        out, err = capsys.readouterr()
        assert code == 0 and "warning" not in err, err
        outputs.append([json.loads(line) for line in out.splitlines()])
    assert len(outputs[0]) == 4
    for plain, fast in zip(*outputs):
        assert (plain["dis"], plain["ref"]) == (fast["dis"], fast["ref"])
        for t in TERMS:
            assert fast[t] == pytest.approx(plain[t], rel=1e-5, abs=1e-6)


def test_compiled_training_stage_equals_eager(tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        square = square_corpus(tmp_path / "data")
        plain = train_stage1.train(stage1_config(square, tmp_path / "plain"), Dist())
        fast = train_stage1.train(stage1_config(square, tmp_path / "fast", compile="true"), Dist())
    finally:
        torch.set_num_threads(threads)
    assert plain.compiled_tower is None and fast.compiled_tower.shapes() >= 1
    a, b = weights(plain), weights(fast)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
