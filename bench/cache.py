"""Stages 2 and 3 cached (cache build included) against uncached: wall time, ratio, and the trained weights.

    .venv/bin/python bench/cache.py                                   # defaults below (about 10 minutes, 2 CPU cores)
    .venv/bin/python bench/cache.py --datasets KADID10K,PIPAL,TID2013 --steps 4000 --uncached-steps 4 --device cuda

A synthetic corpus (afine.synth, scale "small") and a stage-1 run folder holding a random full-size ViT-B/32
image tower (its text tower tiny: only the image tower runs) and a random naturalness head are written to a
temporary folder; no download. Then, per stage, train_stageN.py at --batch triplets per step, float32:

- uncached: --uncached-steps steps, CLIP every step (log_every 1: seconds per step from log.jsonl, the
  first step left out as warm-up);
- cached: --uncached-steps steps with `cache: true` on a fresh cache (build included), compared parameter by
  parameter with the uncached run (equal results), then --steps steps on the same cache (timed whole: cache
  build + every step; the build is timed apart from the same run's log).

Uncached figures for --steps (and for 40,000 steps) are extrapolated from the measured seconds per step; cached
ones are measured up to --steps. For the real datasets it prints the extrapolation from the measured seconds
per image encode at 512x384 (the real training size), the images per uncached step, and --real-pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_stage2  # noqa: E402
import train_stage3  # noqa: E402
from afine import config, synth  # noqa: E402
from afine.batches import GlobalBatches  # noqa: E402
from afine.checkpoint import save_network_file  # noqa: E402
from afine.clip import CLIP  # noqa: E402
from afine.datasets import TripletDataset  # noqa: E402
from afine.distributed import Dist, pick_device  # noqa: E402
from afine.naturalness import NaturalnessHead  # noqa: E402

B32_IMAGE_TOWER = dict(embed_dim=512, vision_width=768, vision_layers=12, vision_patch_size=32, grid_size=7,
                       context_length=8, vocab_size=64, transformer_width=64, transformer_layers=1)
PUBLISHED_STEPS = 40000


def stage1_folder(folder: Path) -> Path:
    torch.manual_seed(0)
    clip = CLIP(**B32_IMAGE_TOWER)
    folder.mkdir(parents=True)
    torch.save(clip.state_dict(), folder / "clip_model.pth")
    save_network_file(folder / "net_qhead.pth", NaturalnessHead())
    return folder


def run(stage: int, args, data: Path, out: Path, earlier: Path, steps: int, cache: bool, cache_dir: Path):
    """One training run; returns (wall seconds, seconds per step after the first, trained weights, log)."""
    script, cls = (train_stage2, train_stage2.Stage2Config) if stage == 2 else (train_stage3, train_stage3.Stage3Config)
    argv = [f"--data_root={data}", f"--out_dir={out}", f"--device={args.device}", f"--workers={args.workers}",
            f"--batch_size={args.batch}", f"--total_iter={steps}", "--val_every=0", f"--save_every={steps}",
            "--log_every=1", f"--train_datasets={args.datasets}", f"--val_datasets={args.datasets}",
            f"--cache={str(cache).lower()}", f"--cache_dir={cache_dir}",
            "--stage1_dir" if stage == 2 else "--stage2_dir", str(earlier)]
    cfg = config.parse_args(cls, argv)
    tick = time.perf_counter()
    model = script.train(cfg, Dist(device=pick_device(args.device)))
    wall = time.perf_counter() - tick
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in log if "steps_per_s" in r]
    per_step = statistics.median(1 / r for r in rates[1:]) if len(rates) > 1 else 1 / rates[0]
    names = ("fidelity.",) if stage == 2 else ("natural_scale.", "fidelity_scale.", "adapter.")
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(names)}
    return wall, per_step, weights, log


def encode_seconds(device: torch.device, height: int = 512, width: int = 384, batch: int = 4) -> float:
    """Seconds per image of a float32 B/32 forward pass at the real training size."""
    torch.manual_seed(0)
    clip = CLIP(**B32_IMAGE_TOWER).to(device).eval()
    x = torch.rand(batch, 3, height, width, device=device)
    with torch.no_grad():
        clip.visual(x)
        tick = time.perf_counter()
        for _ in range(2):
            clip.visual(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - tick) / (2 * batch)


def images_per_step(data_root: Path, datasets: list[str], batch: int, steps: int = 20) -> float:
    """Distinct images per uncached step (what CLIP encodes), averaged over the first steps."""
    data = TripletDataset.from_lists(data_root, datasets, "Train", seed=0)
    plan = GlobalBatches(len(data), data.shape, batch, seed=0)
    counts = []
    for step in range(steps):
        keys = plan.keys(step)
        counts.append(len({(data.items[i][j], tuple(data.flags((epoch, i)))) for epoch, i in keys for j in range(3)}))
    return statistics.mean(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="PIPAL")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2000, help="cached steps (measured)")
    parser.add_argument("--uncached-steps", type=int, default=3, help="uncached steps (measured, then extrapolated)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--real-pairs", type=int, default=25000, help="training pairs of the real stage-2 datasets")
    parser.add_argument("--real-refs", type=int, default=250, help="references of the real stage-2 training lists")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--keep", default="", help="work in this folder instead of a temporary one")
    args = parser.parse_args()
    device = pick_device(args.device)
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="afine-bench-cache-"))
    data = folder / "data"
    if not data.is_dir():
        synth.generate(data, seed=0, scale="small", progress=False)
    s1 = folder / "s1" if (folder / "s1").is_dir() else stage1_folder(folder / "s1")
    datasets = args.datasets.split(",")
    print(f"device {device} ({torch.get_num_threads()} threads, {os.cpu_count()} CPUs), "
          f"torch {torch.__version__}, datasets {args.datasets} (synthetic, small), batch {args.batch}, "
          f"random ViT-B/32 image tower; work folder {folder}", flush=True)
    figures = {}
    earlier = {2: s1, 3: folder / "s2-uncached"}
    for stage in map(int, args.stages.split(",")):
        tag = f"s{stage}"
        u_wall, u_step, u_weights, _ = run(stage, args, data, folder / f"{tag}-uncached", earlier[stage],
                                           args.uncached_steps, False, folder / f"{tag}-cache")
        c_wall_short, _, c_weights, c_log = run(stage, args, data, folder / f"{tag}-cached-short", earlier[stage],
                                                args.uncached_steps, True, folder / f"{tag}-cache")
        diff = max((c_weights[k] - u_weights[k]).abs().max().item() for k in u_weights)
        start = next(r["time"] for r in c_log if r.get("event") == "fresh")
        first = next(r["time"] for r in c_log if "steps_per_s" in r)
        build = first - start  # cache build, then the first step
        c_wall, c_step, _, _ = run(stage, args, data, folder / f"{tag}-cached", earlier[stage], args.steps, True,
                                   folder / f"{tag}-cache")  # the cache is there: steps only
        startup = max(0.0, u_wall - args.uncached_steps * u_step)
        cached_total = build + c_wall
        uncached_total = startup + args.steps * u_step
        fig = {"uncached_s_per_step": u_step, "uncached_wall_s": u_wall, "uncached_steps": args.uncached_steps,
               "cache_build_s": build, "cached_s_per_step": c_step, "cached_wall_s_incl_build": cached_total,
               "steps": args.steps, "uncached_extrapolated_s": uncached_total,
               "ratio": uncached_total / cached_total, "max_param_diff_after_uncached_steps": diff,
               "ratio_40k": (startup + PUBLISHED_STEPS * u_step) / (build + PUBLISHED_STEPS * c_step)}
        figures[tag] = fig
        print(f"stage {stage}: uncached {u_step:.3f} s/step (measured over {args.uncached_steps} steps, "
              f"{u_wall:.1f} s wall); cached: build {build:.1f} s + {c_step * 1e3:.2f} ms/step, {args.steps} steps "
              f"{cached_total:.1f} s in all (measured); uncached {args.steps} steps {uncached_total:.0f} s "
              f"(extrapolated): {fig['ratio']:.1f}x; at {PUBLISHED_STEPS} steps {fig['ratio_40k']:.0f}x; "
              f"max |cached - uncached| after {args.uncached_steps} steps {diff:.2e}", flush=True)
    per_image = encode_seconds(device)
    k = images_per_step(data, datasets, args.batch)
    # real sizes: x1 and x2 of each triplet are (nearly always) distinct images; the references repeat, as
    # (reference, augmentation) draws among real_refs x 8
    draws = args.real_refs * 8
    k_real = 2 * args.batch + draws * (1 - (1 - 1 / draws) ** args.batch)
    real_uncached = PUBLISHED_STEPS * k_real * per_image
    real_build = args.real_pairs * 8 * per_image
    step2 = figures.get("s2", {}).get("cached_s_per_step", 0.0)
    real_cached = real_build + PUBLISHED_STEPS * step2
    figures["real"] = {"s_per_image_512x384": per_image, "images_per_uncached_step_here": k,
                       "images_per_uncached_step_real": k_real, "stage2_uncached_h": real_uncached / 3600,
                       "stage2_cached_h": real_cached / 3600, "stage2_ratio": real_uncached / real_cached}
    print(f"real sizes (extrapolated): a B/32 forward pass at 512x384 takes {per_image:.3f} s per image here; an "
          f"uncached step at batch {args.batch} encodes about {k_real:.0f} distinct images (2 per triplet + the "
          f"references among {args.real_refs} x 8 augmentations; {k:.0f} on this small corpus), so stage 2 "
          f"uncached, {PUBLISHED_STEPS} steps: {real_uncached / 3600:.0f} h; cached: {args.real_pairs} pairs x 8 "
          f"augmentations {real_build / 3600:.0f} h build + {PUBLISHED_STEPS * step2 / 3600:.2f} h of steps = "
          f"{real_cached / 3600:.0f} h ({real_uncached / real_cached:.0f}x). Stage 3: the same per image, its "
          "distinct images (DiffIQA's added) set the build", flush=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
