"""Data pipeline throughput: triplets/s of TripletDataset + GlobalBatches for N DataLoader workers.

    .venv/bin/python bench/data.py --workers 0 2 [--data-root DIR] [--batch-size 8] [--epochs 2]

Without --data-root a small synthetic corpus is written to a temp folder (python -m afine.synth, or
random images in the KADID10K layout if afine.synth is absent). One line per worker count:
triplets, batches, seconds, triplets/s over the whole run (worker start-up included) and after the
first batch (steady state). The epoch planning time (image headers read once) is printed too.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afine.batches import GlobalBatches  # noqa: E402
from afine.datasets import TripletDataset, collate_triplets  # noqa: E402
from afine.errors import AfineError, command  # noqa: E402
from afine.labels import MOSRecord, nlogn_triplets, write_triplets  # noqa: E402


def random_corpus(root: Path, refs: int = 8, per_ref: int = 15, seed: int = 0) -> list[str]:
    """A KADID10K-shaped corpus of random images (two sizes), for when afine.synth is unavailable."""
    rng = np.random.default_rng(seed)
    images = root / "KADID10K" / "images"
    images.mkdir(parents=True)
    records = []
    for r in range(refs):
        h, w = ((96, 128), (128, 96))[r % 2]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"I{r:02d}.png")
        for d in range(per_ref):
            name = f"I{r:02d}_{d:02d}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
            records.append(MOSRecord(name, f"I{r:02d}.png", float(rng.uniform(1, 5))))
    write_triplets(root / "KADID10K" / "Train" / "Triplet" / "Triplet.txt", nlogn_triplets(records, seed))
    return ["KADID10K"]


def make_corpus(root: Path, scale: str) -> list[str]:
    if importlib.util.find_spec("afine.synth") is None:
        return random_corpus(root)
    cmd = [sys.executable, "-m", "afine.synth", "--out", str(root), "--scale", scale]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise AfineError(f"afine.synth failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return ["DiffIQA", "KADID10K", "PIPAL", "TID2013"]


def measure(data: TripletDataset, workers: int, batch_size: int, epochs: int) -> dict:
    """Iterate `epochs` epochs; seconds from iterator creation, and after each epoch's first batch."""
    plan = GlobalBatches(len(data), data.shape, batch_size, seed=0)
    triplets = batches = 0
    total = steady = 0.0
    steady_triplets = 0
    for epoch in range(epochs):
        steps = plan.steps_per_epoch
        loader = torch.utils.data.DataLoader(data, batch_sampler=plan.sampler(epoch * steps, (epoch + 1) * steps),
                                             collate_fn=collate_triplets, num_workers=workers)
        start = time.perf_counter()
        first = None
        for batch in loader:
            n = len(batch["keys"])
            triplets += n
            batches += 1
            if first is None:
                first = time.perf_counter()
            else:
                steady_triplets += n
        end = time.perf_counter()
        total += end - start
        steady += end - (first or end)
    return {"workers": workers, "triplets": triplets, "batches": batches, "seconds": total,
            "rate": triplets / total, "steady_rate": steady_triplets / steady if steady else float("nan")}


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, help="corpus root (default: a fresh synthetic corpus)")
    parser.add_argument("--datasets", nargs="+", help="datasets to load (default: the four training sets)")
    parser.add_argument("--split", default="Train")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per worker count")
    parser.add_argument("--scale", default="small", help="afine.synth --scale for the generated corpus")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="afine-bench-data-") as tmp:
        root = args.data_root
        datasets = args.datasets or ["DiffIQA", "KADID10K", "PIPAL", "TID2013"]
        if root is None:
            root = Path(tmp)
            start = time.perf_counter()
            generated = make_corpus(root, args.scale)
            datasets = args.datasets or generated
            print(f"corpus: generated in {time.perf_counter() - start:.1f} s at {root}")
        data = TripletDataset.from_lists(root, datasets, args.split, augment=True, seed=0)
        plan = GlobalBatches(len(data), data.shape, args.batch_size)
        start = time.perf_counter()
        micro = sum(len(plan.micro_batches(s)) for s in range(plan.steps_per_epoch))
        cold = time.perf_counter() - start
        start = time.perf_counter()
        sum(len(plan.micro_batches(s)) for s in range(plan.steps_per_epoch, 2 * plan.steps_per_epoch))
        warm = time.perf_counter() - start
        shapes = len({data.shape(i) for i in range(len(data))})
        print(f"data: {len(data)} triplets from {', '.join(datasets)} ({args.split}), {shapes} shapes, "
              f"{plan.steps_per_epoch} steps of {args.batch_size} triplets, {micro} same-shape micro-batches")
        print(f"batches: epoch planned in {cold * 1e3:.1f} ms (headers read), {warm * 1e3:.1f} ms (cached)")
        print(f"{'workers':>7} {'triplets':>8} {'batches':>7} {'seconds':>8} {'triplets/s':>10} {'steady/s':>9}")
        for workers in args.workers:
            r = measure(data, workers, args.batch_size, args.epochs)
            print(f"{r['workers']:>7} {r['triplets']:>8} {r['batches']:>7} {r['seconds']:>8.2f} "
                  f"{r['rate']:>10.1f} {r['steady_rate']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
