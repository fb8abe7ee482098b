"""afine.AFINEMetric (torchmetrics): the values of `afine score`, accumulated over updates of any size, reduced
across processes as sums and counts; reset, state dicts without the model, clear errors for bad inputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import afine
from afine.__main__ import main
from afine.errors import AfineError
from afine.model import TERMS, load_afine
from tests import procs
from tests.tiny import random_afine, tiny_clip, write_checkpoints

pytest.importorskip("torchmetrics")
from afine.metric import AFINEMetric  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Image sizes (H, W): landscape, portrait, neither side a multiple of 32, the 32 px minimum.
SIZES = [(40, 56), (70, 33), (32, 32), (45, 45)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny weights; 7 (dis, ref) pairs in four sizes, as PNG files (for `afine score`) and as uint8 arrays; the
    pairs of the first size share one reference."""
    folder = tmp_path_factory.mktemp("metric")
    weights = write_checkpoints(folder / "ckpt", random_afine(tiny_clip(seed=3)))["afine"]
    rng = np.random.default_rng(11)
    pairs, lines = [], []
    for size, count in zip(SIZES, (3, 2, 1, 1)):
        ref = rng.integers(0, 256, (*size, 3)).astype(np.int16)
        for _ in range(count):
            dis = np.clip(ref + rng.integers(-60, 60, ref.shape), 0, 255).astype(np.uint8)
            name = f"{len(pairs)}"
            Image.fromarray(dis).save(folder / f"dis{name}.png")
            Image.fromarray(ref.astype(np.uint8)).save(folder / f"ref{name}.png")
            pairs.append((dis, ref.astype(np.uint8)))
            lines.append(f"dis{name}.png,ref{name}.png")
    (folder / "pairs.txt").write_text("\n".join(lines) + "\n")
    return weights, folder, pairs


def tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [1, 3, H, W] in [0, 1]: what an image file decodes to."""
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


def batches(pairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The pairs as updates in input order, sizes changing between them: 2 pairs against their shared reference
    given once (a reference batch of 1), 1 pair, 2 pairs, 1 pair, 1 pair."""
    x = [(tensor(d), tensor(r)) for d, r in pairs]
    return [(torch.cat([x[0][0], x[1][0]]), x[0][1]), x[2], (torch.cat([x[3][0], x[4][0]]),
                                                             torch.cat([x[3][1], x[4][1]])), x[5], x[6]]


@pytest.fixture(scope="module")
def scored(data):
    """`afine score --json` on the PNG files: each pair's five terms, in input order."""
    weights, folder, _ = data
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    with redirect_stdout(out):
        assert main(["score", "--no-progress", "--json", "--weights", str(weights), "--pairs",
                     str(folder / "pairs.txt")]) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def model(data):
    return load_afine(data[0])


@pytest.mark.parametrize("term", TERMS)
def test_values_are_those_of_afine_score(data, scored, model, term):
    _, _, pairs = data
    expected = [row[term] for row in scored]
    each = AFINEMetric(model, term=term, reduction="none")
    mean = AFINEMetric(model, term=term)
    total = AFINEMetric(model, term=term, reduction="sum")
    for output, reference in batches(pairs):
        for metric in (each, mean, total):
            metric.update(output, reference)
    assert each.compute().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert mean.compute().item() == pytest.approx(sum(expected) / len(expected), rel=1e-5, abs=1e-6)
    assert total.compute().item() == pytest.approx(sum(expected), rel=1e-5, abs=1e-5)


def test_weights_from_a_path_and_the_released_weights_by_default(data, scored, monkeypatch):
    weights, _, pairs = data
    output, reference = batches(pairs)[0]
    from_path = AFINEMetric(weights)
    from_path.update(output, reference)
    expected = (scored[0]["afine_all_scale"] + scored[1]["afine_all_scale"]) / 2
    assert from_path.compute().item() == pytest.approx(expected, rel=1e-5)
    monkeypatch.setenv("AFINE_WEIGHTS", str(weights))  # where the released afine.pth is kept: no download
    released = AFINEMetric()
    released.update(output, reference)
    assert released.compute().item() == pytest.approx(expected, rel=1e-5)
    monkeypatch.setenv("AFINE_WEIGHTS", str(weights.parent / "missing.pth"))
    monkeypatch.setenv("AFINE_OFFLINE", "1")
    with pytest.raises(AfineError, match="missing.pth: the released A-FINE weights are not there"):
        AFINEMetric()


def test_forward_gives_the_batch_and_accumulates(data, model):
    _, _, pairs = data
    metric, each = AFINEMetric(model), AFINEMetric(model, reduction="none")
    steps = []
    for output, reference in batches(pairs)[:3]:
        steps.append(metric(output, reference))
        each.update(output, reference)
    values = each.compute()
    assert [s.item() for s in steps] == pytest.approx([values[:2].mean().item(), values[2].item(),
                                                       values[3:5].mean().item()], rel=1e-6)
    assert metric.compute().item() == pytest.approx(values.mean().item(), rel=1e-6)


def test_reset_starts_again(data, model):
    _, _, pairs = data
    (a, a_ref), (b, b_ref) = batches(pairs)[:2]
    metric, fresh = AFINEMetric(model, reduction="none"), AFINEMetric(model, reduction="none")
    metric.update(a, a_ref)
    metric.reset()
    assert metric.count.item() == 0 and metric.total.item() == 0
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute().numel() == 0
    metric.update(b, b_ref)
    fresh.update(b, b_ref)
    assert torch.equal(metric.compute(), fresh.compute())
    mean = AFINEMetric(model)
    mean.update(a, a_ref)
    mean.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(mean.compute().item())  # no image: no mean (torchmetrics warns)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric AFINEMetric was called before")  # after a load
def test_state_dict_holds_no_model_weights_and_round_trips(data, model):
    _, _, pairs = data
    metric = AFINEMetric(model, reduction="none")
    for output, reference in batches(pairs)[:3]:
        metric.update(output, reference)
    assert metric.state_dict() == {}  # torchmetrics' states are not persistent by default; the model never is
    parent = torch.nn.ModuleDict({"head": torch.nn.Linear(2, 2), "metric": metric})
    assert sorted(parent.state_dict()) == ["head.bias", "head.weight"]
    torch.nn.ModuleDict({"head": torch.nn.Linear(2, 2), "metric": AFINEMetric(model)}).load_state_dict(
        parent.state_dict())  # strict

    metric.persistent(True)
    state = metric.state_dict()
    assert sorted(state) == ["count", "total", "values"]
    other = random_afine(tiny_clip(seed=9))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    loaded = AFINEMetric(other, reduction="none")
    loaded.persistent(True)
    loaded.load_state_dict(state)  # strict: the model's weights are not asked for, and kept
    assert torch.equal(loaded.compute(), metric.compute()) and loaded.count.item() == 5
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_model_is_frozen_in_eval_mode_and_no_gradient_reaches_the_output(data, model):
    _, _, pairs = data
    metric = AFINEMetric(model)
    metric.train()
    assert not metric.afine.training and not any(p.requires_grad for p in metric.afine.parameters())
    output, reference = batches(pairs)[0]
    output = output.clone().requires_grad_(True)
    assert not metric(output, reference).requires_grad
    assert metric.higher_is_better is False and metric.full_state_update is False
    assert (metric.plot_lower_bound, metric.plot_upper_bound) == (0.0, 100.0)
    assert AFINEMetric(model, term="afine_all").plot_lower_bound is None


def test_model_follows_the_metric_dtype(data, scored, model):
    """.to() moves the model with the states; inputs follow the model (here float64, close to float32's values)."""
    _, _, pairs = data
    metric = AFINEMetric(random_afine(tiny_clip(seed=3))).to(torch.float64)
    assert metric.afine.fidelity.alpha.dtype == torch.float64 and metric.total.dtype == torch.float64
    output, reference = batches(pairs)[1]
    metric.update(output, reference)
    assert metric.compute().item() == pytest.approx(scored[2]["afine_all_scale"], rel=1e-4)


def test_precision_is_that_of_the_clip_forward_pass(data, model):
    """precision="bf16" scores as model(..., precision="bf16") does (afine score --precision bf16), not as fp32."""
    _, _, pairs = data
    metric = AFINEMetric(model, reduction="none", precision="bf16")
    expected, fp32 = [], []
    for output, reference in batches(pairs)[:3]:
        metric.update(output, reference)
        with torch.no_grad():
            expected.append(model(output, reference, precision="bf16")["afine_all_scale"])
            fp32.append(model(output, reference)["afine_all_scale"])
    torch.testing.assert_close(metric.compute(), torch.cat(expected), rtol=0, atol=1e-5)
    assert not torch.allclose(metric.compute(), torch.cat(fp32), rtol=0, atol=1e-4)


def bad(shape=(2, 3, 40, 40), fill=0.5, dtype=torch.float32):
    return torch.full(shape, fill, dtype=dtype)


@pytest.mark.parametrize("output, reference, message", [
    ([[0.5]], bad(), "output: expected a tensor [B, 3, H, W], got list"),
    (bad((3, 40, 40)), bad(), "output: expected RGB images [B, 3, H, W], got shape (3, 40, 40)"),
    (bad((2, 1, 40, 40)), bad(), "output: expected RGB images [B, 3, H, W], got shape (2, 1, 40, 40)"),
    (bad(dtype=torch.uint8, fill=128), bad(), "output: expected floating-point RGB in [0, 1], got torch.uint8"),
    (bad((2, 3, 31, 40)), bad((2, 3, 31, 40)), "output: images must be at least 32x32 px"),
    (bad(), bad((2, 3, 40, 48)), "output and reference sizes differ"),
    (bad((3, 3, 40, 40)), bad(), "reference batch must be 1 or 3 (the output's), got shape (2, 3, 40, 40)"),
    (bad(fill=128.0), bad(), "output: expected RGB in [0, 1], got values in [128, 128] (a [0, 255] or [-1, 1] "
                             "image?; clamp a network's output with output.clamp(0, 1))"),
    (bad(), bad(fill=-0.5), "reference: expected RGB in [0, 1], got values in [-0.5, -0.5]"),
    (bad(fill=float("nan")), bad(), "output: non-finite values (NaN or infinity)"),
    (bad(), bad(fill=float("inf")), "reference: non-finite values (NaN or infinity)"),
])
def test_bad_inputs_are_one_clear_error(model, output, reference, message):
    metric = AFINEMetric(model)
    with pytest.raises(ValueError) as error:
        metric.update(output, reference)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert metric.count.item() == 0  # nothing counted


def test_one_nan_pixel_is_found(model):
    output = bad()
    output[1, 2, 7, 9] = float("nan")
    with pytest.raises(ValueError, match="output: non-finite values"):
        AFINEMetric(model).update(output, bad())


@pytest.mark.parametrize("kwargs, message", [
    ({"term": "afine"}, "term must be one of afine_all_scale, afine_all, afine_fr, afine_nr, afine_nr_ref, got "
                        "'afine'"),
    ({"reduction": "max"}, "reduction must be one of mean, sum, none, got 'max'"),
    ({"precision": "int8"}, "precision must be one of fp32, bf16, fp16, got 'int8'"),
])
def test_bad_settings_are_one_clear_error(model, kwargs, message):
    with pytest.raises(ValueError) as error:
        AFINEMetric(model, **kwargs)
    assert str(error.value) == message


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return procs.run([sys.executable, "-c", code], cwd=ROOT, timeout=120,
                     env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})


def test_torchmetrics_is_optional():
    """`import afine` and its model, loss and commands do not import torchmetrics; without it installed,
    afine.AFINEMetric is one error line naming the package to install."""
    quiet = run_python("import sys, afine, afine.model, afine.afine_loss, afine.score, afine.__main__\n"
                       "print('torchmetrics' in sys.modules)")
    assert quiet.returncode == 0 and quiet.stdout == "False\n", quiet.stderr
    missing = run_python("import sys\nsys.modules['torchmetrics'] = None  # as if not installed\nimport afine\n"
                         "try:\n    afine.AFINEMetric\nexcept afine.AfineError as e:\n    print(e)")
    assert missing.returncode == 0, missing.stderr
    assert missing.stdout.startswith("afine.AFINEMetric needs the optional package torchmetrics, which cannot be "
                                     "imported")
    assert missing.stdout.rstrip().endswith("install it with: pip install torchmetrics  (or, in this repository: "
                                            "pip install '.[metrics]')")
    assert len(missing.stdout.splitlines()) == 1
    assert afine.AFINEMetric is AFINEMetric


LAUNCHER = """
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from afine.metric import AFINEMetric

def work(rank, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    data = torch.load(f"{folder}/data.pt")
    mean = AFINEMetric(data["weights"])
    metrics = {"mean": mean, "sum": AFINEMetric(mean.afine, reduction="sum"),
               "none": AFINEMetric(mean.afine, reduction="none")}
    for i in data["shards"][rank]:
        for metric in metrics.values():
            metric.update(*data["batches"][i])
    local = {name: metric.compute() for name, metric in metrics.items()}  # synced: every rank's images
    own = AFINEMetric(mean.afine, sync_on_compute=False)
    for i in data["shards"][rank]:
        own.update(*data["batches"][i])
    local["own"] = own.compute()  # this rank's images only
    torch.save(local, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.start_processes(work, args=(sys.argv[1],), nprocs=2, start_method="fork")
"""


def on_two_processes(folder: Path, timeout: float = 90) -> list[dict[str, torch.Tensor]]:
    """Run LAUNCHER (two forked Gloo ranks), bounded by `timeout` and leaving nothing behind (tests/procs.py).
    Each rank's results."""
    proc = procs.run([sys.executable, "-c", LAUNCHER, str(folder)], cwd=ROOT, timeout=timeout,
                     env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    err = proc.stderr
    assert proc.returncode == 0, err[-3000:]
    return [torch.load(folder / f"rank{rank}.pt") for rank in (0, 1)]


def test_two_gloo_processes_with_uneven_shards_give_the_one_process_values(data, model, tmp_path):
    weights, _, pairs = data
    updates = batches(pairs)
    shards = [[0], [1, 2, 3, 4]]  # rank 0: 2 images; rank 1: 5 images in four sizes
    torch.save({"weights": str(weights), "batches": updates, "shards": shards}, tmp_path / "data.pt")
    one = {"mean": AFINEMetric(model), "sum": AFINEMetric(model, reduction="sum"),
           "none": AFINEMetric(model, reduction="none")}
    for output, reference in updates:
        for metric in one.values():
            metric.update(output, reference)
    ranks = on_two_processes(tmp_path)
    for result in ranks:
        for name, metric in one.items():
            torch.testing.assert_close(result[name], metric.compute(), rtol=1e-6, atol=1e-5)
    mean_of_means = (ranks[0]["own"] + ranks[1]["own"]) / 2
    assert abs(mean_of_means - one["mean"].compute()) > 1e-3  # what the sums and counts are for
