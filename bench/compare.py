"""Speed of `afine compare` against one `afine score` run per method, over the same folders: the whole commands,
from process start to exit, on a random full-size ViT-B/32 A-FINE (no download).

    python bench/compare.py                          # 4 methods, 50 references of 512x384 (fp32): ~10 min on 2 cores
    python bench/compare.py --images 8 --methods 2   # a quick look
    python bench/compare.py --repeat 2               # two rounds, the commands' order alternating; medians

`afine compare` encodes each reference once with all its outputs (N + 1 CLIP passes per reference for N methods,
against 2N for N score runs) and loads the model once (against N times). The images are the synthetic corpus's
scenes (afine/synth.py): the references, and for each method the reference with its own amount of noise, saved as
PNG under ref/ and m<i>/ with the same file names. Both commands run with --no-progress and their defaults
(batch 8, fp32 unless --precision says otherwise); compare writes no files (its table goes to stdout, as score's).
The weights' SHA-256, which compare states, is computed once beforehand (timed apart) and cached, as it is after
a first run; TORCH_HOME points into the benchmark's folder, so that cache is the benchmark's own.
On a machine whose cores other jobs use too, OMP_WAIT_POLICY=PASSIVE steadies the figures (see bench/score.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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

from afine import provenance, synth  # noqa: E402
from afine.checkpoint import save_afine  # noqa: E402
from bench.train import random_b32  # noqa: E402

SCENES = 4  # distinct scenes (1.6 s each to make); every file is distinct


def make_folders(folder: Path, images: int, methods: int, height: int, width: int) -> None:
    """ref/<i>.png and m<j>/<i>.png: a scene, and the scene with method j's noise."""
    rng = np.random.default_rng(0)
    scenes = [synth.natural_image(rng, height, width) for _ in range(min(images, SCENES))]
    for name in ["ref", *(f"m{j}" for j in range(methods))]:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(images):
        scene = scenes[i % len(scenes)]
        Image.fromarray(synth.to_uint8(scene)).save(folder / "ref" / f"{i:04d}.png")
        for j in range(methods):
            noisy = synth.noise(scene, 0.1 + 0.1 * j + rng.uniform(0, 0.05), rng)
            Image.fromarray(synth.to_uint8(noisy)).save(folder / f"m{j}" / f"{i:04d}.png")


def timed(args: list[str]) -> float:
    """Wall seconds of `python -m afine ARGS`, which must succeed."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "afine", *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: python -m afine {' '.join(args[:1])} failed:\n{proc.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50, help="references, and outputs per method (default 50)")
    parser.add_argument("--methods", type=int, default=4, help="methods (default 4)")
    parser.add_argument("--size", default="384x512", help="HxW of every image (default 384x512)")
    parser.add_argument("--precision", default="fp32", help="fp32 (default), bf16 or fp16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of both commands (default 1); medians shown")
    parser.add_argument("--keep", help="keep the generated files in this folder (default: a temporary one)")
    args = parser.parse_args()
    h, w = map(int, args.size.split("x"))
    folder = Path(args.keep or tempfile.mkdtemp(prefix="afine-bench-compare-"))
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"device {name}, torch {torch.__version__}, random ViT-B/32 A-FINE, {args.methods} methods x "
          f"{args.images} PNG images of {args.size}, {args.precision}, machine load {os.getloadavg()[0]:.1f}",
          flush=True)
    try:
        start = time.perf_counter()
        make_folders(folder, args.images, args.methods, h, w)
        weights = folder / "afine.pth"
        save_afine(weights, random_b32().parts())
        print(f"made the images and {weights.stat().st_size / 2**20:.0f} MiB of weights in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        os.environ["TORCH_HOME"] = str(folder / "torch")  # the digest cache, here and in the commands
        start = time.perf_counter()
        provenance.file_sha256(weights)
        print(f"SHA-256 of the weights (once, then cached): {time.perf_counter() - start:.1f} s", flush=True)
        common = ["--weights", str(weights), "--no-progress", "--device", args.device, "--precision", args.precision]
        methods = [str(folder / f"m{j}") for j in range(args.methods)]
        compare_s, score_s = [], []
        for r in range(args.repeat):  # the order alternates, so that a change in the machine's load favours neither
            for kind in ("compare", "score") if r % 2 == 0 else ("score", "compare"):
                if kind == "compare":
                    compare_s.append(timed(["compare", *common, "--bootstrap", "2000", str(folder / "ref"), *methods]))
                else:
                    score_s.append(sum(timed(["score", *common, m, str(folder / "ref")]) for m in methods))
            print(f"round {r + 1}: afine compare {compare_s[-1]:.1f} s, {args.methods} afine score runs "
                  f"{score_s[-1]:.1f} s, ratio {score_s[-1] / compare_s[-1]:.2f}x (load {os.getloadavg()[0]:.1f})",
                  flush=True)
        c, s = statistics.median(compare_s), statistics.median(score_s)
        passes = (args.methods + 1, 2 * args.methods)
        print(f"\nafine compare: {c:.1f} s; {args.methods} separate afine score runs: {s:.1f} s; compare is "
              f"{s / c:.2f}x as fast ({passes[0]} against {passes[1]} CLIP passes per reference, one model load "
              f"against {args.methods})")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
