"""A-FINE training, stage 1: fine-tune CLIP (all weights) and train the naturalness head.

    python train_stage1.py --config configs/s1.json
    torchrun --nproc_per_node=4 train_stage1.py --config configs/s1.json --batch_size=8    # same global batch 32

Each triplet (x1, x2, y) is ranked by raw naturalness N (lower is better) in all three pairs:
loss = L(p12, g12) + L(p1y, g1y) + L(p2y, g2y), averaged over the global batch. Every distinct image
of a micro-batch goes through CLIP once. AdamW groups `clip` and `natural`. The run folder gets the
official `clip_model.pth` (a plain full CLIP state dict) and `net_qhead.pth` (docs/training.md).
"""

from __future__ import annotations

if __name__ == "__main__":  # a command: a Ctrl-C while the imports below load is one line, exit code 130
    from afine.interrupts import exit_on_ctrl_c

    exit_on_ctrl_c()

import math
import sys
from dataclasses import dataclass, field
from functools import partial

import torch

from afine import runfolder, training
from afine.batches import GlobalBatches, distinct_images
from afine.checkpoint import clip_from_spec, state_dict_for_saving
from afine.compiled import compile_model
from afine.datasets import TripletDataset
from afine.distributed import Dist
from afine.errors import AfineError
from afine.losses import rank_loss
from afine.model import AFINE, load_afine
from afine.training import RunConfig


@dataclass
class Stage1LR:
    clip: float = 5e-6
    natural: float = 5e-6


@dataclass
class Stage1Config(RunConfig):
    """Stage 1: fine-tune CLIP (all weights) and train the naturalness head (published settings)."""

    required = ("clip",)
    clip: str = "data/ViT-B-32.pt"  # OpenAI ViT-B-32.pt, a plain CLIP state dict, or "random-tiny"
    checkpoint_blocks: bool = False  # recompute CLIP blocks in the backward pass (saves activation memory)
    lr: Stage1LR = field(default_factory=Stage1LR)


def build_model(cfg: Stage1Config) -> AFINE:
    """The CLIP to fine-tune and a fresh naturalness head (initialised from the seed), or, with init_from,
    the fine-tuned CLIP and naturalness head of a released or earlier model."""
    if cfg.init_from:
        return load_afine(cfg.init_from, require=("finetuned_clip", "natural"), text_tower=True)
    clip = clip_from_spec(cfg.clip, cfg.seed)
    torch.manual_seed(cfg.seed)
    return AFINE(clip)


def natural_scores(model: AFINE, batch: dict, device: torch.device, amp: str, names=("x1", "x2", "y"),
                   checkpoint_blocks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw N of the batch's distinct images (CLIP in `amp`, the head in float32) and the [len(names), B] index."""
    images, index = distinct_images(batch, names)
    x, features = model.encode(images.to(device, non_blocking=True), checkpoint_blocks, precision=amp)
    return model.natural(x, features), index.to(device)


def triplet_losses(model: AFINE, batch: dict, device: torch.device, amp: str,
                   checkpoint_blocks: bool = False) -> torch.Tensor:
    """Per triplet: the three pair losses on raw N, summed [B]."""
    n, (i1, i2, iy) = natural_scores(model, batch, device, amp, checkpoint_blocks=checkpoint_blocks)
    g12, g1y, g2y = (batch[k].to(device) for k in ("g12", "g1y", "g2y"))
    return rank_loss(n[i1], n[i2], g12) + rank_loss(n[i1], n[iy], g1y) + rank_loss(n[i2], n[iy], g2y)


def validation_scores(model: AFINE, batch: dict, device: torch.device, amp: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N(x1), N(x2)) for the 2AFC accuracy of g12."""
    n, (i1, i2) = natural_scores(model, batch, device, amp, names=("x1", "x2"))
    return n[i1], n[i2]


def official_files(model: AFINE) -> dict[str, object]:
    return {"clip_model.pth": state_dict_for_saving(model.clip),
            "net_qhead.pth": {"params": state_dict_for_saving(model.natural)}}


def train(cfg: Stage1Config, d: Dist) -> AFINE:
    # data: every training triplet of the four datasets in one list; validation lists per dataset / DiffIQA type
    data = TripletDataset.from_lists(cfg.data_root, cfg.train_datasets, "Train", augment=True, seed=cfg.seed)
    if any(math.isnan(item[4]) or math.isnan(item[5]) for item in data.items):
        raise AfineError(f"stage 1 needs 6-column triplet lists (g1y, g2y); a list of {', '.join(cfg.train_datasets)}"
                         " has only 4 columns")
    val_sets = training.validation_sets(cfg.data_root, cfg.val_datasets) if cfg.val_every else []
    batches = GlobalBatches(len(data), data.shape, cfg.batch_size, cfg.grad_accum, cfg.micro_batch, cfg.seed,
                            cfg.shuffle, d.rank, d.world_size)

    # model, and what trains: all of CLIP and the naturalness head, one AdamW group each
    model = build_model(cfg).to(d.device)
    training.freeze(model)
    if cfg.compile:
        compile_model(model)
    trained = {"clip": model.clip, "natural": model.natural}
    optimizer = training.adamw(cfg, trained, {"clip": cfg.lr.clip, "natural": cfg.lr.natural})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.amp == "fp16")

    with runfolder.start(cfg, d, trained, optimizer, scaler, batches.global_batch, data) as run:
        # what a step's losses and validation's scores are computed from: decoded images (CLIP trains)
        loader = training.loader(data, batches.sampler(run.step, cfg.total_iter), cfg.workers, d.device)

        def micro_batch_losses(step: int):  # this rank's share of global batch `step`, as same-shape micro-batches
            for _ in batches.micro_batches(step):
                yield triplet_losses(model, next(loader), d.device, cfg.amp, cfg.checkpoint_blocks)

        scores = partial(validation_scores, model, device=d.device, amp=cfg.amp)

        if run.step == 0 and cfg.val_every and training.validate(run, val_sets, scores):
            runfolder.write_best(run, official_files(model))
        for step in range(run.step, cfg.total_iter):
            loss_sum = torch.zeros((), device=d.device)
            for losses in micro_batch_losses(step):  # gradients accumulate
                scaler.scale(losses.sum() / batches.global_batch).backward()
                loss_sum += losses.detach().sum()
            loss, grad_norm = training.sync_gradients(run, params, loss_sum, batches.global_batch, scaler)
            lrs = training.set_lr(optimizer, cfg, step + 1)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            run.step = step + 1
            training.log_step(run, loss, lrs, grad_norm)

            if cfg.val_every and training.due(run.step, cfg.val_every, cfg.total_iter) and \
                    training.validate(run, val_sets, scores):
                runfolder.write_best(run, official_files(model))
            if training.due(run.step, cfg.save_every, cfg.total_iter):
                runfolder.save(run, trained, optimizer, scaler, official_files(model), batches.global_batch)
    return model


def main(argv: list[str] | None = None) -> int:
    return training.main(train, Stage1Config, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
