"""How far bf16 autocast moves A-FINE from float32: CLIP features, raw N and F, D, 2AFC order, stage-1 gradient.

    .venv/bin/python bench/amp_drift.py                      # CPU (bf16 autocast works there), a few minutes
    .venv/bin/python bench/amp_drift.py --device cuda --sizes 224x224,384x512,512x512 --pairs 16
    .venv/bin/python bench/amp_drift.py --weights demo_out/s3 --data-root demo_out/data    # a model on benchmarks

The published configs train in float32 (`amp: off`); bf16 is one flag away. This measures what that flag
changes on a random full-size ViT-B/32 A-FINE (random CLIP and heads: no download, so the figures describe
the numerics of the architecture, not of the released weights). Images are smooth random fields (bicubically
upsampled low-resolution noise) as references, each with two distorted versions (added noise and blur of
random strength), so a pair's 2AFC order is decided by the model, not fixed by construction.

Per size, the same images through CLIP in float32 and under bf16 autocast (heads in float32 either way, as in
training): the relative error ||bf16 - fp32|| / ||fp32|| of every block's features per image (max, mean),
the max |difference| of raw N and raw F and the same relative to their spread (std across the images), the
max |difference| of D, and the fraction of pairs whose order D(x1) < D(x2) flips. Then one stage-1 batch:
the cosine similarity of the bf16 and fp32 gradients of the stage-1 loss (train_stage1.triplet_losses).

With --weights and --data-root: that model (e.g. the demo's) on the benchmarks found there, scored as evaluate.py
scores them (afine.evaluation.compute_terms), once per precision. Per precision: the seconds taken, the largest
|difference| from fp32 of each of the five terms over every (image, reference) item, and per benchmark the
2AFC pairs whose order changes (and the correct count at fp32 and at that precision).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_stage1  # noqa: E402
from afine.benchmarks import load_benchmark, missing_folder, parse_benchmarks  # noqa: E402
from afine.evaluation import DEFAULT_CLIP, TermCache, compute_terms  # noqa: E402
from afine.metrics import two_afc_accuracy  # noqa: E402
from afine.model import AFINE, TERMS, load_afine  # noqa: E402
from bench.train import random_b32  # noqa: E402


def images(pairs: int, height: int, width: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(x1, x2, y) [pairs, 3, H, W] in [0, 1]: smooth references, two noisy / blurred versions of each."""
    low = torch.rand(pairs, 3, max(2, height // 32), max(2, width // 32), generator=g)
    y = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)
    y = (y + 0.03 * torch.randn(y.shape, generator=g)).clamp(0, 1)

    def distort(x):
        noise = 0.25 * torch.rand(pairs, 1, 1, 1, generator=g)
        blur = torch.randint(0, 3, (1,), generator=g).item() * 2 + 1
        x = F.avg_pool2d(x, blur, stride=1, padding=blur // 2, count_include_pad=False)
        return (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)

    return distort(y), distort(y), y


@torch.no_grad()
def scores(model: AFINE, x1, x2, y, device, amp: str) -> dict:
    """CLIP in `amp`, heads in float32: block features, raw N, raw F and D of both pairs."""
    b = x1.shape[0]
    a, feats = model.encode(torch.cat([x1, x2, y]).to(device), precision=amp)
    n = model.natural(a, feats)
    f = torch.cat([model.fidelity(a[i * b:(i + 1) * b], feats[i * b:(i + 1) * b], a[2 * b:], feats[2 * b:])
                   for i in (0, 1)])
    d = model.terms(n[:2 * b], n[2 * b:].repeat(2), f)["afine_all"]
    return {"feats": feats, "n": n, "f": f, "d": d}


def stage1_gradient(model: AFINE, batch: dict, device, amp: str) -> torch.Tensor:
    """The gradient of the stage-1 loss (mean over the batch) w.r.t. CLIP and the naturalness head, flat."""
    model.zero_grad(set_to_none=True)
    train_stage1.triplet_losses(model, batch, device, amp).mean().backward()
    params = list(model.clip.parameters()) + list(model.natural.parameters())
    return torch.cat([p.grad.flatten() for p in params if p.grad is not None]).double()  # float64: 88M terms


@torch.no_grad()
def benchmark_drift(args: argparse.Namespace) -> None:
    """The five terms and the 2AFC decisions of a model on the benchmarks, fp32 against each other precision."""
    device = torch.device(args.device)
    model = load_afine(args.weights, clip=args.clip, default_clip=DEFAULT_CLIP).to(device)
    names = [n for n in parse_benchmarks(args.bench, args.data_root) if missing_folder(args.data_root, n) is None]
    benches = [load_benchmark(args.data_root, n) for n in names]
    items = list(dict.fromkeys(it for b in benches for it in b.items()))
    terms, seconds = {}, {}
    for precision in ("fp32", *args.precisions.split(",")):
        cache, start = TermCache(), time.perf_counter()
        compute_terms(model, items, 3, cache, batch_size=args.batch_size, device=device, progress=False,
                      precision=precision)
        seconds[precision] = time.perf_counter() - start
        n_img, n_ref, f = (torch.tensor(v, device=device) for v in ([cache.n[i] for i, _ in items],
                                                                     [cache.n[r] for _, r in items],
                                                                     [cache.f[it] for it in items]))
        terms[precision] = {t: v.double().cpu() for t, v in model.terms(n_img, n_ref, f).items()}
    print(f"{args.weights} on {len(benches)} benchmarks in {args.data_root}: {len(items)} (image, reference) items, "
          f"{len({p for it in items for p in it})} images, device {device}, {torch.get_num_threads()} threads")
    print(f"{'precision':<9} {'seconds':>8}  " + "  ".join(f"{'max|d ' + t + '|':>22}" for t in TERMS))
    for precision, values in terms.items():
        diffs = [(values[t] - terms["fp32"][t]).abs().max().item() for t in TERMS]
        print(f"{precision:<9} {seconds[precision]:>8.1f}  " + "  ".join(f"{d:>22.2e}" for d in diffs))
    print(f"{'spread (std) at fp32':<19}" + "  ".join(f"{terms['fp32'][t].std().item():>22.2e}" for t in TERMS))
    where = {it: i for i, it in enumerate(items)}
    for precision in [p for p in terms if p != "fp32"]:
        print(f"\n2AFC, fp32 against {precision}: pairs whose order changes; correct at fp32 -> at {precision}")
        flips_total = pairs_total = 0
        for bench in benches:
            u = {p: terms[p]["afine_all"].numpy() for p in ("fp32", precision)}
            i1 = [where[it] for it in zip(bench.x1, bench.y)]
            i2 = [where[it] for it in zip(bench.x2, bench.y)]
            order = {p: np.sign(u[p][i1] - u[p][i2]) for p in u}
            flips = int((order["fp32"] != order[precision]).sum())
            correct = [two_afc_accuracy(u[p][i1], u[p][i2], bench.g)[1] for p in ("fp32", precision)]
            flips_total, pairs_total = flips_total + flips, pairs_total + len(i1)
            print(f"  {bench.name:<12} {len(i1):>6} pairs  {flips:>4} changed  correct {correct[0]} -> {correct[1]}")
        print(f"  {'all':<12} {pairs_total:>6} pairs  {flips_total:>4} changed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="224x224,384x512", help="image sizes HxW")
    p.add_argument("--pairs", type=int, default=8, help="references per size (two distorted images each)")
    p.add_argument("--grad-size", default="224x224", help="stage-1 gradient batch: image size (empty: skip)")
    p.add_argument("--weights", help="a model (afine.pth or run folder): measure it on the benchmarks instead")
    p.add_argument("--clip", help="with --weights: CLIP checkpoint, if the weights hold no fine-tuned CLIP")
    p.add_argument("--data-root", default="data", help="with --weights: folder of the benchmark datasets")
    p.add_argument("--bench", default="all", help="with --weights: benchmarks, as evaluate.py --bench (default all)")
    p.add_argument("--precisions", default="bf16,fp16", help="with --weights: compared with fp32 (default bf16,fp16)")
    p.add_argument("--batch-size", type=int, default=16, help="with --weights: images per CLIP batch (default 16)")
    args = p.parse_args(argv)
    if args.weights:
        benchmark_drift(args)
        return 0
    device = torch.device(args.device)
    model = random_b32(device)
    g = torch.Generator().manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, random ViT-B/32 A-FINE, "
          f"{args.pairs} references x 2 distorted images per size; bf16 autocast vs float32 (heads float32)")
    print(f"{'size':>9}  {'feat rel max':>12}  {'feat rel mean':>13}  {'|dN| max':>9}  {'dN/std':>7}  "
          f"{'|dF| max':>9}  {'dF/std':>7}  {'|dD| max':>9}  {'dD/std':>7}  {'2AFC flips':>10}")
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        x1, x2, y = images(args.pairs, h, w, g)
        start = time.perf_counter()
        ref, low = scores(model, x1, x2, y, device, "off"), scores(model, x1, x2, y, device, "bf16")
        rel = ((low["feats"] - ref["feats"]).flatten(2).norm(dim=2) / ref["feats"].flatten(2).norm(dim=2))
        row = [f"{size:>9}", f"{rel.max():>12.2e}", f"{rel.mean():>13.2e}"]
        for key in ("n", "f", "d"):
            diff = (low[key] - ref[key]).abs().max()
            row += [f"{diff:>9.2e}", f"{diff / ref[key].std():>7.2e}"]
        b = args.pairs
        flips = ((ref["d"][:b] < ref["d"][b:]) != (low["d"][:b] < low["d"][b:])).float().mean()
        gap = (ref["d"][:b] - ref["d"][b:]).abs().min() / ref["d"].std()
        print("  ".join(row) + f"  {flips:>10.3f}   (closest fp32 pair: |D1-D2| = {gap:.2e} std; "
              f"{time.perf_counter() - start:.0f} s)", flush=True)

    if args.grad_size:
        h, w = (int(v) for v in args.grad_size.split("x"))
        x1, x2, y = images(args.pairs, h, w, g)
        labels = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (3, args.pairs), generator=g)]
        batch = {"x1": x1, "x2": x2, "y": y, "g12": labels[0], "g1y": labels[1], "g2y": labels[2],
                 "keys": [(f"x1_{i}", f"x2_{i}", f"y_{i}") for i in range(args.pairs)]}
        model.requires_grad_(False)
        model.clip.requires_grad_(True)
        model.natural.requires_grad_(True)
        g32, g16 = stage1_gradient(model, batch, device, "off"), stage1_gradient(model, batch, device, "bf16")
        cos = F.cosine_similarity(g32, g16, dim=0)
        print(f"stage-1 gradient, {args.pairs} triplets at {args.grad_size}: cosine(bf16, fp32) = {cos:.6f}, "
              f"||bf16 - fp32|| / ||fp32|| = {(g16 - g32).norm() / g32.norm():.2e}, "
              f"norm ratio bf16/fp32 = {g16.norm() / g32.norm():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
