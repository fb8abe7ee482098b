"""Scoring throughput: the batched path (one shared reference per group of test images) against the
pair-at-a-time path of the official inference script (batch 1, both images encoded for every pair).

    python bench/score.py --pairs 32 --size 384x512 --device cpu
    python bench/score.py --pairs 256 --size 384x512 --device cuda --batch-size 32

Uses a random full-size ViT-B/32 (or --width/--layers) built in-process: no weights needed.
Each path runs in its own process so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afine.clip import CLIP  # noqa: E402
from afine.model import AFINE  # noqa: E402


def build_model(width: int, layers: int, device: torch.device) -> AFINE:
    torch.manual_seed(0)
    clip = CLIP(embed_dim=512, vision_width=width, vision_layers=layers, vision_patch_size=32, grid_size=7,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_layers=12)
    return AFINE(clip).to(device).eval()


def worker(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    h, w = map(int, args.size.split("x"))
    model = build_model(args.width, args.layers, device)
    group = args.refs_every
    gen = torch.Generator().manual_seed(1)
    refs = torch.rand(-(-args.pairs // group), 3, h, w, generator=gen)
    dis = torch.rand(args.pairs, 3, h, w, generator=gen)
    ref_of = torch.arange(args.pairs) // group
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def run_batched(n: int) -> None:
        for start in range(0, n, args.batch_size):
            idx = torch.arange(start, min(start + args.batch_size, n))
            used = ref_of[idx].unique()
            where = torch.searchsorted(used, ref_of[idx])
            model.score(dis[idx].to(device), refs[used].to(device), where)

    def run_single(n: int) -> None:
        for i in range(n):
            model(dis[i:i + 1].to(device), refs[ref_of[i]:ref_of[i] + 1].to(device))

    run = run_batched if args.path == "batched" else run_single
    with torch.inference_mode(), autocast:
        run(min(args.pairs, args.batch_size))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run(args.pairs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        kind = "GPU allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kind = "process RSS"
    return {"path": args.path, "pairs": args.pairs, "seconds": seconds, "pairs_per_s": args.pairs / seconds,
            "peak_mib": peak, "peak_kind": kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32, help="number of (dis, ref) pairs (default 32)")
    parser.add_argument("--size", default="384x512", help="HxW of every image (default 384x512)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per batch on the batched path")
    parser.add_argument("--refs-every", type=int, default=8, help="test images sharing one reference (default 8)")
    parser.add_argument("--amp", choices=["off", "bf16"], default="off")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--path", choices=["batched", "single"], help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.path:  # child process: one path, its figures as JSON on stdout
        print(json.dumps(worker(args)))
        return
    results = {}
    for path in ("batched", "single"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--path", path]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: {path} path failed:\n{proc.stderr}")
        results[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    speedup = results["batched"]["pairs_per_s"] / results["single"]["pairs_per_s"]
    cpu = f"cpu ({torch.get_num_threads()} threads)"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    if args.json:
        print(json.dumps({"device": device, "size": args.size, "amp": args.amp, **results, "speedup": speedup}))
        return
    print(f"device {device}, {args.pairs} pairs of {args.size}, one reference per {args.refs_every} test images, "
          f"ViT width {args.width} x {args.layers} blocks, amp {args.amp}")
    print(f"{'path':<28} {'pairs/s':>10} {'seconds':>9} {'peak MiB':>10}")
    labels = {"batched": f"batched (batch {args.batch_size})", "single": "pair-at-a-time (official)"}
    for path, r in results.items():
        print(f"{labels[path]:<28} {r['pairs_per_s']:>10.2f} {r['seconds']:>9.2f} {r['peak_mib']:>10.0f}"
              f"  ({r['peak_kind']})")
    print(f"speed-up batched / pair-at-a-time: {speedup:.2f}x")


if __name__ == "__main__":
    main()
