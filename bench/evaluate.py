"""Evaluation speed: cached scoring vs the official tester's per-triplet approach vs the one-pass floor.

    .venv/bin/python bench/evaluate.py [--scenes 4] [--refs 1] [--per-ref 125] [--size 96 128] [--width 768]
                                       [--layers 12] [--batch-size 16] [--workers 0] [--repeat 3]

Builds, in a temp folder, an SRIQA-shaped benchmark (scenes x 11 images: original + 10 SR results; every
unordered pair, 55 per scene) and a KADID-shaped one (refs x per-ref distorted images, the "nlogn" triplet
list of afine.labels.nlogn_triplets: 7 partners per image for 126-image groups), random images. The model
is a random A-FINE on a random CLIP image tower (default ViT-B/32: width 768, 12 blocks, patch 32; the
text tower is shrunk, A-FINE never runs it). For each benchmark, stage 3 (D), one run each of:
- cached:  evaluate.py's engine (each distinct image decoded and encoded once, scalars reused per pair);
- triplet: the official tester's approach, every triplet decodes and encodes its three images;
- floor:   decode + CLIP pass over every distinct image once, same batches (no heads, no pairs).
Cached and floor run --repeat times, alternating, and the fastest of each is kept; triplet runs once.
Prints wall times and the ratios triplet / cached (target >= 10) and cached / floor (target <= 1.25),
and checks that both approaches give the same accuracy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afine.benchmarks import load_benchmark  # noqa: E402
from afine.clip import CLIP  # noqa: E402
from afine.evaluation import TermCache, compute_terms, item_scores, loader, plan, triplet_scores  # noqa: E402
from afine.labels import MOSRecord, nlogn_triplets, write_triplets  # noqa: E402
from afine.metrics import two_afc_accuracy  # noqa: E402
from afine.model import AFINE  # noqa: E402


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random image with some structure (upsampled coarse noise plus fine noise), uint8 [h, w, 3]."""
    coarse = rng.uniform(0, 255, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    return np.clip(coarse + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def write_corpus(root: Path, scenes: int, refs: int, per_ref: int, size: tuple[int, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    h, w = size
    sriqa = root / "SRIQA-Bench"
    (sriqa / "MOS").mkdir(parents=True)
    for s in range(scenes):
        names = [f"{s:04d}_Original.png"] + [f"{s:04d}_M{m}x4.png" for m in range(10)]
        for k, name in enumerate(names):
            folder = sriqa / "images" / ("Original" if k == 0 else f"M{k}")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(smooth_image(rng, h, w)).save(folder / name)
        (sriqa / "MOS" / f"{s:04d}.txt").write_text("".join(f"{n},{rng.uniform(0, 100):.2f}\n" for n in names))
    kadid = root / "KADID10K"
    (kadid / "images").mkdir(parents=True)
    records = []
    for r in range(refs):
        ref = f"I{r + 1:02d}.png"
        Image.fromarray(smooth_image(rng, h, w)).save(kadid / "images" / ref)
        for d in range(per_ref):
            name = f"I{r + 1:02d}_{d // 5 + 1:02d}_{d % 5 + 1:02d}.png"
            Image.fromarray(smooth_image(rng, h, w)).save(kadid / "images" / name)
            records.append(MOSRecord(name, ref, float(rng.uniform(1, 5))))
    write_triplets(kadid / "Test" / "Triplet" / "Triplet.txt", nlogn_triplets(records, seed))


def random_model(width: int, layers: int, size: tuple[int, int]) -> AFINE:
    torch.manual_seed(0)
    clip = CLIP(embed_dim=512, vision_width=width, vision_layers=layers, vision_patch_size=32, grid_size=7,
                context_length=8, vocab_size=50, transformer_width=64, transformer_layers=1)
    return AFINE(clip).eval()


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def run_cached(model, bench, batch_size, device, workers):
    cache = TermCache()
    items = bench.items()
    compute_terms(model, items, 3, cache, batch_size=batch_size, device=device, workers=workers, progress=False)
    scores = dict(zip(items, item_scores(model, cache, items, 3)))
    u1 = [scores[it] for it in zip(bench.x1, bench.y)]
    u2 = [scores[it] for it in zip(bench.x2, bench.y)]
    return two_afc_accuracy(u1, u2, bench.g), cache.encoded


@torch.inference_mode()
def run_triplets(model, bench, device):
    u = [triplet_scores(model, a, b, y, 3, device) for a, b, y in zip(bench.x1, bench.x2, bench.y)]
    return two_afc_accuracy([v[0] for v in u], [v[1] for v in u], bench.g)


@torch.inference_mode()
def run_floor(model, bench, batch_size, device, workers):
    images = list(dict.fromkeys(p for it in bench.items() for p in it))
    work = plan(images, [], batch_size)
    for pixels in loader(work.batches, work.shapes, workers, device):
        model.encode(pixels.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=4, help="SRIQA-shaped scenes (11 images, 55 pairs each)")
    parser.add_argument("--refs", type=int, default=1, help="KADID-shaped reference groups")
    parser.add_argument("--per-ref", type=int, default=125, help="distorted images per reference (KADID: 125)")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"), help="image size")
    parser.add_argument("--width", type=int, default=768, help="CLIP image tower width (ViT-B/32: 768)")
    parser.add_argument("--layers", type=int, default=12, help="CLIP image tower blocks (ViT-B/32: 12)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="decoding workers for cached and floor")
    parser.add_argument("--repeat", type=int, default=3, help="runs of cached and floor; the fastest is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = random_model(args.width, args.layers, tuple(args.size)).to(device)
    print(f"device {device}, threads {torch.get_num_threads()}, CLIP width {args.width} x {args.layers} blocks, "
          f"patch 32, images {args.size[0]}x{args.size[1]}, batch {args.batch_size}, workers {args.workers}")
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(Path(tmp), args.scenes, args.refs, args.per_ref, tuple(args.size))
        header = f"{'benchmark':<10} {'triplets':>8} {'images':>6} {'cached s':>9} {'triplet s':>9} {'floor s':>8} " \
                 f"{'triplet/cached':>14} {'cached/floor':>12}  accuracy"
        print(header)
        for name in ("sriqa-all", "kadid10k"):
            bench = load_benchmark(tmp, name)
            run_floor(model, bench, args.batch_size, device, args.workers)  # warm-up (allocator, kernels)
            floor, cached = [], []
            for _ in range(args.repeat):  # alternate, keep the fastest of each: robust to a busy machine
                floor.append(timed(run_floor, model, bench, args.batch_size, device, args.workers))
                cached.append(timed(run_cached, model, bench, args.batch_size, device, args.workers))
            (t_floor, n_images), (t_cached, (acc_cached, encoded)) = min(floor), min(cached)
            t_triplet, acc_triplet = timed(run_triplets, model, bench, device)
            same = "same" if acc_cached == acc_triplet else f"DIFFER {acc_cached} vs {acc_triplet}"
            assert encoded == n_images, (encoded, n_images)
            print(f"{name:<10} {len(bench.x1):>8} {n_images:>6} {t_cached:>9.2f} {t_triplet:>9.2f} {t_floor:>8.2f} "
                  f"{t_triplet / t_cached:>13.1f}x {t_cached / t_floor:>11.2f}x  {acc_cached[0]:.4f} ({same})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
