"""AFINELoss's stable gradient against the exact one: their cosine, per pair, on natural-looking images.

    python bench/loss_gradient.py                         # CPU: 256 px, 3 scenes x 4 distortions, minutes
    python bench/loss_gradient.py --device cuda --scenes 8 --size 512

A random full-size ViT-B/32 A-FINE (official shapes, random weights: no download). References are procedural
natural scenes (afine.synth.natural_image, the synthetic corpus's), outputs the reference blurred, with noise,
JPEG-compressed, or all three (afine.synth's distortions at middle strength), clipped to [0, 1]; `--inputs
uniform` adds bench/loss.py's uniform-noise pairs. For each term, the gradient to the output of
gradient="stable" and gradient="exact" in float32, and of "exact" in float64 (the same model cast, the
reference for both: in float32 the exact gradient's near-constant channels are themselves rounding noise).
Printed: the cosine of each pair's gradients (median, min, max over pairs; for natural inputs also per
distortion). The values of both options are the same, bit for bit (checked).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afine import AFINELoss, synth  # noqa: E402
from bench.train import random_b32  # noqa: E402

DISTORTIONS = {"blur": lambda x, rng: synth.blur(x, 0.5, rng), "noise": lambda x, rng: synth.noise(x, 0.3, rng),
               "jpeg": lambda x, rng: synth.jpeg(x, 0.5, rng), "mixed": lambda x, rng: synth.mixed(x, 0.5, rng)}


def natural_pairs(scenes: int, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Outputs [scenes * 4, 3, size, size], their references (same batch) and a name per pair."""
    outputs, references, names = [], [], []
    for scene in range(scenes):
        rng = np.random.default_rng([0, scene])
        reference = synth.natural_image(rng, size, size)
        for name, distort in DISTORTIONS.items():
            outputs.append(np.clip(distort(reference, rng), 0, 1))
            references.append(reference)
            names.append(f"scene {scene} {name}")
    as_tensor = lambda images: torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # noqa: E731
    return as_tensor(outputs), as_tensor(references), names


def uniform_pairs(count: int, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """bench/loss.py's pairs: uniform noise references, outputs off them by Gaussian noise of std 0.1."""
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(count, 3, size, size, generator=g)
    output = (reference + 0.1 * torch.randn(reference.shape, generator=g)).clamp(0, 1)
    return output, reference, [f"uniform {i}" for i in range(count)]


def gradient(criterion: AFINELoss, output: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
             batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair values [N] and gradients [N, 3, H, W] (in float64 on the CPU), `batch` pairs at a time."""
    values, grads = [], []
    device = criterion.afine.fidelity.alpha.device
    for out, ref in zip(output.split(batch), reference.split(batch)):
        out = out.to(device, dtype).requires_grad_(True)
        value = criterion(out, ref.to(device, dtype))
        value.sum().backward()
        values.append(value.detach().double().cpu())
        grads.append(out.grad.double().cpu())
    return torch.cat(values), torch.cat(grads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="square image side (default 256)")
    parser.add_argument("--scenes", type=int, default=3, help="natural scenes, 4 distortions each (default 3)")
    parser.add_argument("--inputs", default="natural", help="natural, uniform or natural,uniform (default natural)")
    parser.add_argument("--terms", default="afine_all,afine_fr", help="terms (default afine_all,afine_fr)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per forward (default 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):  # the float32 runs in float32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = random_b32(args.device)
    model64 = copy.deepcopy(model).double()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {device}, torch {torch.__version__}, random ViT-B/32 A-FINE, {args.size} px; cosine of each "
          "pair's gradients to the output (median [min, max] over pairs)")
    print(f"{'inputs':<8} {'term':<10} {'pairs':>5} {'stable32 vs exact64':>26} {'exact32 vs exact64':>26} "
          f"{'stable32 vs exact32':>26}")
    for inputs in args.inputs.split(","):
        output, reference, names = natural_pairs(args.scenes, args.size) if inputs == "natural" else \
            uniform_pairs(4 * args.scenes, args.size)
        groups = {inputs: list(range(len(names)))}
        if inputs == "natural":  # and each distortion's pairs
            groups.update({f"  {d}": [i for i, n in enumerate(names) if n.endswith(f" {d}")] for d in DISTORTIONS})
        for term in args.terms.split(","):
            v_stable, stable = gradient(AFINELoss(model, term, "none"), output, reference, torch.float32, args.batch)
            v_exact, exact = gradient(AFINELoss(model, term, "none", gradient="exact"), output, reference,
                                      torch.float32, args.batch)
            _, exact64 = gradient(AFINELoss(model64, term, "none", gradient="exact"), output, reference,
                                  torch.float64, args.batch)
            if not torch.equal(v_stable, v_exact):
                sys.exit(f"error: {term}: the values of the two gradient options differ")
            cosines = [torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
                       for a, b in ((stable, exact64), (exact, exact64), (stable, exact))]
            for group, index in groups.items():
                columns = [f"{c[index].median():.4f} [{c[index].min():.4f}, {c[index].max():.4f}]" for c in cosines]
                print(f"{group:<8} {term:<10} {len(index):>5} " + " ".join(f"{c:>26}" for c in columns), flush=True)


if __name__ == "__main__":
    main()
