"""A-FINE training, stage 2: train the fidelity head on the frozen stage-1 CLIP (SPEC section 7).

    python train_stage2.py --config configs/s2.json --stage1_dir=runs/s1
    torchrun --nproc_per_node=4 train_stage2.py --config configs/s2.json

Each triplet is ranked by raw fidelity F(x1, y) vs F(x2, y) (lower is better): loss L(p12, g12),
averaged over the global batch. CLIP runs without autograd, every distinct image of a batch once.
AdamW group `fidelity`. The run folder gets the official `net_dhead.pth`; its config.json names the
stage-1 folder (`stage1_dir`), so `load_afine(None, out_dir, ...)` finds the CLIP there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from afine import trainer
from afine.checkpoint import build_clip, read_clip_file, save_network_file
from afine.config import Stage2Config
from afine.datasets import TripletDataset
from afine.distributed import Dist
from afine.errors import AfineError
from afine.losses import rank_loss
from afine.model import AFINE
from afine.trainer import Trainer, autocast, distinct_images, validation_sets


def stage_file(folder: str | Path, name: str, stage: int) -> Path:
    path = Path(folder) / name
    if not path.is_file():
        raise AfineError(f"{folder}: no {name}; expected a stage-{stage} run folder")
    return path


def build_model(cfg: Stage2Config) -> AFINE:
    """Stage-1 CLIP (frozen) and a fresh fidelity head (initialised from the seed)."""
    clip_file = stage_file(cfg.stage1_dir, "clip_model.pth", 1)
    clip = build_clip(read_clip_file(clip_file), str(clip_file))
    torch.manual_seed(cfg.seed)
    return AFINE(clip)


def fidelity_scores(model: AFINE, batch: dict, device: torch.device, amp: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(F(x1, y), F(x2, y)): CLIP frozen (no autograd, `amp`), the head in float32."""
    images, (i1, i2, iy) = distinct_images(batch)
    with torch.no_grad(), autocast(device, amp):
        x, features = model.encode(images.to(device, non_blocking=True))
    x, features = x.float(), features.float()
    dis, ref = torch.cat([i1, i2]).to(device), torch.cat([iy, iy]).to(device)
    return model.fidelity(x[dis], features[dis], x[ref], features[ref]).chunk(2)


def triplet_losses(model: AFINE, batch: dict, device: torch.device, amp: str) -> torch.Tensor:
    f1, f2 = fidelity_scores(model, batch, device, amp)
    return rank_loss(f1, f2, batch["g12"].to(device))


def write_official_files(model: AFINE, out_dir: Path) -> None:
    save_network_file(out_dir / "net_dhead.pth", model.fidelity)


def train(cfg: Stage2Config, d: Dist) -> AFINE:
    cfg.stage1_dir = str(Path(cfg.stage1_dir).resolve())
    data = TripletDataset.from_lists(cfg.data_root, cfg.train_datasets, "Train", augment=True, seed=cfg.seed)
    val_sets = validation_sets(cfg.data_root, cfg.val_datasets) if cfg.val_every else []
    model = build_model(cfg).to(d.device)
    t = Trainer(cfg, d, model, {"fidelity": model.fidelity}, {"fidelity": cfg.lr.fidelity}, data)
    t.fit(losses=lambda batch: triplet_losses(model, batch, d.device, cfg.amp),
          scores=lambda batch: fidelity_scores(model, batch, d.device, cfg.amp),
          val_sets=val_sets, write_official_files=lambda out: write_official_files(model, out))
    return model


def main(argv: list[str] | None = None) -> int:
    return trainer.main(train, Stage2Config, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
