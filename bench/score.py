"""Scoring speed of `python -m afine score`: pairs per second for a folder of generated 512x384 pairs at each
precision, batch size and number of decoding workers; decoding alone, threads against DataLoader processes;
the time to first score; optionally the whole command on N pairs, fp32 against bf16.

    python bench/score.py                               # the grid: about 3 minutes on a quiet 2-core CPU
    python bench/score.py --pairs 8 --batch-sizes 8 --precisions bf16 --workers 2 --decode-workers ""   # 30 s
    python bench/score.py --end-to-end 200              # also the whole command on 200 pairs, 4 minutes more
    OMP_WAIT_POLICY=PASSIVE python bench/score.py       # on a machine whose cores other jobs use too (below)
    python bench/score.py --device cuda --pairs 256 --batch-sizes 1,8,32,64 --workers 0,2,4,8
    python bench/score.py --compile 224x224,384x512 --batch-sizes 1,8 --repeats 5   # compiled against eager only

--compile SIZES compares `--compile` (afine/compiled.py) with eager instead of the grid: per image size, precision
and batch, the first compiled batch (compile included), the best of --repeats batches compiled and eager, and
the break-even job size: the pairs from which compile time plus compiled batches cost less than eager ones
(docs/scoring.md, "Compiled kernels"). Each batch is B test images against B references (2B images through CLIP),
random pixels, timed in this process on AFINE.score (CLIP and heads; no decoding, which the option leaves as it
is). With --end-to-end N, the whole command on N pairs is also timed with and without --compile (fp32, batch 8).

A random full-size ViT-B/32 A-FINE (no download), saved as a merged afine.pth with the text tower, the size of
the released file. Test images are the synthetic corpus's scenes (afine/synth.py) with added noise, saved as
PNG (and as JPEG for the decoding comparison), each pair with a reference of its own, as when a folder of
results is scored against a folder of ground truths. Each grid cell scores max(--pairs, batch size) pairs with
afine.score.score_pairs (header checks, decoding, CLIP, heads) after one warm-up batch; the model is loaded once.
Time to first score: `python -m afine score` on one pair, from process start to its score on stdout.

On a machine whose cores other jobs use too, OpenMP's threads spin while they wait for each other and CLIP can
run ten times slower. Once a decoding thread has run torch operations, OpenMP has more threads than cores and
spins less, so the workers-0 column looks several times slower than the others. OMP_WAIT_POLICY=PASSIVE
avoids both effects.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from afine import synth  # noqa: E402
from afine.checkpoint import save_afine  # noqa: E402
from afine.model import load_afine  # noqa: E402
from afine.score import check_pairs, decoded_batches, load_batch, plan_batches, score_pairs  # noqa: E402
from bench.train import random_b32  # noqa: E402

SCENES = 4  # distinct scenes (1.6 s each to make); the pairs' files are all distinct


def make_pairs(folder: Path, n: int, height: int, width: int, suffix: str) -> list[tuple[Path, Path]]:
    """n pairs dis/i.suffix, ref/i.suffix: a noisy copy of one of SCENES scenes and the scene itself."""
    rng = np.random.default_rng(0)
    scenes = [synth.natural_image(rng, height, width) for _ in range(min(n, SCENES))]
    pairs = []
    for kind in ("dis", "ref"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ref = synth.to_uint8(scenes[i % len(scenes)])
        dis = synth.to_uint8(synth.noise(scenes[i % len(scenes)], rng.uniform(0.1, 0.5), rng))
        pair = (folder / "dis" / f"{i:04d}{suffix}", folder / "ref" / f"{i:04d}{suffix}")
        for path, array in zip(pair, (dis, ref)):
            Image.fromarray(array).save(path, **({"quality": 90} if suffix == ".jpg" else {}))
        pairs.append(pair)
    return pairs


class Batches(torch.utils.data.Dataset):
    """Batch i decoded by load_batch: the DataLoader-process alternative to the score command's threads."""

    def __init__(self, pairs, sizes, batches, pin: bool):
        self.pairs, self.sizes, self.batches, self.pin = pairs, sizes, batches, pin

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return load_batch(self.pairs, self.sizes, self.batches[i], self.pin)


def decode_rate(pairs, batch_size: int, workers: int, kind: str, pin: bool) -> tuple[float, float]:
    """Decoding alone (nothing done with the batches) by `workers` threads or DataLoader processes: pairs per
    second after the first batch, and the seconds to the first batch (starting the workers included)."""
    sizes = check_pairs(pairs)
    batches = plan_batches(pairs, sizes, batch_size)
    if kind == "threads":
        decoded = decoded_batches(pairs, sizes, batches, workers, pin)
    else:
        decoded = torch.utils.data.DataLoader(Batches(pairs, sizes, batches, False), batch_size=None,
                                              num_workers=workers, pin_memory=pin)
    start = time.perf_counter()
    for i, _ in enumerate(decoded):
        if i == 0:
            first = time.perf_counter()
    return (len(pairs) - len(batches[0])) / (time.perf_counter() - first), first - start


def time_to_first_score(weights: Path, pair: tuple[Path, Path], device: str, precision: str) -> tuple[float, str]:
    """Seconds from starting `python -m afine score DIS REF` to its score row on stdout, and the row."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "afine", "score", "--weights", str(weights), "--no-progress",
                             "--device", device, "--precision", precision, *map(str, pair)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()  # the header is printed with the row, when the score is known
    row = proc.stdout.readline()
    seconds = time.perf_counter() - start
    _, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"error: python -m afine score failed:\n{err}")
    return seconds, row


def end_to_end(weights: Path, folder: Path, device: str, precision: str, batch_size: int,
               extra: tuple[str, ...] = ()) -> float:
    """Wall seconds of `python -m afine score DIS_DIR REF_DIR` (start, model load, every pair, output)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "afine", "score", "--weights", str(weights), "--no-progress",
                           "--device", device, "--precision", precision, "--batch-size", str(batch_size), *extra,
                           str(folder / "dis"), str(folder / "ref")], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: python -m afine score failed:\n{proc.stderr}")
    return time.perf_counter() - start


def best_of(repeats: int, fn) -> float:
    """The shortest of `repeats` timed calls (a busy machine only ever slows a run down)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def compile_comparison(weights: Path, sizes: list[tuple[int, int]], precisions: list[str], batch_sizes: list[int],
                       repeats: int, device: torch.device) -> None:
    """Compiled against eager, per batch, and the break-even number of pairs including compile time."""
    from afine.compiled import compile_model

    print(f"\ncompiled against eager: AFINE.score on B pairs (2B images), best of {repeats}, alternated; "
          "first = the first "
          "compiled batch, compile included; break-even = pairs from which --compile saves time")
    print(f"{'size':>9} {'precision':<9} {'batch':>5} {'eager s':>8} {'compiled s':>10} {'speed-up':>8} "
          f"{'first s':>8} {'break-even':>10} {'load':>5}")
    eager = load_afine(None, weights).to(device)
    for h, w in sizes:
        for precision in precisions:
            for b in batch_sizes:
                g = torch.Generator().manual_seed(0)
                dis, ref = (torch.rand(b, 3, h, w, generator=g).to(device) for _ in range(2))
                fast = compile_model(load_afine(None, weights).to(device))  # a fresh model: its own compile
                t_eager, t_fast, first, diff = time_compiled(eager, fast, dis, ref, precision, repeats)
                saving = (t_eager - t_fast) / b  # seconds per pair
                even = f"{(first - t_fast) / saving:>10.0f}" if saving > 0 else f"{'never':>10}"
                print(f"{f'{h}x{w}':>9} {precision:<9} {b:>5} {t_eager:>8.3f} {t_fast:>10.3f} "
                      f"{t_eager / t_fast:>7.2f}x {first:>8.1f} {even} {os.getloadavg()[0]:>5.1f}  "
                      f"(max |diff| afine_all_scale {diff:.1e})", flush=True)
                torch._dynamo.reset()


@torch.inference_mode()
def time_compiled(eager, fast, dis, ref, precision: str, repeats: int) -> tuple[float, float, float, float]:
    """Seconds per batch eager and compiled (best of `repeats`), of the first compiled batch, and the largest
    difference of afine_all_scale between the two."""
    index = torch.arange(dis.shape[0])

    def run(model):
        terms = model.score(dis, ref, index, precision)
        if dis.device.type == "cuda":
            torch.cuda.synchronize()
        return terms["afine_all_scale"]

    run(eager)  # warm-up
    first = best_of(1, lambda: run(fast))
    # alternated, so that both meet the same load on a shared machine; the best of each
    t_eager, t_fast = (min(t) for t in zip(*[(best_of(1, lambda: run(eager)), best_of(1, lambda: run(fast)))
                                               for _ in range(repeats)]))
    return t_eager, t_fast, first, (run(fast) - run(eager)).abs().max().item()


def numbers(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16, help="pairs per grid cell, at least one batch (default 16)")
    parser.add_argument("--size", default="384x512", help="HxW of every image (default 384x512)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list (default fp32,bf16)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma list (default 1,8,32; empty: no grid)")
    parser.add_argument("--workers", default="0,2", help="decoding threads, comma list (default 0,2)")
    parser.add_argument("--decode-workers", default="1,2,4",
                        help="threads / DataLoader processes for the decoding comparison (default 1,2,4; empty: skip)")
    parser.add_argument("--decode-pairs", type=int, default=64, help="pairs for the decoding comparison (default 64)")
    parser.add_argument("--end-to-end", type=int, default=0, metavar="N",
                        help="also time the whole command on N pairs at each precision (batch 8; default 0: skip)")
    parser.add_argument("--compile", metavar="SIZES", default="",
                        help="compare --compile with eager at these HxW sizes (comma list) instead of the grid")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many batches (--compile; default 3)")
    parser.add_argument("--keep", help="keep the generated files in this folder (default: a temporary one)")
    args = parser.parse_args()
    h, w = map(int, args.size.split("x"))
    device = torch.device(args.device)
    precisions = args.precisions.split(",")
    batch_sizes, workers = numbers(args.batch_sizes), numbers(args.workers)
    cell = max([args.pairs, *batch_sizes])
    folder = Path(args.keep or tempfile.mkdtemp(prefix="afine-bench-score-"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, torch {torch.__version__}, random ViT-B/32 A-FINE, {args.size} PNG pairs "
          f"(a reference each), machine load {os.getloadavg()[0]:.1f}", flush=True)
    if args.compile:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            weights = folder / "afine.pth"
            save_afine(weights, random_b32().parts())
            sizes = [tuple(map(int, size.split("x"))) for size in args.compile.split(",")]
            compile_comparison(weights, sizes, precisions, batch_sizes, args.repeats, device)
            if args.end_to_end:
                pairs = make_pairs(folder / "png", args.end_to_end, h, w, ".png")
                print(f"\nthe whole command on {args.end_to_end} {args.size} pairs (python -m afine score DIS_DIR "
                      "REF_DIR, fp32, batch 8, default workers)")
                for extra in ((), ("--compile",)):
                    s = end_to_end(weights, folder / "png", args.device, "fp32", 8, extra)
                    print(f"{' '.join(extra) or 'eager':<9} {s:>8.1f} s  {len(pairs) / s:>7.3f} pairs/s  load "
                          f"{os.getloadavg()[0]:.1f}", flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        return
    try:
        start = time.perf_counter()
        pairs = make_pairs(folder / "png", max(cell, args.end_to_end, args.decode_pairs, 1), h, w, ".png")
        weights = folder / "afine.pth"
        save_afine(weights, random_b32().parts())
        print(f"made {len(pairs)} pairs and {weights.stat().st_size / 2**20:.0f} MiB of weights in "
              f"{time.perf_counter() - start:.0f} s", flush=True)

        for precision in precisions:
            seconds, _ = time_to_first_score(weights, pairs[0], args.device, precision)
            print(f"time to first score, {precision}: {seconds:.2f} s (python -m afine score DIS REF, one pair)")
        start = time.perf_counter()
        model = load_afine(weights).to(device)
        print(f"model load in this process (load_afine, to {device}): {time.perf_counter() - start:.2f} s",
              flush=True)

        if args.decode_workers:
            n_decode = args.decode_pairs
            files = {"PNG": pairs[:n_decode],
                     "JPEG": make_pairs(folder / "jpg", n_decode, h, w, ".jpg")}
            print(f"\ndecoding alone: pairs/s after the first batch (seconds to the first batch), batch 8, "
                  f"{n_decode} pairs; workers 0: the main thread")
            print(f"{'format':<6} {'workers':>7} {'threads':>16} {'processes':>16}")
            pin = device.type == "cuda"
            for label, chosen in files.items():
                rate, first = decode_rate(chosen, 8, 0, "threads", pin)
                print(f"{label:<6} {0:>7} {rate:>8.1f} ({first:.2f} s)", flush=True)
                for n in numbers(args.decode_workers):
                    cells = [decode_rate(chosen, 8, n, kind, pin) for kind in ("threads", "processes")]
                    print(f"{label:<6} {n:>7} " + " ".join(f"{r:>8.1f} ({f:.2f} s)" for r, f in cells), flush=True)

        if batch_sizes and workers:
            print(f"\nscoring, pairs/s (score_pairs: headers, decoding, CLIP, heads; max({args.pairs}, batch) pairs "
                  "each)")
            print(f"{'precision':<9} {'batch':>5} " + " ".join(f"{f'workers {n}':>10}" for n in workers))
        rates: dict[str, list[float]] = {}
        for precision in precisions if batch_sizes and workers else []:
            score_pairs(model, pairs[:1], 1, device, progress=False, precision=precision, workers=0)  # warm-up
            for batch in batch_sizes:
                row = []
                for n in workers:
                    chosen = pairs[:max(args.pairs, batch)]
                    start = time.perf_counter()
                    score_pairs(model, chosen, batch, device, progress=False, precision=precision, workers=n)
                    row.append(len(chosen) / (time.perf_counter() - start))
                rates.setdefault(precision, []).extend(row)
                print(f"{precision:<9} {batch:>5} " + " ".join(f"{r:>10.3f}" for r in row), flush=True)
        if "fp32" in rates:
            for precision in [p for p in rates if p != "fp32"]:
                ratio = [a / b for a, b in zip(rates[precision], rates["fp32"])]
                print(f"{precision} / fp32: {min(ratio):.2f}x to {max(ratio):.2f}x")

        if args.end_to_end:
            e2e = folder / "e2e"
            for kind in ("dis", "ref"):
                (e2e / kind).mkdir(parents=True, exist_ok=True)
                for dis, ref in pairs[:args.end_to_end]:
                    os.link(dis if kind == "dis" else ref, e2e / kind / dis.name)
            print(f"\nthe whole command on {args.end_to_end} pairs (python -m afine score DIS_DIR REF_DIR, batch 8, "
                  f"default workers)")
            seconds = {p: end_to_end(weights, e2e, args.device, p, 8) for p in precisions}
            for precision, s in seconds.items():
                print(f"{precision:<5} {s:>8.1f} s  {args.end_to_end / s:>7.3f} pairs/s"
                      + (f"  {seconds['fp32'] / s:.2f}x fp32" if "fp32" in seconds and precision != "fp32" else ""),
                      flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
