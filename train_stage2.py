"""A-FINE training, stage 2: train the fidelity head on the frozen stage-1 CLIP.

    python train_stage2.py --config configs/s2.json --stage1_dir=runs/s1
    torchrun --nproc_per_node=4 train_stage2.py --config configs/s2.json --batch_size=32   # same global batch 128

Each triplet is ranked by raw fidelity F(x1, y) vs F(x2, y) (lower is better): loss L(p12, g12),
averaged over the global batch. CLIP runs without autograd, every distinct image of a micro-batch once;
with `cache: true` (the published config) every distinct image and augmentation goes through CLIP once before
training, and the steps read the pairs' S1, S2 from the cache (docs/training.md, "Cached statistics"). AdamW group
`fidelity`. The run folder gets the official `net_dhead.pth`; its config.json names the
stage-1 folder (`stage1_dir`), so `load_afine(out_dir, ...)` finds the CLIP there, and built_on.json
records the digest of the CLIP it was trained on.
"""

from __future__ import annotations

if __name__ == "__main__":  # a command: a Ctrl-C while the imports below load is one line, exit code 130
    from afine.interrupts import exit_on_ctrl_c

    exit_on_ctrl_c()

import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from afine import cache, runfolder, training
from afine.batches import GlobalBatches, distinct_images
from afine.checkpoint import build_clip, file_digests, read_clip_file, run_file, state_dict_for_saving
from afine.compiled import compile_model
from afine.datasets import TripletDataset
from afine.distributed import Dist
from afine.losses import rank_loss
from afine.model import AFINE, load_init
from afine.training import TRADITIONAL, RunConfig


@dataclass
class Stage2LR:
    fidelity: float = 5e-4


@dataclass
class Stage2Config(RunConfig):
    """Stage 2: train the fidelity head on the frozen stage-1 CLIP (published settings)."""

    required = ("stage1_dir",)
    batch_size: int = 128
    val_every: int = 500
    save_every: int = 500
    train_datasets: list[str] = field(default_factory=lambda: list(TRADITIONAL))
    val_datasets: list[str] = field(default_factory=lambda: list(TRADITIONAL))
    stage1_dir: str = "runs/s1"  # stage-1 run folder (clip_model.pth)
    cache: bool = False  # train on the frozen CLIP's cached statistics (same result, many times faster)
    cache_dir: str = ""  # where the cache lives; "": out_dir/cache (share one between runs on the same stage 1)
    lr: Stage2LR = field(default_factory=Stage2LR)


def build_model(cfg: Stage2Config) -> AFINE:
    """Stage-1 CLIP (frozen) and a fresh fidelity head (initialised from the seed) or, with init_from, the
    fidelity head of a released or earlier model."""
    clip_file = run_file(cfg.stage1_dir, "clip_model.pth", 1)
    clip = build_clip(read_clip_file(clip_file), str(clip_file))
    torch.manual_seed(cfg.seed)
    model = AFINE(clip)
    if cfg.init_from:
        load_init(model, cfg.init_from, ("fidelity",))
    return model


def fidelity_scores(model: AFINE, batch: dict, device: torch.device, amp: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(F(x1, y), F(x2, y)): CLIP frozen (no autograd, `amp`), the head in float32."""
    images, (i1, i2, iy) = distinct_images(batch)
    with torch.no_grad():
        x, features = model.encode(images.to(device, non_blocking=True), precision=amp)
    dis, ref = torch.cat([i1, i2]).to(device), torch.cat([iy, iy]).to(device)
    return model.fidelity(x[dis], features[dis], x[ref], features[ref]).chunk(2)


def triplet_losses(model: AFINE, batch: dict, device: torch.device, amp: str) -> torch.Tensor:
    f1, f2 = fidelity_scores(model, batch, device, amp)
    return rank_loss(f1, f2, batch["g12"].to(device))


def cached_fidelity_scores(model: AFINE, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(F(x1, y), F(x2, y)) from the pairs' cached S1, S2 (float16) with the head's current weights (float32)."""
    s1, s2 = batch["similarity"].to(device).float().flatten(0, 1).chunk(2, dim=1)
    return model.fidelity.from_similarities(s1, s2).chunk(2)


def cached_losses(model: AFINE, batch: dict, device: torch.device) -> torch.Tensor:
    f1, f2 = cached_fidelity_scores(model, batch, device)
    return rank_loss(f1, f2, batch["g12"].to(device))


def official_files(model: AFINE) -> dict[str, object]:
    return {"net_dhead.pth": {"params": state_dict_for_saving(model.fidelity)}}


def train(cfg: Stage2Config, d: Dist) -> AFINE:
    # data: every training triplet of the traditional datasets in one list
    cfg.stage1_dir = str(Path(cfg.stage1_dir).resolve())
    data = TripletDataset.from_lists(cfg.data_root, cfg.train_datasets, "Train", augment=True, seed=cfg.seed)
    val_sets = training.validation_sets(cfg.data_root, cfg.val_datasets) if cfg.val_every else []
    batches = GlobalBatches(len(data), data.shape, cfg.batch_size, cfg.grad_accum, cfg.micro_batch, cfg.seed,
                            cfg.shuffle, d.rank, d.world_size)

    # model, and what trains: the fidelity head alone (CLIP frozen)
    model = build_model(cfg).to(d.device)
    training.freeze(model)
    if cfg.compile:
        compile_model(model)
    trained = {"fidelity": model.fidelity}
    optimizer = training.adamw(cfg, trained, {"fidelity": cfg.lr.fidelity})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.amp == "fp16")
    built_on = file_digests([Path(cfg.stage1_dir) / "clip_model.pth"])

    with runfolder.start(cfg, d, trained, optimizer, scaler, batches.global_batch, data, built_on) as run:
        # where a step's losses and validation's scores come from, chosen once: the frozen CLIP's S1, S2 of every
        # (pair, augmentation), computed once before training or read from cache_dir, or images decoded and encoded
        if cfg.cache:
            train_cache, caches = cache.open_caches(cache.SIMILARITY, cfg, data, val_sets, model, built_on, d)
            scores = partial(cached_fidelity_scores, model, device=d.device)

            def micro_batch_losses(step: int):  # this rank's share of global batch `step`, read from the cache at once
                yield cached_losses(model, train_cache.read(batches.keys(step)), d.device)
        else:
            caches, scores = None, partial(fidelity_scores, model, device=d.device, amp=cfg.amp)
            loader = training.loader(data, batches.sampler(run.step, cfg.total_iter), cfg.workers, d.device)

            def micro_batch_losses(step: int):  # this rank's share of global batch `step`, as same-shape micro-batches
                for _ in batches.micro_batches(step):
                    yield triplet_losses(model, next(loader), d.device, cfg.amp)

        if run.step == 0 and cfg.val_every and training.validate(run, val_sets, scores, caches):
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
                    training.validate(run, val_sets, scores, caches):
                runfolder.write_best(run, official_files(model))
            if training.due(run.step, cfg.save_every, cfg.total_iter):
                runfolder.save(run, trained, optimizer, scaler, official_files(model), batches.global_batch)
    return model


def main(argv: list[str] | None = None) -> int:
    return training.main(train, Stage2Config, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
