"""A-FINE training, stage 3: train the NR and FR mappings and the adapter k.

    python train_stage3.py --config configs/s3.json --stage2_dir=runs/s2 --nr_init_file=runs/gamma.json
    torchrun --nproc_per_node=4 train_stage3.py --config configs/s3.json --batch_size=32   # same global batch 128

Each triplet is ranked by D(x1, y) vs D(x2, y) (lower is better), D = F + exp(k (N(y) - N(x))) N(x)
with mapped N and F: loss L(p12, g12), averaged over the global batch. CLIP and both heads are frozen
and run without autograd (every distinct image of a micro-batch once); with `cache: true` (the published
config) N_raw and F_raw of every distinct (pair, augmentation) are computed once before training and the steps
read them (docs/training.md, "Cached statistics"). Only the five mapping/adapter scalars train, AdamW groups
`natural_scale`, `fidelity_scale`, `adapter`. The NR mapping starts at (nr_yita3, nr_yita4) or at fit_gamma's
{"yita3", "yita4"} (nr_init_file); the FR mapping at (0.5, 0.15), k at 5. The run folder gets
`net_scale_nr.pth`, `net_scale_fr.pth`, `net_finalscore.pth` and the merged `afine.pth`; built_on.json
records the digests of the stage-1 and stage-2 files it was trained on.
"""

from __future__ import annotations

if __name__ == "__main__":  # a command: a Ctrl-C while the imports below load is one line, exit code 130
    from afine.interrupts import exit_on_ctrl_c

    exit_on_ctrl_c()

import json
import math
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from afine import cache, runfolder, training
from afine.batches import GlobalBatches, distinct_images
from afine.checkpoint import (
    PART_FILES,
    build_clip,
    check_built_on,
    earlier_runs,
    file_digests,
    load_strict,
    read_clip_file,
    read_network_file,
    run_file,
    state_dict_for_saving,
)
from afine.compiled import compile_model
from afine.datasets import TripletDataset
from afine.distributed import Dist
from afine.errors import AfineError
from afine.losses import rank_loss
from afine.mapping import NaturalnessMapping
from afine.model import AFINE, load_init
from afine.training import RunConfig


@dataclass
class Stage3LR:
    natural_scale: float = 1e-3
    fidelity_scale: float = 1e-3
    adapter: float = 1e-3


@dataclass
class Stage3Config(RunConfig):
    """Stage 3: train the NR and FR mappings and the adapter k, everything else frozen (published settings)."""

    required = ("stage2_dir",)
    batch_size: int = 128
    val_every: int = 500
    save_every: int = 500
    stage1_dir: str = ""  # stage-1 run folder (clip_model.pth, net_qhead.pth); "": the one stage2_dir names
    stage2_dir: str = "runs/s2"  # stage-2 run folder (net_dhead.pth)
    nr_yita3: float = 4.9592  # NR-mapping start (the published fit_gamma values) ...
    nr_yita4: float = 21.5968
    nr_init_file: str = ""  # ... or fit_gamma's JSON output {"yita3": ..., "yita4": ...}, which then wins
    cache: bool = False  # train on the frozen networks' cached N_raw and F_raw (same result, many times faster)
    cache_dir: str = ""  # where the cache lives; "": out_dir/cache (share one between runs on the same stages)
    lr: Stage3LR = field(default_factory=Stage3LR)


def resolve_stage_dirs(cfg: Stage3Config) -> None:
    """Absolute stage2_dir and stage1_dir; stage1_dir defaults to the one stage 2's config.json names. Whichever
    folder it is, its files must be those stage 2 was trained on (its built_on.json, checked in train)."""
    stage2 = Path(cfg.stage2_dir).resolve()
    run_config = run_file(stage2, "config.json", 2)
    if not cfg.stage1_dir:
        named = earlier_runs(stage2)
        if not named:
            raise AfineError(f"{run_config}: names no stage1_dir; set stage1_dir")
        cfg.stage1_dir = str(named[-1])
    cfg.stage1_dir, cfg.stage2_dir = str(Path(cfg.stage1_dir).resolve()), str(stage2)


def read_nr_init(cfg: Stage3Config) -> None:
    """fit_gamma's JSON output {"yita3": ..., "yita4": ...}, if given, sets the NR-mapping start."""
    if not cfg.nr_init_file:
        return
    if cfg.init_from:
        raise AfineError("config keys 'nr_init_file' and 'init_from' both set the NR-mapping start; give one")
    path = Path(cfg.nr_init_file)
    try:
        fit = json.loads(path.read_text())
        yita3, yita4 = float(fit["yita3"]), float(fit["yita4"])
    except FileNotFoundError:
        raise AfineError(f"{path}: nr_init_file not found") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AfineError(f"{path}: expected fit_gamma's JSON with numbers 'yita3' and 'yita4' ({e!r})") from None
    if not (math.isfinite(yita3) and math.isfinite(yita4)):
        raise AfineError(f"{path}: yita3 and yita4 must be finite numbers")
    cfg.nr_yita3, cfg.nr_yita4 = yita3, yita4


def frozen_files(cfg: Stage3Config) -> list[Path]:
    """The earlier stages' files stage 3 runs on: stage-1 CLIP and naturalness head, stage-2 fidelity head."""
    return [run_file(cfg.stage1_dir, "clip_model.pth", 1), run_file(cfg.stage1_dir, "net_qhead.pth", 1),
            run_file(cfg.stage2_dir, "net_dhead.pth", 2)]


def build_model(cfg: Stage3Config) -> AFINE:
    """Stage-1 CLIP and naturalness head, stage-2 fidelity head (all frozen); fresh mappings and adapter, or,
    with init_from, those of a released or earlier model."""
    clip_file, natural_file, fidelity_file = frozen_files(cfg)
    model = AFINE(build_clip(read_clip_file(clip_file), str(clip_file)))
    load_strict(model.natural, read_network_file(natural_file), str(natural_file))
    load_strict(model.fidelity, read_network_file(fidelity_file), str(fidelity_file))
    model.natural_scale = NaturalnessMapping(cfg.nr_yita3, cfg.nr_yita4)
    if cfg.init_from:
        load_init(model, cfg.init_from, ("natural_scale", "fidelity_scale", "adapter"))
    return model


def distortion_scores(model: AFINE, batch: dict, device: torch.device, amp: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(D(x1, y), D(x2, y)): CLIP and heads without autograd, the mappings and adapter with it."""
    images, (i1, i2, iy) = distinct_images(batch)
    dis, ref = torch.cat([i1, i2]).to(device), torch.cat([iy, iy]).to(device)
    with torch.no_grad():
        x, features = model.encode(images.to(device, non_blocking=True), precision=amp)
        n = model.natural(x, features)
        f = model.fidelity(x[dis], features[dis], x[ref], features[ref])
    return model.terms(n[dis], n[ref], f)["afine_all"].chunk(2)


def triplet_losses(model: AFINE, batch: dict, device: torch.device, amp: str) -> torch.Tensor:
    d1, d2 = distortion_scores(model, batch, device, amp)
    return rank_loss(d1, d2, batch["g12"].to(device))


def cached_distortion_scores(model: AFINE, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(D(x1, y), D(x2, y)) from the cached N_raw(x1), N_raw(x2), N_raw(y), F_raw(x1, y), F_raw(x2, y)."""
    n, f = batch["natural"].to(device), batch["fidelity"].to(device)  # [3, B], [2, B]
    return model.terms(n[:2].flatten(), n[2].repeat(2), f.flatten())["afine_all"].chunk(2)


def cached_losses(model: AFINE, batch: dict, device: torch.device) -> torch.Tensor:
    d1, d2 = cached_distortion_scores(model, batch, device)
    return rank_loss(d1, d2, batch["g12"].to(device))


def official_files(model: AFINE) -> dict[str, object]:
    """The three per-network files and the merged afine.pth (the six parts, as released)."""
    parts = {part: state_dict_for_saving(module) for part, module in model.parts().items()}
    return {"net_scale_nr.pth": {"params": parts["natural_scale"]},
            "net_scale_fr.pth": {"params": parts["fidelity_scale"]},
            "net_finalscore.pth": {"params": parts["adapter"]},
            "afine.pth": {part: parts[part] for part in PART_FILES}}


def train(cfg: Stage3Config, d: Dist) -> AFINE:
    # data: every training triplet of the four datasets in one list
    resolve_stage_dirs(cfg)
    read_nr_init(cfg)
    data = TripletDataset.from_lists(cfg.data_root, cfg.train_datasets, "Train", augment=True, seed=cfg.seed)
    val_sets = training.validation_sets(cfg.data_root, cfg.val_datasets) if cfg.val_every else []
    batches = GlobalBatches(len(data), data.shape, cfg.batch_size, cfg.grad_accum, cfg.micro_batch, cfg.seed,
                            cfg.shuffle, d.rank, d.world_size)

    # model, and what trains: the two mappings and the adapter (CLIP and both heads frozen), on the stage-1 files
    # stage 2 was trained on
    built_on = file_digests(frozen_files(cfg))
    check_built_on(Path(cfg.stage2_dir), frozen_files(cfg), built_on)
    model = build_model(cfg).to(d.device)
    training.freeze(model)
    if cfg.compile:
        compile_model(model)
    trained = {"natural_scale": model.natural_scale, "fidelity_scale": model.fidelity_scale, "adapter": model.adapter}
    optimizer = training.adamw(cfg, trained, {"natural_scale": cfg.lr.natural_scale,
                                              "fidelity_scale": cfg.lr.fidelity_scale, "adapter": cfg.lr.adapter})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.amp == "fp16")

    with runfolder.start(cfg, d, trained, optimizer, scaler, batches.global_batch, data, built_on) as run:
        # where a step's losses and validation's scores come from, chosen once: the frozen networks' N_raw, F_raw of
        # every (pair, augmentation), computed once before training or read from cache_dir, or images decoded and
        # encoded
        if cfg.cache:
            train_cache, caches = cache.open_caches(cache.SCORES, cfg, data, val_sets, model, built_on, d)
            scores = partial(cached_distortion_scores, model, device=d.device)

            def micro_batch_losses(step: int):  # this rank's share of global batch `step`, read from the cache at once
                yield cached_losses(model, train_cache.read(batches.keys(step)), d.device)
        else:
            caches, scores = None, partial(distortion_scores, model, device=d.device, amp=cfg.amp)
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
    return training.main(train, Stage3Config, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
