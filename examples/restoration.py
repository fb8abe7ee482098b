"""A-FINE as a training loss, worked example: a small denoiser trained with L1 alone and with L1 + w * A-FINE.

    python demo.py --seed 0 --out demo_out            # once: the synthetic corpus and the loss's A-FINE model
    python demo.py --seed 1 --out demo_seed1          # once: a second A-FINE model, the judge
    python examples/restoration.py                    # about 3 minutes on one CPU core

The clean references of the demo corpus's KADID10K and TID2013 look-alikes (64x96) are the images; Gaussian
noise (sigma 0.1, clipped to [0, 1]) is the degradation. A four-layer residual CNN is trained from the same
initialisation, on the same batches and noise, once per loss in RUNS. Held-out images (the two corpora's Test
references) are scored by PSNR and by a judge: an A-FINE model trained from another seed, which entered no
loss. The loss's own model scores them too, to show what was optimised. Lower A-FINE is better.
docs/loss.md, "Worked example"; the measured results: docs/measurements.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afine import AFINELoss, load_afine, load_image  # noqa: E402
from afine.errors import AfineError, ArgumentParser, command  # noqa: E402

DATASETS = ("KADID10K", "TID2013")
# (name, weight of L1, A-FINE term, its weight w). On the first batch the A-FINE terms' gradients with respect
# to the output are 320 (afine_fr), 760 (afine_all) and 7,600 (afine_all_scale) times L1's: w = 0.003, 0.0001 and
# 0.001 put the term's gradient at about L1's, w = 0.03 and 0.01 at about ten times L1's.
RUNS = (("L1", 1.0, None, 0.0),
        ("L1 + 0.003 afine_fr", 1.0, "afine_fr", 3e-3),
        ("L1 + 0.03 afine_fr", 1.0, "afine_fr", 3e-2),
        ("L1 + 0.0001 afine_all_scale", 1.0, "afine_all_scale", 1e-4),
        ("L1 + 0.001 afine_all", 1.0, "afine_all", 1e-3),
        ("L1 + 0.01 afine_all", 1.0, "afine_all", 1e-2),
        ("afine_all alone", 0.0, "afine_all", 1.0))


def references(data: Path, split: str) -> torch.Tensor:
    """The clean references of a split [N, 3, H, W]: one MOS file per reference, named after it."""
    images = []
    for dataset in DATASETS:
        mos = data / dataset / split / "MOS"
        if not mos.is_dir():
            raise AfineError(f"{mos}: not found; make the corpus with `python demo.py` (or python -m afine.synth "
                             "--scale demo)")
        for stem in sorted(p.stem for p in mos.glob("*.txt")):
            found = sorted((data / dataset / "images").glob(stem + ".*"))
            if not found:
                raise AfineError(f"{data / dataset / 'images'}: no image for reference {stem}")
            images.append(load_image(found[0]))
    return torch.stack(images)


def degrade(clean: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    return (clean + sigma * torch.randn(clean.shape, generator=g)).clamp(0, 1)


class Denoiser(nn.Module):
    """Four 3x3 convolutions predicting the noise to remove (a residual)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image, in dB, for images in [0, 1]."""
    return -10 * torch.log10(F.mse_loss(x, y, reduction="none").mean(dim=(1, 2, 3)))


def train(train_set: torch.Tensor, l1_weight: float, criterion: AFINELoss | None, afine_weight: float,
          args) -> Denoiser:
    """The same initialisation, batches and noise for every loss (all drawn from args.seed)."""
    torch.manual_seed(args.seed)
    net = Denoiser()
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        clean = train_set[torch.randint(len(train_set), (args.batch,), generator=g)]
        output = net(degrade(clean, args.sigma, g))
        loss = l1_weight * F.l1_loss(output, clean)
        if criterion is not None:
            loss = loss + afine_weight * criterion(output, clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net


@command
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="demo_out/data", help="the demo corpus (default demo_out/data)")
    p.add_argument("--loss-afine", default="demo_out/s3/afine.pth", help="A-FINE model of the loss")
    p.add_argument("--judge-afine", default="demo_seed1/s3/afine.pth", help="A-FINE model that judges")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sigma", type=float, default=0.1, help="noise standard deviation (images in [0, 1])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for path in (args.loss_afine, args.judge_afine):
        if not Path(path).exists():
            raise AfineError(f"{path}: not found; train it with `python demo.py --seed 0 --out demo_out` "
                             "and `python demo.py --seed 1 --out demo_seed1`")
    start = time.perf_counter()
    data = Path(args.data)
    train_set, test_set = references(data, "Train"), references(data, "Test")
    loss_model, judge_model = load_afine(args.loss_afine), load_afine(args.judge_afine)
    criteria = {term: AFINELoss(loss_model, term) for term in {run[2] for run in RUNS} - {None}}  # one model
    noisy = degrade(test_set, args.sigma, torch.Generator().manual_seed(10_000 + args.seed))
    print(f"{len(train_set)} training and {len(test_set)} held-out images {tuple(test_set.shape[-2:])}, noise sigma "
          f"{args.sigma}, {args.steps} steps of {args.batch}, seed {args.seed}; loss A-FINE {args.loss_afine}, "
          f"judge {args.judge_afine}")
    print(f"{'trained with':<29} {'PSNR dB':>8} {'judge afine_all':>16} {'judge afine_fr':>15} "
          f"{'loss model afine_all':>21}   (A-FINE: lower is better)")

    @torch.no_grad()
    def report(name: str, restored: torch.Tensor) -> None:
        restored = restored.clamp(0, 1)  # as the images would be saved
        judged, own = judge_model(restored, test_set), loss_model(restored, test_set)
        print(f"{name:<29} {psnr(restored, test_set).mean():>8.2f} {judged['afine_all'].mean():>16.4f} "
              f"{judged['afine_fr'].mean():>15.4f} {own['afine_all'].mean():>21.4f}", flush=True)

    report("(clean target itself)", test_set)
    report("(noisy input)", noisy)
    for name, l1_weight, term, afine_weight in RUNS:
        net = train(train_set, l1_weight, criteria.get(term), afine_weight, args)
        with torch.no_grad():
            report(name, net(noisy))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
