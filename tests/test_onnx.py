"""`afine export-onnx`: the ONNX file scores as PyTorch does under onnxruntime, at any batch and image size; the
command's errors are one line; the file is written only once it has been checked."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from afine.__main__ import main
from afine.image import preprocess
from afine.model import AFINE, TERMS, load_afine
from tests import procs
from tests.tiny import tiny_clip, write_checkpoints

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from afine import onnx_export  # noqa: E402
from afine.onnx_export import TOLERANCE, example_images, resize_axis  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (batch, height, width): sizes that are not multiples of 32 (resized inside), portrait and landscape, exact
# multiples (no resize), 64 x 64 (as many tokens as the tiny CLIP's positional table has rows: no table resize).
SIZES = [(1, 70, 50), (4, 50, 70), (1, 33, 100), (4, 100, 33), (4, 64, 64), (1, 96, 128), (1, 32, 32),
         (2, 57, 211)]


def conditioned_model() -> AFINE:
    """A tiny A-FINE whose terms spread over a good part of their range and whose float32 rounding moves them by
    a tenth of TOLERANCE at most (checked against float64 below): random CLIP, heads as initialised, the NR
    mapping centred on this model's raw N values, a moderate adapter. (tests.tiny.random_afine's large random
    heads and steep mappings make its float32 and float64 terms differ by 1e-3: PyTorch's own float32 result
    is no closer than that to the exact one, whatever the runtime.)"""
    torch.manual_seed(7)
    model = AFINE(tiny_clip(seed=7))
    with torch.no_grad():
        model.natural_scale.yita3.fill_(0.03)
        model.natural_scale.yita4.fill_(0.2)
        model.adapter.k.fill_(1.0)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The conditioned model's weights, the model as loaded from them, the ONNX file `afine export-onnx` wrote,
    and an onnxruntime session on it: one export for the whole module."""
    folder = tmp_path_factory.mktemp("onnx")
    paths = write_checkpoints(folder / "ckpt", conditioned_model())
    path = folder / "afine.onnx"
    assert main(["export-onnx", str(path), "--weights", str(paths["afine"])]) == 0
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return paths, load_afine(paths["afine"]), path, session


def run(session, dis: torch.Tensor, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs = session.run(None, {"dis": dis.numpy(), "ref": ref.numpy()})
    return {o.name: torch.from_numpy(v) for o, v in zip(session.get_outputs(), outputs)}


def test_terms_match_pytorch_at_every_batch_and_size(exported):
    _, model, _, session = exported
    double = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(0)
    values = {term: [] for term in TERMS}
    for i, (b, h, w) in enumerate(SIZES):
        smooth = example_images(b, h, w, seed=i)
        noise = torch.rand(b, 3, h, w, generator=g), torch.rand(b, 3, h, w, generator=g)
        for dis, ref in (smooth, noise):
            with torch.no_grad():
                expected, exact = model(dis, ref), double(dis.double(), ref.double())
            got = run(session, dis, ref)
            for term in TERMS:
                assert got[term].shape == (b,) and got[term].dtype == torch.float32
                rounding = (expected[term].double() - exact[term]).abs().max().item()
                assert rounding <= TOLERANCE[term] / 5, f"the test model is ill-conditioned: {term} {rounding}"
                deviation = (got[term] - expected[term]).abs().max().item()
                assert deviation <= TOLERANCE[term], f"{b}x{h}x{w} {term}: {deviation:.3g}"
                values[term] += expected[term].tolist()
    spread = {term: torch.tensor(v).std().item() for term, v in values.items()}
    assert spread["afine_all_scale"] > 5 and min(spread.values()) > 0.03, spread  # the terms vary


def test_graph_has_named_inputs_and_outputs_with_dynamic_axes(exported):
    _, _, path, _ = exported
    graph = onnx.load(str(path)).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [(v.name, dims(v)) for v in graph.input] == [("dis", ["batch", 3, "height", "width"]),
                                                        ("ref", ["batch", 3, "height", "width"])]
    assert [(v.name, dims(v)) for v in graph.output] == [(term, ["batch"]) for term in TERMS]


def test_black_images_score_as_in_pytorch(exported):
    """A channel that is 0 in both images has S1 = S2 = (0 + c) / (0 + c) = 1. The exporter's optimizer took
    `+ 1e-10` for `+ 0` and dropped it, giving 0 / 0 = NaN; the file is written without its rewrites."""
    _, model, _, session = exported
    black = torch.zeros(2, 3, 64, 48)
    with torch.no_grad():
        expected = model(black, black)
    got = run(session, black, black)
    for term in TERMS:
        assert torch.isfinite(got[term]).all(), term
        assert (got[term] - expected[term]).abs().max() <= TOLERANCE[term], term


def test_resize_axis_is_pytorchs_bicubic():
    g = torch.Generator().manual_seed(0)
    for n, size in [(70, 96), (500, 512), (33, 64), (50, 7), (50, 193), (17, 25), (64, 64)]:
        x = torch.rand(2, 3, n, 40, generator=g)
        expected = F.interpolate(x, size=(size, 40), mode="bicubic", align_corners=False)
        got = resize_axis(x, size, 2)
        assert (got - expected).abs().max() <= 2e-6, (n, size)  # float rounding: ONNX Resize is 6e-5 off
        if n == size:
            assert torch.equal(got, x)
    x = torch.rand(1, 3, 45, 70, generator=g)
    expected = F.interpolate(x, size=(64, 96), mode="bicubic", align_corners=False)
    assert (resize_axis(resize_axis(x, 96, 3), 64, 2) - expected).abs().max() <= 2e-6


class Preprocess(torch.nn.Module):
    def forward(self, images):
        return onnx_export.preprocess(images)


def test_onnxruntime_resizes_as_pytorch(tmp_path):
    """ONNX's Resize divides by the scale out/in, which float32 cannot hold (500 -> 512: 1.024): with it the
    pixels moved by 6e-5 (2e-4 normalised). The export's own resize is PyTorch's to float rounding."""
    from torch.export import Dim

    height, width = Dim("height", min=1), Dim("width", min=1)
    program = torch.onnx.export(Preprocess().eval(), (torch.rand(1, 3, 40, 72),), dynamo=True, optimize=False,
                                input_names=["images"], dynamic_shapes={"images": {2: height, 3: width}})
    program.save(str(tmp_path / "preprocess.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "preprocess.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for h, w in [(500, 375), (375, 500), (70, 50), (64, 96)]:
        images = torch.rand(1, 3, h, w, generator=g)
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        expected = preprocess(images)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-5, (h, w)


def test_a_file_that_disagrees_with_pytorch_is_not_written(exported, tmp_path, monkeypatch):
    """The check before the rename: the exported graph (here another model's) is run by onnxruntime against
    PyTorch; a file that disagrees is an error naming the term and leaves the old file as it was."""
    _, _, path, _ = exported
    monkeypatch.setattr(onnx_export, "to_onnx", lambda model, opset=None: onnx.load(str(path)))
    other = AFINE(tiny_clip(seed=8)).eval()
    out = tmp_path / "other.onnx"
    out.write_bytes(b"old")
    with pytest.raises(onnx_export.AfineError, match=r"other\.onnx: not written, the exported model's afine_"):
        onnx_export.export(other, out)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["other.onnx"]


def test_exporter_and_runtime_failures_are_one_line_and_leave_no_file(exported, tmp_path, capsys, monkeypatch):
    """What the exporter cannot write (an --opset it cannot convert to) or onnxruntime cannot load (opset 26 with
    these versions) is one line naming the file, with the versions, and no file."""
    paths, _, path, _ = exported
    out = tmp_path / "a.onnx"

    def fail(model, opset=None):
        raise RuntimeError("No Adapter From Version $19 for Gelu\nmore lines")

    monkeypatch.setattr(onnx_export, "to_onnx", fail)
    err = one_line_error(capsys, out, "--weights", paths["afine"], "--opset", "21")
    assert f"{out}: not written, torch.onnx.export failed at opset 21 (RuntimeError: No Adapter From" in err
    assert "try another --opset; versions: torch " in err

    def unknown_op(model, opset=None):
        proto = onnx.load(str(path))
        proto.graph.node[-1].op_type = "NoSuchOp"
        return proto

    monkeypatch.setattr(onnx_export, "to_onnx", unknown_op)
    err = one_line_error(capsys, out, "--weights", paths["afine"])
    assert f"{out}: not written, onnxruntime cannot run the exported model (" in err and "NoSuchOp" in err
    assert not list(tmp_path.iterdir())


def one_line_error(capsys, *args) -> str:
    assert main(["export-onnx", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_user_errors_are_one_line(exported, tmp_path, capsys, monkeypatch):
    paths, _, _, _ = exported
    weights = paths["afine"]
    err = one_line_error(capsys, tmp_path / "model.txt", "--weights", weights)
    assert "must end in .onnx" in err
    assert "cannot write, this command reads that file" in one_line_error(capsys, weights, "--weights", weights)
    assert "--opset must be from 18 to" in one_line_error(capsys, tmp_path / "a.onnx", "--weights", weights,
                                                          "--opset", "11")
    assert str(tmp_path / "none.pth") in one_line_error(capsys, tmp_path / "a.onnx", "--weights",
                                                        tmp_path / "none.pth")
    monkeypatch.setenv("AFINE_WEIGHTS", str(tmp_path / "released.pth"))
    err = one_line_error(capsys, tmp_path / "a.onnx", "--offline")
    assert "released A-FINE weights are not there and downloads are off (--offline)" in err
    assert not list(tmp_path.iterdir())


def test_missing_packages_are_named_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    err = one_line_error(capsys, tmp_path / "a.onnx", "--weights", tmp_path / "none.pth")
    assert "needs the optional packages onnxscript, onnxruntime" in err
    assert "pip install onnxscript onnxruntime" in err and "pip install '.[onnx]'" in err


def test_scoring_imports_no_onnx_package(exported, tmp_path):
    paths, _, _, _ = exported
    dis, ref = example_images(1, 40, 40, seed=0)
    from PIL import Image

    for name, image in (("dis.png", dis), ("ref.png", ref)):
        Image.fromarray((image[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / name)
    code = f"""
import sys
from afine.__main__ import main
assert main(["score", "--no-progress", "--weights", {str(paths["afine"])!r}, "dis.png", "ref.png"]) == 0
print(sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "onnxscript", "onnxruntime")))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = procs.run([sys.executable, "-c", code], env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
