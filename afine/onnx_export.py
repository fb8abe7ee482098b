"""`afine export-onnx afine.onnx`: the scoring model as an ONNX file, for runtimes without Python or PyTorch.

    afine export-onnx afine.onnx                          # the released weights, downloaded on first use
    afine export-onnx afine.onnx --weights runs/s3        # a model of one's own

The file has two inputs, `dis` and `ref` (RGB in [0, 1], float32 [B, 3, H, W], the same shape), and one output
[B] per term, named as the term (afine_all_scale, afine_all, afine_fr, afine_nr, afine_nr_ref). Batch, height
and width are dynamic: any size `afine score` takes, resized inside to multiples of 32 as A-FINE does
(docs/scoring.md, "ONNX").

How, and why so:
- torch.onnx.export with dynamo=True and dynamic_shapes. The TorchScript-based exporter records Python integer
  arithmetic on sizes (the next multiple of 32, the token count) as constants of the traced example, so its
  file is right only at the example's size; the dynamo exporter keeps that arithmetic in the graph.
- The graph is not run through the exporter's optimizer (optimize=False): its rewrite rules treat a constant
  within 1e-8 of 0 as 0 and one within 1e-5 of 1 as 1, so `+ 1e-10` in the fidelity head's S1 and S2 is
  dropped and a channel that is zero in both images gives 0/0 = NaN instead of 1. Runtimes optimise the graph
  themselves when they load it.
- Both bicubic resizes (the image to multiples of 32, the positional table to the token count) are written
  here as gathers and weighted sums that compute what PyTorch computes. ONNX's Resize maps output to input
  positions by dividing by the scale out/in, which float32 cannot hold exactly (500 -> 512 px: 1.024), where
  PyTorch multiplies by in/out (500 / 512 = 0.9765625 exactly): the resized pixels differed by up to 6e-5,
  and a test model's afine_all_scale by 1.3e-4.
- Resizing to the same size is computed too (exactly the identity: weights 0, 1, 0, 0), rather than branched
  on, so the one graph serves every size.

Before the file is written, onnxruntime scores random images of a size other than the traced one with it, and
the export fails if any term differs from PyTorch's by more than 1e-4 (afine_all_scale, 0..100) or 1e-5 (the
others): a different onnx, onnxscript or onnxruntime version never leaves a file that scores wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write, check_writable, is_stdout, printout
from .checkpoint import weight_files
from .download import released_path, released_weights
from .errors import AfineError
from .image import normalize, padded_size
from .model import AFINE, TERMS, load_afine
from .score import add_weights_arguments

SUFFIXES = (".onnx",)
PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the exporter needs the first two; the check, onnxruntime
MIN_OPSET = 18  # the dynamo exporter's oldest
CUBIC_A = -0.75  # PyTorch's bicubic (Keys' kernel with a = -0.75)
# The largest difference from PyTorch the check accepts: on the 0..100 scale, and on the other terms (-2..4).
TOLERANCE = {"afine_all_scale": 1e-4, "afine_all": 1e-5, "afine_fr": 1e-5, "afine_nr": 1e-5, "afine_nr_ref": 1e-5}


def require_packages(what: str = "afine export-onnx") -> None:
    """One AfineError naming every missing package, with the command that installs them."""
    missing = []
    for package in PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        names = ", ".join(missing)
        raise AfineError(f"{what} needs the optional package{'s' if len(missing) > 1 else ''} {names}, which "
                         f"cannot be imported; install {'them' if len(missing) > 1 else 'it'} with: pip install "
                         f"{' '.join(missing)}  (or, in this repository: pip install '.[onnx]')")


def cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """Distances t [N] in [0, 1] of output points past their input sample -> the four taps' weights [N, 4], as
    PyTorch computes them."""

    def near(x):  # |x| <= 1
        return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=1)


def resize_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Bicubic resize of `x` along `dim` to `size` (align_corners=False, edge samples repeated): what
    F.interpolate(mode="bicubic") does along one axis, to float32 rounding (a few 1e-7 on values in [0, 1]).

    As in PyTorch, the input position of output i is (i + 0.5) * (n / size) - 0.5, with n / size rounded to
    float32 and the product and difference rounded once (as a fused multiply-add does: it halves the largest
    difference, 50 -> 193 rows); the four taps are summed in order. size == n gives the weights 0, 1, 0, 0:
    exactly the identity.
    """
    n = x.shape[dim]
    scale = torch.scalar_tensor(n, dtype=torch.float32, device=x.device) / size
    steps = torch.arange(size, dtype=torch.float64, device=x.device) + 0.5
    position = (scale.double() * steps - 0.5).float()
    start = torch.floor(position).clamp(max=n - 1)
    weights = cubic_weights((position - start).clamp(0, 1)).to(x.dtype)
    start = start.to(torch.long)
    shape = [1] * x.dim()
    shape[dim] = size
    out = None
    for tap in range(4):
        index = (start + (tap - 1)).clamp(0, n - 1)
        term = x.index_select(dim, index) * weights[:, tap].reshape(shape)
        out = term if out is None else out + term
    return out


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """afine.image.preprocess for export: normalised, and resized to the next multiples of 32 by resize_axis
    (at every size: to the same size it is the identity)."""
    x = normalize(images)
    height, width = padded_size(x.shape[-2], x.shape[-1])
    return resize_axis(resize_axis(x, width, 3), height, 2)  # along the rows first, as PyTorch sums them


class Scorer(nn.Module):
    """An A-FINE model's scoring forward, written for export: dis and ref [B, 3, H, W] in [0, 1], the same
    shape -> the five terms (a tuple in TERMS order), each [B].

    It computes what AFINE.forward computes for a reference per test image, with the two bicubic resizes done
    by resize_axis and done at every size (see the module's docstring).
    """

    def __init__(self, model: AFINE):
        super().__init__()
        self.model = model

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """AFINE.encode (fp32): normalised images resized to multiples of 32, and the CLIP features [B, L, T, W]."""
        x = preprocess(images)
        visual = self.model.clip.visual  # VisionTransformer.forward, with the positional table resized here
        tokens = visual.embed_patches(x)
        cls = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        tokens = tokens + resize_axis(visual.positional_embedding, tokens.shape[1], 0).to(tokens.dtype)
        tokens = visual.ln_pre(tokens)
        features = []
        for block in visual.transformer.resblocks:
            tokens = block(tokens)
            features.append(tokens[:, 1:])
        return x, torch.stack(features, dim=1)

    def forward(self, dis: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, features = self.encode(torch.cat([dis, ref]))
        b = dis.shape[0]
        n = self.model.natural(x, features)
        f = self.model.fidelity(x[:b], features[:b], x[b:], features[b:])
        terms = self.model.terms(n[:b], n[b:], f)
        return tuple(terms[t] for t in TERMS)


def example_images(batch: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A test batch and its references: smooth random images in [0, 1] and noisy copies of them."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(batch, 3, height // 8 + 2, width // 8 + 2, generator=g)
    ref = torch.nn.functional.interpolate(ref, size=(height, width), mode="bilinear", align_corners=False)
    dis = (ref + 0.1 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    return dis, ref


def to_onnx(model: AFINE, opset: int | None = None):
    """The ONNX model (an onnx.ModelProto) of `model`'s scoring forward, with dynamic batch, height and width."""
    from torch.export import Dim

    scorer = Scorer(model).eval()
    batch, height, width = Dim("batch", min=1), Dim("height", min=1), Dim("width", min=1)
    shapes = {"dis": {0: batch, 2: height, 3: width}, "ref": {0: batch, 2: height, 3: width}}
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), torch.no_grad(), quiet[0], quiet[1]:
        # The exporter's progress lines, its notes on axis names, and the tracebacks it logs where it falls back
        # to another way (a failure that matters is raised, and export() reports it in one line).
        warnings.simplefilter("ignore")
        program = torch.onnx.export(scorer, example_images(2, 40, 72, seed=0), dynamo=True, optimize=False,
                                    input_names=["dis", "ref"], output_names=list(TERMS), dynamic_shapes=shapes,
                                    opset_version=opset, external_data=False, verbose=False)
    import onnxscript.optimizer

    # Constants folded (the shape arithmetic's casts, which runtimes warn they cannot fold) without the
    # optimizer's rewrite rules (see the module's docstring).
    onnxscript.optimizer.fold_constants(program.model)
    onnxscript.optimizer.remove_unused_nodes(program.model)
    return program.model_proto


def deviation(model: AFINE, path: str | Path, sizes=((3, 72, 40), (1, 64, 96))) -> dict[str, float]:
    """The largest difference of each term between onnxruntime on CPU running the file at `path` and PyTorch
    running `model`, over batches of `sizes` (B, H, W) (example_images)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = dict.fromkeys(TERMS, 0.0)
    for i, (b, h, w) in enumerate(sizes):
        dis, ref = example_images(b, h, w, seed=1 + i)
        with torch.no_grad():
            expected = model(dis, ref)
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"dis": dis.numpy(),
                                                                                    "ref": ref.numpy()})))
        for term in TERMS:
            worst[term] = max(worst[term], (torch.from_numpy(got[term]) - expected[term]).abs().max().item())
    return worst


def versions() -> str:
    return ", ".join(f"{p} {importlib.import_module(p).__version__}" for p in ("torch", *PACKAGES))


def failure(error: Exception) -> str:
    """An exception of the exporter or of onnxruntime in one line: its type and its message's first line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def export(model: AFINE, path: str | Path, opset: int | None = None) -> dict[str, float]:
    """Write `model`'s scoring forward to `path` as ONNX, atomically, once onnxruntime has checked it against
    PyTorch (deviation, TOLERANCE); returns the deviation of each term. AfineError, and no file, if the exporter
    fails, if onnxruntime cannot run the file, or if it scores otherwise than PyTorch."""
    import onnx

    require_packages()
    at = "" if opset is None else f" at opset {opset}"
    hint = "" if opset is None else "; try another --opset"
    try:
        proto = to_onnx(model.eval(), opset)
    except Exception as e:  # the exporter's own failures: an op it cannot write at this opset, a version mismatch
        raise AfineError(f"{path}: not written, torch.onnx.export failed{at} ({failure(e)}){hint}; versions: "
                         f"{versions()}") from None
    found: dict[str, float] = {}

    def check(file: Path) -> None:
        try:
            found.update(deviation(model, file))
        except Exception as e:  # a graph this onnxruntime cannot load or run
            raise AfineError(f"{path}: not written, onnxruntime cannot run the exported model{at} ({failure(e)})"
                             f"{hint}; versions: {versions()}") from None
        bad = [t for t in TERMS if not found[t] <= TOLERANCE[t]]  # a NaN is bad too
        if bad:
            raise AfineError(f"{path}: not written, the exported model's {bad[0]} differs from PyTorch's by "
                             f"{found[bad[0]]:.3g} (more than {TOLERANCE[bad[0]]:g}) under onnxruntime{at}; "
                             f"versions: {versions()}")

    atomic_write(path, lambda f: f.write(onnx.ModelProto.SerializeToString(proto)), check)
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="FILE", help="the ONNX file to write (*.onnx; '-': standard output)")
    add_weights_arguments(parser)
    parser.add_argument("--opset", type=int, help=f"ONNX opset version, {MIN_OPSET} or newer (default: the "
                        "exporter's, 20 with torch 2.14), for runtimes that need another")
    parser.add_argument("--no-progress", action="store_true", help="no download progress bar")


def run(args: argparse.Namespace) -> int:
    """`afine export-onnx`: check everything that can be checked before loading (or downloading) the model."""
    require_packages()
    import onnx

    if args.opset is not None and not MIN_OPSET <= args.opset <= onnx.defs.onnx_opset_version():
        raise AfineError(f"--opset must be from {MIN_OPSET} to {onnx.defs.onnx_opset_version()} (the newest this "
                         f"onnx {onnx.__version__} knows), got {args.opset}")
    inputs = weight_files(args.weights if args.weights is not None else released_path())
    check_writable(args.out, inputs + ([Path(args.clip)] if args.clip else []), SUFFIXES)
    weights = args.weights if args.weights is not None else released_weights(args.offline, not args.no_progress)
    model = load_afine(weights, clip=args.clip)
    found = export(model, args.out, args.opset)
    worst = max(TERMS[1:], key=found.get)
    where = "standard output" if is_stdout(args.out) else args.out
    print(f"wrote {where}: inputs dis, ref [B, 3, H, W] in [0, 1]; outputs {', '.join(TERMS)} [B]; onnxruntime "
          f"within {found['afine_all_scale']:.1g} of PyTorch on afine_all_scale, {found[worst]:.1g} on the others",
          file=printout(args.out))
    return 0
