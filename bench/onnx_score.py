"""Scoring speed of the ONNX export (`afine export-onnx`) under onnxruntime against PyTorch eager, on the CPU,
and how far its five terms are from PyTorch's.

    python bench/onnx_score.py                            # 224x224 and 384x512, batch 1 and 4: minutes
    python bench/onnx_score.py --sizes 384x512 --batches 4 --repeats 10
    OMP_WAIT_POLICY=PASSIVE python bench/onnx_score.py    # on a machine whose cores other jobs use too

A random full-size ViT-B/32 A-FINE (no download; heads and mappings at their initial values) is exported once
with afine.onnx_export.export (which checks the file against PyTorch before writing it). Per size and batch:
random smooth test images and references (afine.onnx_export.example_images), one warm-up call each, then
--repeats calls of PyTorch (model(dis, ref) under inference_mode, fp32) and of onnxruntime (CPU execution
provider, graph optimisations on, as many intra-op threads as torch uses) in turn, so that a change in the
machine's load hits both; pairs/s from the median call. Then the largest difference of each term between the
two over every cell and --extra-sizes (sizes that are not multiples of 32, portrait and landscape), and, for
scale, PyTorch float32's own difference from PyTorch float64 on the same images.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from afine.model import TERMS  # noqa: E402
from afine.onnx_export import example_images, export  # noqa: E402
from bench.train import random_b32  # noqa: E402


def sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(map(int, s.split("x"))) for s in text.split(",") if s]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="224x224,384x512", help="HxW list for the speed grid")
    parser.add_argument("--batches", default="1,4", help="batch sizes (pairs per call)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cell and runtime (default 5)")
    parser.add_argument("--extra-sizes", default="375x500,500x375,70x50",
                        help="HxW list scored once at batches 1 and 4 for the deviation only")
    parser.add_argument("--keep", help="write the ONNX file here (default: a temporary folder)")
    args = parser.parse_args()
    import onnxruntime

    threads = torch.get_num_threads()
    print(f"cpu, torch {torch.__version__} ({threads} threads), onnxruntime {onnxruntime.__version__}, random "
          f"ViT-B/32 A-FINE, machine load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}", flush=True)
    model = random_b32()  # the export holds the image tower only: the text tower's weights are never used
    folder = Path(args.keep or tempfile.mkdtemp(prefix="afine-bench-onnx-"))
    path = folder / "afine.onnx"
    start = time.perf_counter()
    export(model, path)
    print(f"exported and checked in {time.perf_counter() - start:.0f} s: {path} "
          f"({path.stat().st_size / 2**20:.0f} MiB)", flush=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    start = time.perf_counter()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    print(f"onnxruntime session ready in {time.perf_counter() - start:.1f} s", flush=True)
    double = copy.deepcopy(model).double()
    worst = {"onnxruntime - torch": dict.fromkeys(TERMS, 0.0), "torch fp32 - fp64": dict.fromkeys(TERMS, 0.0)}

    def deviations(dis: torch.Tensor, ref: torch.Tensor) -> None:
        with torch.inference_mode():
            eager, exact = model(dis, ref), double(dis.double(), ref.double())
        got = dict(zip(TERMS, session.run(list(TERMS), {"dis": dis.numpy(), "ref": ref.numpy()})))
        for term in TERMS:
            worst["onnxruntime - torch"][term] = max(worst["onnxruntime - torch"][term],
                                                     (torch.from_numpy(got[term]) - eager[term]).abs().max().item())
            worst["torch fp32 - fp64"][term] = max(worst["torch fp32 - fp64"][term],
                                                   (eager[term].double() - exact[term]).abs().max().item())

    print(f"\npairs/s, median of {args.repeats} calls ({threads} threads each)")
    print(f"{'size':>9} {'batch':>5} {'torch':>8} {'onnxrt':>8} {'ratio':>6}")
    for i, (h, w) in enumerate(sizes(args.sizes)):
        for batch in map(int, args.batches.split(",")):
            dis, ref = example_images(batch, h, w, seed=10 + i)
            feeds = {"dis": dis.numpy(), "ref": ref.numpy()}
            times = {"torch": [], "onnxrt": []}
            with torch.inference_mode():
                model(dis, ref)
                session.run(None, feeds)
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    model(dis, ref)
                    times["torch"].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    session.run(None, feeds)
                    times["onnxrt"].append(time.perf_counter() - start)
            rate = {k: batch / statistics.median(v) for k, v in times.items()}
            print(f"{f'{h}x{w}':>9} {batch:>5} {rate['torch']:>8.2f} {rate['onnxrt']:>8.2f} "
                  f"{rate['onnxrt'] / rate['torch']:>5.2f}x", flush=True)
            deviations(dis, ref)
    for i, (h, w) in enumerate(sizes(args.extra_sizes)):
        for batch in (1, 4):
            deviations(*example_images(batch, h, w, seed=100 + 2 * i + batch))
    print(f"\nlargest difference over {args.sizes} (batches {args.batches}) and {args.extra_sizes} (batches 1, 4)")
    print(f"{'':<20} " + " ".join(f"{t:>15}" for t in TERMS))
    for name, row in worst.items():
        print(f"{name:<20} " + " ".join(f"{row[t]:>15.2e}" for t in TERMS))


if __name__ == "__main__":
    main()
