"""CUDA scores against CPU scores for a random full-size ViT-B/32 A-FINE (float32, and bf16 autocast).

    python bench/cuda_check.py [--pairs 4] [--size 384x512]

Prints the largest absolute difference per term with torch's default TF32 flags, with TF32 everywhere,
and under bf16 autocast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afine.model import TERMS  # noqa: E402
from bench.train import random_b32  # noqa: E402
from tests.tiny import random_afine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--size", default="384x512")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device")
    h, w = map(int, args.size.split("x"))
    model = random_afine(random_b32().clip, seed=3)
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(args.pairs, 3, h, w, generator=g)
    dis = (ref + 0.1 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    with torch.inference_mode():
        cpu = model(dis, ref)
        model.cuda()
        print(f"device {torch.cuda.get_device_name()}, {args.pairs} pairs of {args.size}, torch {torch.__version__}")
        defaults = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        for label, flags in (("float32, torch defaults", defaults), ("float32, TF32 matmuls", (True, True))):
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
            gpu = model(dis.cuda(), ref.cuda())
            diffs = "  ".join(f"{t} {(gpu[t].cpu() - cpu[t]).abs().max().item():.2e}" for t in TERMS)
            print(f"{label:<24} max |cuda - cpu|: {diffs}")
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = defaults
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf = model(dis.cuda(), ref.cuda())
        diffs = "  ".join(f"{t} {(bf[t].float().cpu() - cpu[t]).abs().max().item():.2e}" for t in TERMS)
        print(f"{'bf16 autocast':<24} max |cuda - cpu|: {diffs}")


if __name__ == "__main__":
    main()
