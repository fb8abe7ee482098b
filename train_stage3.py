"""A-FINE training, stage 3: train the NR and FR mappings and the adapter k (SPEC section 7).

    python train_stage3.py --config configs/s3.json --stage2_dir=runs/s2 --nr_init_file=runs/fit_gamma.json
    torchrun --nproc_per_node=4 train_stage3.py --config configs/s3.json

Each triplet is ranked by D(x1, y) vs D(x2, y) (lower is better), D = F + exp(k (N(y) - N(x))) N(x)
with mapped N and F: loss L(p12, g12), averaged over the global batch. CLIP and both heads are frozen
and run without autograd (every distinct image once); only the five mapping/adapter scalars train,
AdamW groups `natural_scale`, `fidelity_scale`, `adapter`. The NR mapping starts at (nr_yita3, nr_yita4)
or at fit_gamma's {"yita3", "yita4"} (nr_init_file); the FR mapping at (0.5, 0.15), k at 5.
The run folder gets `net_scale_nr.pth`, `net_scale_fr.pth`, `net_finalscore.pth` and the merged `afine.pth`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from afine import trainer
from afine.checkpoint import build_clip, load_strict, read_clip_file, read_network_file, save_afine, save_network_file
from afine.config import Stage3Config
from afine.datasets import TripletDataset
from afine.distributed import Dist
from afine.errors import AfineError
from afine.losses import rank_loss
from afine.mapping import NaturalnessMapping
from afine.model import AFINE
from afine.trainer import Trainer, autocast, distinct_images, validation_sets
from train_stage2 import stage_file


def resolve_stage_dirs(cfg: Stage3Config) -> None:
    """Absolute stage2_dir and stage1_dir; stage1_dir defaults to (and must agree with) the one stage 2 used."""
    stage2 = Path(cfg.stage2_dir).resolve()
    run_config = stage_file(stage2, "config.json", 2)
    try:
        used = json.loads(run_config.read_text()).get("stage1_dir", "")
    except (OSError, ValueError, AttributeError) as e:
        raise AfineError(f"{run_config}: cannot read run config ({e})") from None
    stage1 = Path(cfg.stage1_dir).resolve() if cfg.stage1_dir else Path(used) if used else None
    if stage1 is None:
        raise AfineError(f"{run_config}: names no stage1_dir; set stage1_dir")
    if used and Path(used).resolve() != stage1:
        raise AfineError(f"config key 'stage1_dir': {stage1} is not the stage-1 run stage 2 trained on ({used})")
    cfg.stage1_dir, cfg.stage2_dir = str(stage1), str(stage2)


def read_nr_init(cfg: Stage3Config) -> None:
    """fit_gamma's JSON output {"yita3": ..., "yita4": ...}, if given, sets the NR-mapping start."""
    if not cfg.nr_init_file:
        return
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


def build_model(cfg: Stage3Config) -> AFINE:
    """Stage-1 CLIP and naturalness head, stage-2 fidelity head (all frozen); fresh mappings and adapter."""
    clip_file = stage_file(cfg.stage1_dir, "clip_model.pth", 1)
    model = AFINE(build_clip(read_clip_file(clip_file), str(clip_file)))
    for module, folder, name, stage in ((model.natural, cfg.stage1_dir, "net_qhead.pth", 1),
                                        (model.fidelity, cfg.stage2_dir, "net_dhead.pth", 2)):
        path = stage_file(folder, name, stage)
        load_strict(module, read_network_file(path), str(path))
    model.natural_scale = NaturalnessMapping(cfg.nr_yita3, cfg.nr_yita4)
    return model


def distortion_scores(model: AFINE, batch: dict, device: torch.device, amp: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(D(x1, y), D(x2, y)): CLIP and heads without autograd, the mappings and adapter with it."""
    images, (i1, i2, iy) = distinct_images(batch)
    dis, ref = torch.cat([i1, i2]).to(device), torch.cat([iy, iy]).to(device)
    with torch.no_grad():
        with autocast(device, amp):
            x, features = model.encode(images.to(device, non_blocking=True))
        x, features = x.float(), features.float()
        n = model.natural(x, features)
        f = model.fidelity(x[dis], features[dis], x[ref], features[ref])
    return model.terms(n[dis], n[ref], f)["afine_all"].chunk(2)


def triplet_losses(model: AFINE, batch: dict, device: torch.device, amp: str) -> torch.Tensor:
    d1, d2 = distortion_scores(model, batch, device, amp)
    return rank_loss(d1, d2, batch["g12"].to(device))


def write_official_files(model: AFINE, out_dir: Path) -> None:
    save_network_file(out_dir / "net_scale_nr.pth", model.natural_scale)
    save_network_file(out_dir / "net_scale_fr.pth", model.fidelity_scale)
    save_network_file(out_dir / "net_finalscore.pth", model.adapter)
    save_afine(out_dir / "afine.pth", model.parts())


def train(cfg: Stage3Config, d: Dist) -> AFINE:
    resolve_stage_dirs(cfg)
    read_nr_init(cfg)
    data = TripletDataset.from_lists(cfg.data_root, cfg.train_datasets, "Train", augment=True, seed=cfg.seed)
    val_sets = validation_sets(cfg.data_root, cfg.val_datasets) if cfg.val_every else []
    model = build_model(cfg).to(d.device)
    trained = {"natural_scale": model.natural_scale, "fidelity_scale": model.fidelity_scale,
               "adapter": model.adapter}
    lrs = {"natural_scale": cfg.lr.natural_scale, "fidelity_scale": cfg.lr.fidelity_scale,
           "adapter": cfg.lr.adapter}
    t = Trainer(cfg, d, model, trained, lrs, data)
    t.fit(losses=lambda batch: triplet_losses(model, batch, d.device, cfg.amp),
          scores=lambda batch: distortion_scores(model, batch, d.device, cfg.amp),
          val_sets=val_sets, write_official_files=lambda out: write_official_files(model, out))
    return model


def main(argv: list[str] | None = None) -> int:
    return trainer.main(train, Stage3Config, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
