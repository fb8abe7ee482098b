"""Training-step throughput of the three stages: mixed-shape, one-shape and the official per-sample step.

    .venv/bin/python bench/train.py                                   # CUDA if present: batch 32, bf16
    .venv/bin/python bench/train.py --device cpu --amp off --batch 8 --steps 1 \
        --mix 192x256,256x192,256x256,160x160 --height 192 --width 256
    .venv/bin/python bench/train.py --device cpu --clip tiny --batch 16 --height 96 --width 96 --mix 96x96,64x96

A random full-size ViT-B/32 CLIP (or the tiny test CLIP) is built in-process: no download. Random triplets
(x1, x2, y all distinct images unless --refs says how many distinct references there are per shape).
Per stage and mode: one warm-up step, then --steps timed steps of forward, backward and AdamW.

- mixed: what train_stageN.py runs now: a global batch of --batch triplets whose shapes follow --mix
  round-robin (triplet i gets shape i mod len(mix)), grouped by shape with afine.batches.shape_groups into
  micro-batches of at most --micro-batch // 3 triplets (0: one per shape); per micro-batch the stage's
  triplet_losses and (losses.sum() / batch).backward(), then one AdamW step.
- grouped: the step before the rewrite: the whole batch one shape (--height x --width), one forward.
- per-sample: what the official trainer runs: a Python loop over the grouped batch's triplets, CLIP + head
  once per image of each triplet (the reference again for every triplet), the losses averaged.

Prints one row per (stage, mode): triplets/s, megapixels/s (3 images per triplet, H x W each: the mixed
batch holds other image areas than the grouped one), seconds per step, peak memory (CUDA: max allocated;
CPU: the process's peak resident set during the steps), the ratios mixed / grouped and mixed / per-sample
per stage, then a JSON line with every figure.
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
from afine.batches import shape_groups  # noqa: E402
from afine.checkpoint import TINY_CLIP  # noqa: E402
from afine.clip import CLIP  # noqa: E402
from afine.losses import rank_loss  # noqa: E402
from afine.model import AFINE  # noqa: E402
from afine.training import freeze  # noqa: E402

B32 = dict(embed_dim=512, vision_width=768, vision_layers=12, vision_patch_size=32, grid_size=7, context_length=77,
           vocab_size=49408, transformer_width=512, transformer_layers=12)
CLIPS = {"b32": B32, "tiny": TINY_CLIP}


def random_b32(device: torch.device | str = "cpu") -> AFINE:
    """A full-size ViT-B/32 A-FINE (text tower included) with random weights from seed 0, in eval mode: the
    benchmarks' model (no download)."""
    torch.manual_seed(0)
    return AFINE(CLIP(**B32)).to(device).eval()
LR = {1: {"clip": 5e-6, "natural": 5e-6}, 2: {"fidelity": 5e-4},
      3: {"natural_scale": 1e-3, "fidelity_scale": 1e-3, "adapter": 1e-3}}


def trained_modules(model: AFINE, stage: int) -> dict:
    return {name: model.clip if name == "clip" else getattr(model, name) for name in LR[stage]}


def random_triplets(shapes: list[tuple[int, int]], refs: int) -> list[dict]:
    """One random triplet per shape; triplet i of a shape shares reference i mod refs of that shape."""
    g = torch.Generator().manual_seed(0)
    references: dict[tuple, torch.Tensor] = {}
    triplets = []
    for i, (h, w) in enumerate(shapes):
        ref = (h, w, shapes[:i].count((h, w)) % refs)
        if ref not in references:
            references[ref] = torch.rand(3, h, w, generator=g)
        labels = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (3,), generator=g)]
        triplets.append({"x1": torch.rand(3, h, w, generator=g), "x2": torch.rand(3, h, w, generator=g),
                         "y": references[ref], "g12": labels[0], "g1y": labels[1], "g2y": labels[2],
                         "keys": (f"x1_{i}", f"x2_{i}", "ref_{}x{}_{}".format(*ref))})
    return triplets


def collate(triplets: list[dict]) -> dict:
    """Same-shape triplets -> one batch as the training DataLoader yields it."""
    batch = {k: torch.stack([t[k] for t in triplets]) for k in ("x1", "x2", "y", "g12", "g1y", "g2y")}
    batch["keys"] = [t["keys"] for t in triplets]
    return batch


def parse_shape(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


# ---------------------------------------------------------------------------------------------- the step kinds


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
            n1, n2, ny = (model.natural(*model.encode(x, precision=amp)) for x in (x1, x2, y))
            losses.append(rank_loss(n1, n2, g12) + rank_loss(n1, ny, g1y) + rank_loss(n2, ny, g2y))
            continue
        with torch.no_grad():
            (a1, f1), (a2, f2), (ay, fy) = (model.encode(x, precision=amp) for x in (x1, x2, y))
        if stage == 2:
            u1, u2 = model.fidelity(a1, f1, ay, fy), model.fidelity(a2, f2, ay, fy)
        else:
            with torch.no_grad():
                n1, n2, ny = model.natural(a1, f1), model.natural(a2, f2), model.natural(ay, fy)
                r1, r2 = model.fidelity(a1, f1, ay, fy), model.fidelity(a2, f2, ay, fy)
            u1, u2 = model.terms(n1, ny, r1)["afine_all"], model.terms(n2, ny, r2)["afine_all"]
        losses.append(rank_loss(u1, u2, g12))
    return torch.cat(losses)


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


def measure(model: AFINE, stage: int, mode: str, batches: list[dict], args, device: torch.device) -> dict:
    """batches: the step's micro-batches (one for grouped and per-sample)."""
    trained = trained_modules(model, stage)
    freeze(model)
    for module in trained.values():
        module.requires_grad_(True).train()
    optimizer = torch.optim.AdamW([{"params": list(m.parameters()), "lr": LR[stage][n]} for n, m in trained.items()],
                                  betas=(0.9, 0.99), weight_decay=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    def step():
        for batch in batches:
            if mode == "per-sample":
                losses = per_sample_losses(model, stage, batch, device, args.amp)
            else:
                losses = batched_losses(model, stage, batch, device, args.amp, args.checkpoint_blocks)
            scaler.scale(losses.sum() / args.batch).backward()
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
    megapixels = sum(3 * b["x1"].shape[-2] * b["x1"].shape[-1] * len(b["keys"]) for b in batches) / 1e6
    return {"stage": stage, "mode": mode, "triplets_per_s": args.batch / seconds,
            "megapixels_per_s": megapixels / seconds, "seconds_per_step": seconds, "micro_batches": len(batches),
            "peak_mib": peak_mib(device)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--amp", default=None, help="bf16 | fp16 | off (default: bf16 on CUDA, off on CPU)")
    p.add_argument("--batch", type=int, default=32, help="triplets per step")
    p.add_argument("--height", type=int, default=384, help="grouped and per-sample: image height")
    p.add_argument("--width", type=int, default=512, help="grouped and per-sample: image width")
    p.add_argument("--mix", default="384x512,512x384,512x512,288x288",
                   help="mixed: image shapes HxW, assigned to the triplets round-robin")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="mixed: at most this many images per forward (micro_batch // 3 triplets; 0: no cap)")
    p.add_argument("--refs", type=int, default=0, help="distinct references per shape (0: one per triplet)")
    p.add_argument("--clip", default="b32", choices=sorted(CLIPS), help="random ViT-B/32 or the tiny test CLIP")
    p.add_argument("--steps", type=int, default=3, help="timed steps per stage and mode (after one warm-up)")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--modes", default="mixed,grouped,per-sample")
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
    grouped = [collate(random_triplets([(args.height, args.width)] * args.batch, refs))]
    mix = [parse_shape(s) for s in args.mix.split(",")]
    shapes = [mix[i % len(mix)] for i in range(args.batch)]
    triplets = random_triplets(shapes, refs)
    cap = max(1, args.micro_batch // 3) if args.micro_batch else 0
    mixed = [collate([triplets[i] for i in group]) for group in shape_groups(list(range(args.batch)),
                                                                             shapes.__getitem__, cap)]
    batches = {"mixed": mixed, "grouped": grouped, "per-sample": grouped}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device {device} ({name}), torch {torch.__version__}, amp {args.amp}, CLIP {args.clip} (random), "
          f"batch {args.batch} triplets ({refs} distinct references per shape), grouped {args.height}x{args.width}, "
          f"mixed {args.mix} round-robin in {len(mixed)} micro-batches (micro_batch {args.micro_batch}), "
          f"{args.steps} timed steps after 1 warm-up{', checkpointed blocks' if args.checkpoint_blocks else ''}")
    print(f"{'stage':>5}  {'mode':<10}  {'triplets/s':>10}  {'MP/s':>8}  {'s/step':>8}  {'peak MiB':>9}")
    results = []
    for stage in (int(s) for s in args.stages.split(",")):
        for mode in args.modes.split(","):
            r = measure(model, stage, mode, batches[mode], args, device)
            results.append(r)
            print(f"{stage:>5}  {mode:<10}  {r['triplets_per_s']:>10.2f}  {r['megapixels_per_s']:>8.3f}  "
                  f"{r['seconds_per_step']:>8.3f}  {r['peak_mib']:>9.0f}", flush=True)
        by_mode = {r["mode"]: r for r in results if r["stage"] == stage}
        for other in ("grouped", "per-sample"):
            if "mixed" in by_mode and other in by_mode:
                m, o = by_mode["mixed"], by_mode[other]
                print(f"{'':>5}  mixed / {other}: triplets/s {m['triplets_per_s'] / o['triplets_per_s']:.2f}x, "
                      f"MP/s {m['megapixels_per_s'] / o['megapixels_per_s']:.2f}x, "
                      f"peak {m['peak_mib'] / o['peak_mib']:.2f}x", flush=True)
    print(json.dumps({"device": str(device), "name": name, "amp": args.amp, "clip": args.clip, "batch": args.batch,
                      "height": args.height, "width": args.width, "mix": args.mix, "micro_batch": args.micro_batch,
                      "refs": refs, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
