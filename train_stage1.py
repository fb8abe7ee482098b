"""A-FINE training, stage 1: fine-tune CLIP (all weights) and train the naturalness head (SPEC section 7).

    python train_stage1.py --config configs/s1.json
    torchrun --nproc_per_node=4 train_stage1.py --config configs/s1.json --amp=bf16 --checkpoint_blocks=true

Each triplet (x1, x2, y) is ranked by raw naturalness N (lower is better) in all three pairs:
loss = L(p12, g12) + L(p1y, g1y) + L(p2y, g2y), averaged over the global batch. Every distinct image
of a batch goes through CLIP once. AdamW groups `clip` and `natural`. The run folder gets the official
`clip_model.pth` (a plain full CLIP state dict) and `net_qhead.pth`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from afine import trainer
from afine.checkpoint import atomic_save, build_clip, read_clip_file, save_network_file, state_dict_for_saving
from afine.clip import CLIP
from afine.config import RANDOM_TINY, Stage1Config
from afine.datasets import TripletDataset
from afine.distributed import Dist
from afine.errors import AfineError
from afine.losses import rank_loss
from afine.model import AFINE
from afine.trainer import Trainer, autocast, distinct_images, validation_sets

# `clip: "random-tiny"`: a small random CLIP in OpenAI's layout (demo and tests; no download).
TINY_CLIP = dict(embed_dim=64, vision_width=64, vision_layers=3, vision_patch_size=16, grid_size=4,
                 context_length=8, vocab_size=64, transformer_width=64, transformer_layers=1)


def make_clip(spec: str, seed: int) -> CLIP:
    """The CLIP to fine-tune: OpenAI's ViT-B-32.pt, a plain state-dict file, or "random-tiny" (seeded)."""
    if spec == RANDOM_TINY:
        torch.manual_seed(seed)
        return CLIP(**TINY_CLIP)
    return build_clip(read_clip_file(spec), spec)


def build_model(cfg: Stage1Config) -> AFINE:
    clip = make_clip(cfg.clip, cfg.seed)
    torch.manual_seed(cfg.seed)  # the heads' initialisation
    return AFINE(clip)


def natural_scores(model: AFINE, batch: dict, device: torch.device, amp: str, names=("x1", "x2", "y"),
                   checkpoint_blocks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw N of the batch's distinct images (CLIP in `amp`, the head in float32) and the [len(names), B] index."""
    images, index = distinct_images(batch, names)
    with autocast(device, amp):
        x, features = model.encode(images.to(device, non_blocking=True), checkpoint_blocks)
    return model.natural(x.float(), features.float()), index.to(device)


def triplet_losses(model: AFINE, batch: dict, device: torch.device, amp: str,
                   checkpoint_blocks: bool = False) -> torch.Tensor:
    """Per triplet: the three pair losses on raw N, summed [B]."""
    n, (i1, i2, iy) = natural_scores(model, batch, device, amp, checkpoint_blocks=checkpoint_blocks)
    g12, g1y, g2y = (batch[k].to(device) for k in ("g12", "g1y", "g2y"))
    return rank_loss(n[i1], n[i2], g12) + rank_loss(n[i1], n[iy], g1y) + rank_loss(n[i2], n[iy], g2y)


def validation_scores(model: AFINE, batch: dict, device: torch.device, amp: str):
    """(N(x1), N(x2)) for 2AFC accuracy of g12."""
    n, (i1, i2) = natural_scores(model, batch, device, amp, names=("x1", "x2"))
    return n[i1], n[i2]


def write_official_files(model: AFINE, out_dir: Path) -> None:
    atomic_save(state_dict_for_saving(model.clip), out_dir / "clip_model.pth")
    save_network_file(out_dir / "net_qhead.pth", model.natural)


def require_pair_labels(data: TripletDataset, datasets: list[str]) -> None:
    """Stage 1 needs g1y and g2y: 6-column triplet lists."""
    if any(math.isnan(item[4]) or math.isnan(item[5]) for item in data.items):
        raise AfineError(f"stage 1 needs 6-column triplet lists (g1y, g2y); a list of {', '.join(datasets)} "
                         "has only 4 columns")


def train(cfg: Stage1Config, d: Dist) -> AFINE:
    data = TripletDataset.from_lists(cfg.data_root, cfg.train_datasets, "Train", augment=True, seed=cfg.seed)
    require_pair_labels(data, cfg.train_datasets)
    val_sets = validation_sets(cfg.data_root, cfg.val_datasets) if cfg.val_every else []
    model = build_model(cfg).to(d.device)
    trained = {"clip": model.clip, "natural": model.natural}
    t = Trainer(cfg, d, model, trained, {"clip": cfg.lr.clip, "natural": cfg.lr.natural}, data)
    t.fit(losses=lambda batch: triplet_losses(model, batch, d.device, cfg.amp, cfg.checkpoint_blocks),
          scores=lambda batch: validation_scores(model, batch, d.device, cfg.amp),
          val_sets=val_sets, write_official_files=lambda out: write_official_files(model, out))
    return model


def main(argv: list[str] | None = None) -> int:
    return trainer.main(train, Stage1Config, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
