"""What one training step needs, shared by the three stages as plain functions; each train_stageN.py writes its
own loop with them: the config every stage has, the optimiser and what trains, the loader, the gradient all-reduce,
the learning-rate schedule, logging and validation (docs/training.md). The run folder (lock, resume, saving, the
log file) is afine/runfolder.py.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import config as configs
from . import distributed, interrupts
from .batches import shape_groups
from .datasets import ImageIndex, TripletDataset, collate_triplets, diffiqa_type_files, images_dir, resolve_triplets
from .errors import AfineError, report, unwrap_worker_error
from .metrics import two_afc_accuracy
from .runfolder import Run, log, require_tensorboard, state_files
from .schedule import cosine_restart_lr

# ---------------------------------------------------------------------------------------------- configuration


AMP = ("bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")
ALL = ["DiffIQA", "KADID10K", "PIPAL", "TID2013"]
TRADITIONAL = ["KADID10K", "PIPAL", "TID2013"]


@dataclass
class Optim:
    """AdamW settings shared by the stage's parameter groups (each group has its own lr)."""

    weight_decay: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8


@dataclass
class Schedule:
    """Cosine annealing with restarts: period i starts at sum(periods[:i]) with peak lr restart_weights[i] * lr."""

    periods: list[int] = field(default_factory=lambda: [10000, 10000, 10000, 10000])
    restart_weights: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.5, 0.5])
    eta_min: float = 1e-8


@dataclass
class RunConfig:
    """Fields every stage has."""

    data_root: str = "data"  # folder holding DiffIQA/, KADID10K/, PIPAL/, TID2013/
    out_dir: str = ""  # the run folder: config.json, official files, best/, state/, log.jsonl
    seed: int = 0
    total_iter: int = 40000
    batch_size: int = 32  # triplets per process and micro-step: global batch = batch_size x grad_accum x processes
    grad_accum: int = 1  # one process doing the work of several (same global batch, same result)
    micro_batch: int = 0  # at most this many images per CLIP forward pass (3 per triplet); 0: no cap
    amp: str = "off"  # off (float32, as published) | bf16 | fp16 (with a gradient scaler)
    compile: bool = False  # compile CLIP with torch.compile, once per shape (docs/training.md, "Compiled kernels")
    val_every: int = 1000  # 0: no validation
    save_every: int = 1000  # training state + official files every this many steps (and at the end)
    keep_saves: bool = False  # also keep every save's official files in saves/step_XXXXXXXX/
    log_every: int = 10  # one log.jsonl line every this many steps
    tensorboard: bool = False  # also write the logged curves to out_dir/tb/ (needs the tensorboard package)
    train_datasets: list[str] = field(default_factory=lambda: list(ALL))
    val_datasets: list[str] = field(default_factory=lambda: list(ALL))
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    workers: int = 4  # DataLoader worker processes per rank
    shuffle: bool = True  # false: triplets in list order every epoch (for reproducibility checks)
    init_from: str = ""  # start the trained parts from this afine.pth or run folder (fine-tuning) instead of afresh
    resume: bool = True  # continue the run in out_dir if it has a training state
    overwrite: bool = False  # allowed to replace what out_dir holds when not resuming
    optim: Optim = field(default_factory=Optim)
    schedule: Schedule = field(default_factory=Schedule)
    required: typing.ClassVar[tuple[str, ...]] = ()  # path fields a stage cannot do without

    def check(self) -> None:
        """Value checks beyond types: finite numbers in range, known choices, consistent schedule."""
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise AfineError(f"config key {key!r}: {why}")

        need(self.amp in AMP, "amp", f"expected one of {', '.join(AMP)}, got {self.amp!r}")
        need(self.device in DEVICES, "device", f"expected one of {', '.join(DEVICES)}, got {self.device!r}")
        need(bool(self.out_dir), "out_dir", "a run folder is needed")
        for key in ("total_iter", "batch_size", "grad_accum"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("val_every", "save_every", "log_every", "workers", "micro_batch"):
            need(getattr(self, key) >= 0, key, "must be >= 0")
        need(bool(self.train_datasets), "train_datasets", "at least one dataset is needed")
        s = self.schedule
        need(bool(s.periods) and all(p >= 1 for p in s.periods), "schedule.periods", "positive step counts are needed")
        need(len(s.restart_weights) == len(s.periods), "schedule.restart_weights",
             f"needs one weight per period ({len(s.periods)})")
        numbers = {"schedule.eta_min": s.eta_min, "optim.weight_decay": self.optim.weight_decay,
                   "optim.eps": self.optim.eps,
                   **{f"schedule.restart_weights[{i}]": w for i, w in enumerate(s.restart_weights)},
                   **{f"lr.{k}": v for k, v in dataclasses.asdict(self.lr).items()}}
        for key, value in numbers.items():
            need(math.isfinite(value) and value >= 0, key, f"must be a finite number >= 0, got {value}")
        need(self.optim.eps > 0, "optim.eps", "must be > 0")
        need(len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas), "optim.betas",
             "expected two numbers in [0, 1)")
        for key in self.required:
            need(bool(getattr(self, key)), key, "a path is needed")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            need(not isinstance(value, float) or math.isfinite(value), f.name, f"must be finite, got {value}")


# ---------------------------------------------------------------------------------------------- model and data


def adamw(cfg, trained: dict[str, nn.Module], lrs: dict[str, float]) -> torch.optim.AdamW:
    """Freeze everything but the trained modules (train mode) and give each module an AdamW group."""
    for module in trained.values():
        module.requires_grad_(True).train()
    groups = [{"name": name, "params": list(module.parameters()), "lr": lrs[name], "base_lr": lrs[name]}
              for name, module in trained.items()]
    return torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay)


def freeze(model: nn.Module) -> None:
    """No gradients and eval mode for the whole model (the trained modules are switched back by adamw)."""
    model.requires_grad_(False).eval()


def validation_sets(data_root: str | Path, datasets: list[str]) -> list[tuple[str, TripletDataset]]:
    """The validation lists (no augmentation): one per traditional dataset, one per DiffIQA type."""
    sets = []
    for name in datasets:
        if name == "DiffIQA":
            index = ImageIndex(images_dir(data_root, name, "Validation"))
            for kind, path in diffiqa_type_files(data_root, "Validation").items():
                sets.append((f"DiffIQA/{kind}", TripletDataset(resolve_triplets(path, index), augment=False)))
        else:
            sets.append((name, TripletDataset.from_lists(data_root, [name], "Validation", augment=False)))
    return sets


def loader(data: TripletDataset, batches, workers: int, device: torch.device) -> Iterator[dict]:
    """Collated batches for the lists of triplet keys `batches` yields, decoded by `workers` processes."""
    return interrupts.batches(torch.utils.data.DataLoader(data, batch_sampler=batches, collate_fn=collate_triplets,
                                                          num_workers=workers, pin_memory=device.type == "cuda"))


# ---------------------------------------------------------------------------------------------- one step


def sync_gradients(run: Run, params: list[torch.Tensor], loss_sum: torch.Tensor, global_batch: int,
                   scaler) -> tuple[float, float]:
    """Sum the gradients (already divided by the global batch size) and the loss over ranks in one all-reduce:
    every rank then holds the gradient of the mean loss over the global batch. Returns (mean loss, grad norm).

    A NaN or inf loss (or gradient, without fp16's scaler, which skips such steps itself) stops the run
    before anything is updated.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        raise AfineError(f"step {run.step + 1}: no trained parameter received a gradient")
    flat = torch.cat([p.grad.reshape(-1).float() for p in params] + [loss_sum.detach().float().reshape(1)])
    distributed.all_reduce_sum(run.dist, flat)
    grads = flat[:-1]
    for p, g in zip(params, grads.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))
    ok = torch.isfinite(grads).all() if not scaler.is_enabled() else torch.ones((), dtype=torch.bool)
    loss, norm, ok = torch.stack([flat[-1] / global_batch, grads.norm() / scaler.get_scale(), ok.to(flat)]).tolist()
    if not math.isfinite(loss) or not ok:
        saved = f"the last saved state, step {run.saved}, is intact in {run.state_dir}" if run.saved is not None \
            else "no training state was saved yet"
        what = f"loss is {loss}" if not math.isfinite(loss) else "a gradient is not finite"
        raise AfineError(f"step {run.step + 1}: {what}; training stopped ({saved})")
    return loss, norm


def set_lr(optimizer: torch.optim.Optimizer, cfg, step: int) -> dict[str, float]:
    """Each group's learning rate for update `step` (1-based): cosine annealing with restarts."""
    s = cfg.schedule
    for group in optimizer.param_groups:
        group["lr"] = cosine_restart_lr(step, group["base_lr"], s.periods, s.restart_weights, s.eta_min)
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


def due(step: int, every: int, total: int) -> bool:
    """Validation / saving is due after update `step`: every `every` steps (0: never) and at the end."""
    return step == total or (every > 0 and step % every == 0)


def log_step(run: Run, loss: float, lrs: dict[str, float], grad_norm: float) -> None:
    """Progress bar, and one log.jsonl line every log_every steps (rank 0)."""
    if not run.dist.is_main:
        return
    run.bar.update(1)
    run.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{next(iter(lrs.values())):.2e}", refresh=False)
    every = run.cfg.log_every
    if every and (run.step % every == 0 or run.step == run.cfg.total_iter):
        seconds, steps = time.perf_counter() - run.tick[0], run.step - run.tick[1]
        log(run, {"step": run.step, "loss": loss, "lr": lrs, "grad_norm": grad_norm, "steps_per_s": steps / seconds})
        run.tick = (time.perf_counter(), run.step)


# ---------------------------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(run: Run, sets: list[tuple[str, TripletDataset]], scores: Callable, caches: list | None = None) -> bool:
    """2AFC accuracy of g12 per validation list and per dataset, and their mean over datasets; logged.
    Every rank scores its share of the shape-grouped batches of decoded images, or with `caches` (one
    afine.cache.CachedList per list) of the lists' cached statistics; the counts are summed over ranks.
    `scores(batch)` -> (u1, u2), lower is better. Returns whether the mean is the best so far."""
    tick, cfg, d = time.perf_counter(), run.cfg, run.dist
    cap = min(cfg.batch_size, max(1, cfg.micro_batch // 3)) if cfg.micro_batch else cfg.batch_size
    counts = torch.zeros(len(sets), 2, dtype=torch.float64)
    for k, (_, data) in enumerate(sets):
        if caches is None:  # images decoded and encoded, grouped by shape
            mine = shape_groups(list(range(len(data))), data.shape, cap)[d.rank::d.world_size]
            batches = loader(data, mine, cfg.workers, d.device)
        else:  # the frozen networks' statistics, read from the list's cache
            mine = [list(range(i, min(i + cap, len(data)))) for i in range(0, len(data), cap)][d.rank::d.world_size]
            batches = map(caches[k].read, mine)
        for batch in batches:
            u1, u2 = scores(batch)
            _, correct, pairs = two_afc_accuracy(u1.float().cpu(), u2.float().cpu(), batch["g12"])
            counts[k] += torch.tensor([correct, pairs], dtype=torch.float64)
    counts = distributed.all_reduce_sum(d, counts.to(d.device)).cpu()
    accuracy = {name: (c / n).item() if n else math.nan for (name, _), (c, n) in zip(sets, counts)}
    pooled: dict[str, torch.Tensor] = {}  # per dataset (DiffIQA's type lists pooled)
    for (name, _), c in zip(sets, counts):
        pooled[name.split("/")[0]] = pooled.get(name.split("/")[0], 0) + c
    per_dataset = {name: (c[0] / c[1]).item() if c[1] else math.nan for name, c in pooled.items()}
    accuracy.update(per_dataset)
    valid = [a for a in per_dataset.values() if not math.isnan(a)]
    mean = sum(valid) / len(valid) if valid else math.nan
    best = mean > run.best["val_mean"]
    if best:
        run.best = {"step": run.step, "val_mean": mean}
    log(run, {"step": run.step, "val": accuracy, "val_mean": mean, "val_pairs": int(counts[:, 1].sum()),
              "val_seconds": time.perf_counter() - tick, **({"best": "best/"} if best else {})})
    if d.is_main:
        text = ", ".join(f"{name} {a:.3f}" for name, a in accuracy.items())
        (run.bar.write if run.bar else print)(f"step {run.step}: validation 2AFC mean {mean:.4f} ({text})",
                                              file=sys.stderr)
    return best


# ---------------------------------------------------------------------------------------------- entry point


def main(train: Callable, config_class, argv: list[str] | None, doc: str) -> int:
    """Parse the config, join the process group, run `train(cfg, dist)`; user mistakes -> one line, exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(f"{doc.strip()}\n\nConfig keys (defaults; JSON file via --config, override with --key=value):\n"
              f"{configs.usage(config_class)}")
        return 0
    cfg = d = None
    try:
        cfg = configs.parse_args(config_class, argv)
        if cfg.tensorboard:
            require_tensorboard()  # before any work
        d = distributed.setup(cfg.device)
        with interrupts.handled():
            train(cfg, d)
    except KeyboardInterrupt:
        if d is not None and not d.is_main:
            return interrupts.stopped(None)
        saved = state_files(Path(cfg.out_dir) / "state") if cfg is not None else None
        return interrupts.stopped(
            "interrupted" if saved is None else
            f"interrupted; run the same command again to resume from step {saved[0][0]} (the last save)" if saved
            else "interrupted before the first save; run the same command again to start afresh")
    except Exception as e:  # noqa: BLE001 - user mistakes (also raised in DataLoader workers) become one line
        error = unwrap_worker_error(e)
        if not isinstance(error, AfineError):
            raise
        if d is None or d.is_main:
            report(error)
        return 2
    finally:
        if d is not None:
            distributed.close(d)
    return 0
