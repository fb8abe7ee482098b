"""AFINELoss speed and memory: forward+backward per batch against the scoring forward of the same pairs.

    python bench/loss.py                                  # CPU: 256 and 512 px, batch 2, a few minutes
    python bench/loss.py --device cuda --batch 8 --iters 10
    python bench/loss.py --compile --sizes 224 --iters 3     # AFINELoss(compile=True) against eager, float32

A random full-size ViT-B/32 A-FINE (official shapes, random weights: no download). For each size, each
configuration runs in its own process: the scoring forward (`model(output, reference)` without autograd) in
float32 and bf16, and the loss's forward+backward (afine_all, gradient to the output) in float32 and bf16
autocast, with and without checkpointing of the CLIP blocks. Each process warms up on one 32 px batch (lazy
imports, one-time kernel caches), then times `--iters` batches after one warm-up batch at the size.
Memory is the peak a batch needs above the weights and inputs already held: on CPU, the peak of the bytes
torch's allocator holds during one more batch, above what it held before (the torch profiler's allocation and
free records, summed in time order); on CUDA, max_memory_allocated above the start. (The process's peak RSS
would count the C allocator's retained and fragmented blocks and, being a high-water mark, one-time peaks.)
Times on a shared machine are noisy.
--compile times the loss's forward+backward in float32 eager and compiled (AFINELoss(compile=True)) instead, with
the first batch (the compile) apart and the break-even number of batches; no 32 px warm-up then (it would compile).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afine import AFINELoss  # noqa: E402
from bench.train import random_b32  # noqa: E402

CONFIGS = (("score", "off", False), ("score", "bf16", False), ("loss", "off", False), ("loss", "off", True),
           ("loss", "bf16", False), ("loss", "bf16", True))


def allocator_peak_mib(step) -> float:
    """Peak of the bytes torch's CPU allocator holds during one call of `step`, above what it held before: the
    profiler's per-operator allocation and free records, summed in time order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    held = peak = 0
    for event in events:
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak / 2**20


def worker(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = random_b32(device)
    g = torch.Generator().manual_seed(0)

    def pairs(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        reference = torch.rand(args.batch, 3, size, size, generator=g).to(device)
        output = (reference + 0.1 * torch.randn(reference.shape, generator=g).to(device)).clamp(0, 1)
        return output.requires_grad_(args.kind == "loss"), reference

    if args.kind == "score":
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

        def step(output: torch.Tensor, reference: torch.Tensor) -> None:
            with torch.inference_mode(), autocast:
                model(output, reference)
    else:
        criterion = AFINELoss(model, "afine_all", amp=args.amp, checkpoint_blocks=args.checkpoint,
                              compile=args.compiled)

        def step(output: torch.Tensor, reference: torch.Tensor) -> None:
            criterion(output, reference).backward()
            output.grad = None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if not args.compare_compile:
        step(*pairs(32))  # lazy imports and one-time allocations (kernel caches): not the configuration's memory
    output, reference = pairs(args.size)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated() / 2**20
    start = time.perf_counter()
    step(output, reference)  # warm-up (compiled: the compile)
    sync()
    first = time.perf_counter() - start
    if args.compare_compile:  # best of the timed batches, on a busy machine
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            step(output, reference)
            sync()
            times.append(time.perf_counter() - start)
        return {"seconds": min(times), "first": first}
    start = time.perf_counter()
    for _ in range(args.iters):
        step(output, reference)
    sync()
    seconds = (time.perf_counter() - start) / args.iters
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - allocated
    else:
        peak = allocator_peak_mib(lambda: step(output, reference))
    return {"seconds": seconds, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,512", help="square image sides (default 256,512)")
    parser.add_argument("--batch", type=int, default=2, help="output/reference pairs per batch (default 2)")
    parser.add_argument("--iters", type=int, default=2, help="timed batches per configuration (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per configuration")
    parser.add_argument("--compile", dest="compare_compile", action="store_true",
                        help="compare the float32 loss compiled (AFINELoss(compile=True)) with eager instead")
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["score", "loss"], help=argparse.SUPPRESS)
    parser.add_argument("--amp", choices=["off", "bf16"], default="off", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kind:  # child process: one configuration, its figures as JSON on stdout
        print(json.dumps(worker(args)))
        return
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"cpu ({torch.get_num_threads()} threads)"
    if not args.json:
        print(f"device {device}, torch {torch.__version__}, random ViT-B/32 A-FINE, batch {args.batch} pairs, "
              f"{args.iters} timed batches after 1 warm-up; peak: MiB above weights and inputs")
        print(f"{'size':>5} {'what':<24} {'s/batch':>8} {'x score':>8} {'peak':>6} {'x ckpt':>7}")
    if args.compare_compile:
        compare_compile(args)
        return
    for size in (int(s) for s in args.sizes.split(",")):
        results = {}
        for kind, amp, checkpoint in CONFIGS:
            cmd = [sys.executable, __file__, "--kind", kind, "--amp", amp, "--size", str(size), "--batch",
                   str(args.batch), "--iters", str(args.iters), "--device", args.device, "--threads", str(args.threads)]
            proc = subprocess.run(cmd + (["--checkpoint"] if checkpoint else []), capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"error: {kind} {amp} checkpoint={checkpoint} failed:\n{proc.stderr}")
            r = results[kind, amp, checkpoint] = json.loads(proc.stdout.strip().splitlines()[-1])
            ratio = r["seconds"] / results["score", amp, False]["seconds"]
            saving = results[kind, amp, False]["peak_mib"] / r["peak_mib"] if checkpoint else None
            if args.json:
                print(json.dumps({"device": device, "size": size, "batch": args.batch, "kind": kind, "amp": amp,
                                  "checkpoint": checkpoint, **r, "vs_score": ratio, "ckpt_saving": saving}),
                      flush=True)
                continue
            label = f"{'scoring forward' if kind == 'score' else 'loss fwd+bwd'} {amp}{' ckpt' * checkpoint}"
            saving = f"{saving:.1f}x" if saving else ""
            print(f"{size:>5} {label:<24} {r['seconds']:>8.2f} {ratio:>7.2f}x {r['peak_mib']:>6.0f} {saving:>7}",
                  flush=True)
    if not args.json:
        print("x score: time over the scoring forward of the same pairs in the same precision; x ckpt: peak without "
              "checkpointing over peak with it")


def compare_compile(args: argparse.Namespace) -> None:
    """The float32 loss's forward+backward, eager against compiled, each in its own process (best of --iters)."""
    import os

    print(f"AFINELoss afine_all fwd+bwd, float32, batch {args.batch}, best of {args.iters}; first: the first batch "
          "(compiled: the compile)")
    print(f"{'size':>5} {'eager s':>8} {'compiled s':>10} {'speed-up':>8} {'first s':>8} {'break-even':>10} "
          f"{'load':>5}")
    for size in (int(s) for s in args.sizes.split(",")):
        r = {}
        for compiled in (False, True):
            cmd = [sys.executable, __file__, "--kind", "loss", "--size", str(size), "--batch", str(args.batch),
                   "--iters", str(args.iters), "--device", args.device, "--threads", str(args.threads), "--compile"]
            proc = subprocess.run(cmd + (["--compiled"] if compiled else []), capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"error: loss compiled={compiled} failed:\n{proc.stderr}")
            r[compiled] = json.loads(proc.stdout.strip().splitlines()[-1])
        eager, fast = r[False]["seconds"], r[True]["seconds"]
        even = f"{(r[True]['first'] - fast) / (eager - fast):>10.0f}" if eager > fast else f"{'never':>10}"
        print(f"{size:>5} {eager:>8.2f} {fast:>10.2f} {eager / fast:>7.2f}x {r[True]['first']:>8.1f} {even} "
              f"{os.getloadavg()[0]:>5.1f}", flush=True)
    print("break-even: batches from which the compiled loss, compile included, takes less time")


if __name__ == "__main__":
    main()
