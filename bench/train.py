"""Training-step throughput of the three stages: our batched step next to the official per-sample loop.

    .venv/bin/python bench/train.py                                   # CUDA if present: batch 32, 384x512, bf16
    .venv/bin/python bench/train.py --device cpu --amp off --batch 16 --height 224 --width 224 --steps 1
    .venv/bin/python bench/train.py --device cpu --clip tiny --batch 16 --height 96 --width 96

A random full-size ViT-B/32 CLIP (or the tiny test CLIP) is built in-process: no download. One random
triplet batch (x1, x2, y all distinct images unless --refs says how many distinct references it holds).
Per stage and mode: one warm-up step, then --steps timed steps of forward, backward and AdamW.

- batched: what train_stageN.py runs: each distinct image of the batch through CLIP once, heads batched.
- per-sample: what the official trainer runs: a Python loop over the triplets, CLIP + head once per image
  of each triplet (the reference again for every triplet), the losses then averaged over the batch.

Prints one row per (stage, mode): triplets/s, seconds per step, peak memory (CUDA: max allocated;
CPU: the process's peak resident set during the steps), then a JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_stage1  # noqa: E402
import train_stage2  # noqa: E402
import train_stage3  # noqa: E402
from afine.checkpoint import TINY_CLIP  # noqa: E402
from afine.clip import CLIP  # noqa: E402
from afine.losses import rank_loss  # noqa: E402
from afine.model import AFINE  # noqa: E402
from afine.training import autocast, freeze  # noqa: E402

B32 = dict(embed_dim=512, vision_width=768, vision_layers=12, vision_patch_size=32, grid_size=7, context_length=77,
           vocab_size=49408, transformer_width=512, transformer_layers=12)
CLIPS = {"b32": B32, "tiny": TINY_CLIP}
LR = {1: {"clip": 5e-6, "natural": 5e-6}, 2: {"fidelity": 5e-4},
      3: {"natural_scale": 1e-3, "fidelity_scale": 1e-3, "adapter": 1e-3}}


def trained_modules(model: AFINE, stage: int) -> dict:
    return {name: model.clip if name == "clip" else getattr(model, name) for name in LR[stage]}


def random_batch(batch: int, height: int, width: int, refs: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.rand(batch, 3, height, width, generator=g), torch.rand(batch, 3, height, width, generator=g)
    ref_of = torch.arange(batch) % refs
    y = torch.rand(refs, 3, height, width, generator=g)[ref_of]
    labels = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (3, batch), generator=g)]
    keys = [(f"x1_{i}", f"x2_{i}", f"ref_{int(r)}") for i, r in enumerate(ref_of)]
    return {"x1": x1, "x2": x2, "y": y, "g12": labels[0], "g1y": labels[1], "g2y": labels[2], "keys": keys}


# ---------------------------------------------------------------------------------------------- the two step kinds


def batched_losses(model: AFINE, stage: int, batch: dict, device: torch.device, amp: str, checkpoint: bool):
    if stage == 1:
        return train_stage1.triplet_losses(model, batch, device, amp, checkpoint)
    if stage == 2:
        return train_stage2.triplet_losses(model, batch, device, amp)
    return train_stage3.triplet_losses(model, batch, device, amp)


def per_sample_losses(model: AFINE, stage: int, batch: dict, device: torch.device, amp: str):
    """The official trainer's loop: every image of every triplet through CLIP and the head(s) on its own."""
    losses = []
    for i in range(len(batch["keys"])):
        x1, x2, y = (batch[k][i:i + 1].to(device) for k in ("x1", "x2", "y"))
        g12, g1y, g2y = (batch[k][i:i + 1].to(device) for k in ("g12", "g1y", "g2y"))
        if stage == 1:
            n1, n2, ny = (model.natural(*encode(model, x, device, amp)) for x in (x1, x2, y))
            losses.append(rank_loss(n1, n2, g12) + rank_loss(n1, ny, g1y) + rank_loss(n2, ny, g2y))
            continue
        with torch.no_grad():
            (a1, f1), (a2, f2), (ay, fy) = (encode(model, x, device, amp) for x in (x1, x2, y))
        if stage == 2:
            u1, u2 = model.fidelity(a1, f1, ay, fy), model.fidelity(a2, f2, ay, fy)
        else:
            with torch.no_grad():
                n1, n2, ny = model.natural(a1, f1), model.natural(a2, f2), model.natural(ay, fy)
                r1, r2 = model.fidelity(a1, f1, ay, fy), model.fidelity(a2, f2, ay, fy)
            u1, u2 = model.terms(n1, ny, r1)["afine_all"], model.terms(n2, ny, r2)["afine_all"]
        losses.append(rank_loss(u1, u2, g12))
    return torch.cat(losses)


def encode(model: AFINE, x: torch.Tensor, device: torch.device, amp: str):
    with autocast(device, amp):
        a, f = model.encode(x)
    return a.float(), f.float()


# ---------------------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def measure(model: AFINE, stage: int, mode: str, batch: dict, args, device: torch.device) -> dict:
    trained = trained_modules(model, stage)
    freeze(model, trained)
    optimizer = torch.optim.AdamW([{"params": list(m.parameters()), "lr": LR[stage][n]} for n, m in trained.items()],
                                  betas=(0.9, 0.99), weight_decay=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    def step():
        if mode == "batched":
            losses = batched_losses(model, stage, batch, device, args.amp, args.checkpoint_blocks)
        else:
            losses = per_sample_losses(model, stage, batch, device, args.amp)
        scaler.scale(losses.mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocator, kernels, lazy init)
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    return {"stage": stage, "mode": mode, "triplets_per_s": args.batch / seconds, "seconds_per_step": seconds,
            "peak_mib": peak_mib(device)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--amp", default=None, help="bf16 | fp16 | off (default: bf16 on CUDA, off on CPU)")
    p.add_argument("--batch", type=int, default=32, help="triplets per step")
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--refs", type=int, default=0, help="distinct references in the batch (0: one per triplet)")
    p.add_argument("--clip", default="b32", choices=sorted(CLIPS), help="random ViT-B/32 or the tiny test CLIP")
    p.add_argument("--steps", type=int, default=3, help="timed steps per stage and mode (after one warm-up)")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--modes", default="batched,per-sample")
    p.add_argument("--checkpoint-blocks", action="store_true", help="stage 1: activation checkpointing of CLIP")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    if args.threads:
        torch.set_num_threads(args.threads)
    refs = args.refs or args.batch

    torch.manual_seed(0)
    model = AFINE(CLIP(**CLIPS[args.clip])).to(device)
    batch = random_batch(args.batch, args.height, args.width, refs, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device {device} ({name}), torch {torch.__version__}, amp {args.amp}, CLIP {args.clip} (random), "
          f"batch {args.batch} triplets ({refs} distinct references), {args.height}x{args.width}, "
          f"{args.steps} timed steps after 1 warm-up{', checkpointed blocks' if args.checkpoint_blocks else ''}")
    print(f"{'stage':>5}  {'mode':<10}  {'triplets/s':>10}  {'s/step':>8}  {'peak MiB':>9}")
    results = []
    for stage in (int(s) for s in args.stages.split(",")):
        for mode in args.modes.split(","):
            r = measure(model, stage, mode, batch, args, device)
            results.append(r)
            print(f"{stage:>5}  {mode:<10}  {r['triplets_per_s']:>10.2f}  {r['seconds_per_step']:>8.3f}  "
                  f"{r['peak_mib']:>9.0f}", flush=True)
        pair = {r["mode"]: r["triplets_per_s"] for r in results if r["stage"] == stage}
        if "batched" in pair and "per-sample" in pair:
            print(f"{'':>5}  batched / per-sample: {pair['batched'] / pair['per-sample']:.2f}x", flush=True)
    print(json.dumps({"device": str(device), "name": name, "amp": args.amp, "clip": args.clip, "batch": args.batch,
                      "height": args.height, "width": args.width, "refs": refs, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
