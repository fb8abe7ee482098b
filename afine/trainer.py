"""What the three training stages share: the run folder, exact resume, the update step, validation, logging.

A stage script builds its model, says which modules it trains (each an AdamW parameter group with its
own lr) and how a batch becomes per-triplet losses and validation scores; Trainer does the rest:

    trainer = Trainer(cfg, d, model, {"natural": model.natural}, {"natural": cfg.lr.natural}, train_data)
    if trainer.should_validate(): trainer.validate(scores, val_sets)     # the untrained start
    for batch in trainer:                                               # shape-grouped batches, resumed position
        trainer.update(losses(model, batch))                            # global mean, synced grads, NaN guard
        if trainer.should_validate(): trainer.validate(scores, val_sets)
        if trainer.should_save(): trainer.save(write_official_files)
    trainer.close()

Run folder (`out_dir`): config.json (the resolved config), the stage's official files, log.jsonl, and
state/step_XXXXXXXX.pt + .json (the training state and its checksum; the last two are kept). Starting
again with the same out_dir resumes from the newest intact state; a damaged one is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import config as configs
from . import distributed
from .atomic import write_json
from .checkpoint import PART_FILES, atomic_save, load_strict
from .datasets import (
    ImageIndex,
    TripletDataset,
    collate_triplets,
    diffiqa_type_files,
    images_dir,
    resolve_triplets,
)
from .distributed import Dist
from .errors import AfineError
from .metrics import two_afc_accuracy
from .sampler import ShapeGroupedBatchSampler
from .schedule import cosine_restart_lr

STATE_VERSION = 1
KEEP_STATES = 2
OFFICIAL_FILES = (*PART_FILES.values(), "afine.pth")


# ---------------------------------------------------------------------------------------------- batches


def distinct_images(batch: dict, names: tuple[str, ...] = ("x1", "x2", "y")) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct images of a batch (by their 'keys': file and augmentation), each once, and where each
    triplet's images are among them: (images [U, 3, H, W], index [len(names), B])."""
    column = {"x1": 0, "x2": 1, "y": 2}
    keys = [triplet[column[name]] for name in names for triplet in batch["keys"]]
    slot: dict[str, int] = {}
    first = []
    for pos, key in enumerate(keys):
        if key not in slot:
            slot[key] = len(first)
            first.append(pos)
    stacked = torch.cat([batch[name] for name in names])
    index = torch.tensor([slot[k] for k in keys], dtype=torch.long).view(len(names), -1)
    return stacked[torch.tensor(first, dtype=torch.long)], index


def autocast(device: torch.device, amp: str):
    """Mixed precision for the CLIP forward pass: bf16, fp16 or off."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=amp != "off")


def freeze(model: nn.Module, trained: dict[str, nn.Module]) -> None:
    """Only the trained modules require gradients and are in train mode; everything else is frozen."""
    model.requires_grad_(False).eval()
    for module in trained.values():
        module.requires_grad_(True).train()


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


# ---------------------------------------------------------------------------------------------- state files


def rng_state(device: torch.device) -> dict:
    """torch, CUDA, numpy and Python RNG states (in types torch.load(weights_only=True) accepts)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def state_files(state_dir: Path) -> list[tuple[int, Path]]:
    """(step, state file) of every state file in the folder, newest first."""
    found = []
    for path in state_dir.glob("step_*.pt"):
        try:
            found.append((int(path.stem.split("_")[1]), path))
        except ValueError:
            continue
    return sorted(found, reverse=True)


def check_state_file(path: Path) -> dict | None:
    """The state's metadata if the file matches its recorded size and SHA-256, else None."""
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        if path.stat().st_size != meta["bytes"] or sha256(path) != meta["sha256"]:
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------- the trainer


class Trainer:
    """Optimiser, schedule, scaler, sampler position and run folder of one stage's training run."""

    def __init__(self, cfg, d: Dist, model: nn.Module, trained: dict[str, nn.Module], lrs: dict[str, float],
                 data: TripletDataset):
        self.cfg, self.dist, self.model, self.trained, self.data = cfg, d, model, trained, data
        self.device = d.device
        self.out = Path(cfg.out_dir)
        self.state_dir = self.out / "state"
        freeze(model, trained)
        groups = [{"name": name, "params": [p for p in module.parameters()], "lr": lrs[name]}
                  for name, module in trained.items()]
        self.base_lr = dict(lrs)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                           weight_decay=cfg.optim.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.sampler = ShapeGroupedBatchSampler(data.shape, len(data), cfg.batch_size, seed=cfg.seed, rank=d.rank,
                                                world_size=d.world_size, shuffle=cfg.shuffle, drop_last=False)
        self.step = self.epoch = self.position = 0
        self.last_validated = -1
        self.bar = None
        self.log_file = None

        plan = distributed.broadcast_object(d, self._plan_start() if d.is_main else None)
        if plan[0] == "error":
            raise AfineError(plan[1])
        if plan[0] == "resume":
            self._load_state(Path(plan[1]))
        else:
            distributed.broadcast_parameters(d, self.params)  # every rank starts from rank 0's weights
        if d.is_main:
            write_json(self.out / "config.json", configs.to_dict(cfg))
            print(json.dumps(configs.to_dict(cfg), indent=2))
            self.log_file = open(self.out / "log.jsonl", "a")
            self.log({"event": plan[0], "step": self.step, "world_size": d.world_size, "time": time.time()})
            if self.step >= cfg.total_iter:
                print(f"{self.out}: run finished at step {self.step} (total_iter {cfg.total_iter}); nothing to do. "
                      f"Raise total_iter to train on, or --resume=false --overwrite=true to start again.")
            else:
                self.bar = tqdm(total=cfg.total_iter, initial=self.step, unit="step", dynamic_ncols=True,
                                file=sys.stderr)
        self._tick = time.perf_counter()
        self._tick_steps = self._tick_triplets = 0
        distributed.barrier(d)

    # ------------------------------------------------------------------ start: fresh, resume or refuse

    def _plan_start(self) -> tuple[str, str | None]:
        """Rank 0 decides: ('fresh', None), ('resume', state file) or ('error', message)."""
        cfg = self.cfg
        states = state_files(self.state_dir) if self.state_dir.is_dir() else []
        official = [name for name in OFFICIAL_FILES if (self.out / name).is_file()]
        if cfg.resume and states:
            for _, path in states:
                meta = check_state_file(path)
                if meta is not None:
                    return self._check_resume(path, meta)
                warn(f"{path}: training state damaged (size or checksum mismatch); trying the previous one")
            return ("error", f"{self.state_dir}: no intact training state left; start afresh with --resume=false")
        finished = any((check_state_file(p) or {}).get("finished") for _, p in states) or (official and not states)
        if finished and not cfg.overwrite:
            why = "a finished run" if states else f"checkpoint files ({', '.join(official)}) but no training state"
            return ("error", f"{self.out}: holds {why}; pass --overwrite=true to replace it, or use another out_dir")
        self.out.mkdir(parents=True, exist_ok=True)
        for _, path in states:  # a fresh start: drop what an earlier run left here
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
        for name in [*official, "log.jsonl"]:
            (self.out / name).unlink(missing_ok=True)
        return ("fresh", None)

    def _check_resume(self, path: Path, meta: dict) -> tuple[str, str]:
        saved = meta.get("config", {})
        changed = [k for k in configs.differences(saved, configs.to_dict(self.cfg))
                   if k.split(".")[0] not in configs.RESUMABLE_CHANGES]
        if changed:
            return ("error", f"{self.out}: config differs from the run being resumed in "
                             f"{', '.join(changed)}; use the same values, or --resume=false to start afresh")
        if meta["step"] > self.cfg.total_iter:
            return ("error", f"{self.out}: the run is at step {meta['step']}, beyond total_iter {self.cfg.total_iter}")
        return ("resume", str(path))

    def _load_state(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("version") != STATE_VERSION:
            raise AfineError(f"{path}: training state version {state.get('version')}, expected {STATE_VERSION}")
        for name, module in self.trained.items():
            load_strict(module, state["modules"][name], f"{path}[{name}]")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"]) if state["scaler"] else None
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        if state["world_size"] != self.dist.world_size:  # same global batches consumed, rounded up
            self.position = -(-self.position * state["world_size"] // self.dist.world_size)
            if self.dist.is_main:
                warn(f"resuming a {state['world_size']}-process run with {self.dist.world_size} processes: the data "
                     f"order continues at the matching point of epoch {self.epoch}, not bitwise as before")
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank % len(rngs)], self.device)
        self.last_validated = self.step
        if self.dist.is_main:
            self._truncate_log(self.step)
            print(f"resuming {self.out} from {path.name} (step {self.step})", file=sys.stderr)

    def _truncate_log(self, step: int) -> None:
        """Drop log lines of steps after the resumed state (they will be run again)."""
        log = self.out / "log.jsonl"
        if not log.is_file():
            return
        kept = []
        for line in log.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue
        tmp = log.with_name(".log.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, log)

    # ------------------------------------------------------------------ the loop

    def __iter__(self):
        """This rank's batches from the current (epoch, position) until total_iter steps are done."""
        cfg = self.cfg
        while self.step < cfg.total_iter:
            self.data.set_epoch(self.epoch)
            self.sampler.set_epoch(self.epoch, self.position)
            if self.sampler.steps_per_epoch == 0:
                raise AfineError(f"no training batches: {len(self.data)} triplets for {self.dist.world_size} "
                                 f"process(es)")
            loader = torch.utils.data.DataLoader(self.data, batch_sampler=self.sampler, collate_fn=collate_triplets,
                                                 num_workers=cfg.workers, pin_memory=self.device.type == "cuda")
            for batch in loader:
                self.position += 1
                yield batch
                if self.step >= cfg.total_iter:
                    return
            self.epoch += 1
            self.position = 0

    def autocast(self):
        return autocast(self.device, self.cfg.amp)

    def lr(self, step: int) -> dict[str, float]:
        s = self.cfg.schedule
        return {name: cosine_restart_lr(step, base, s.periods, s.restart_weights, s.eta_min)
                for name, base in self.base_lr.items()}

    def update(self, losses: torch.Tensor) -> float:
        """One optimiser step on the mean of the per-triplet losses over all ranks' batches.

        Gradients of the local loss sum are summed over ranks together with the loss and the triplet
        count in one all-reduce, then divided by the global count: every trained parameter (the
        fine-tuned CLIP included) gets the gradient of the global-batch mean on every rank. A NaN or
        inf loss raises before anything is updated, leaving the last saved state as it was.
        """
        step = self.step + 1
        loss_sum = losses.float().sum()
        self.scaler.scale(loss_sum).backward()
        params = [p for p in self.params if p.grad is not None]
        if not params:
            raise AfineError(f"step {step}: no trained parameter received a gradient")
        count = torch.tensor([float(losses.numel())], device=loss_sum.device)
        flat = torch.cat([p.grad.reshape(-1).float() for p in params] + [loss_sum.detach().reshape(1), count])
        distributed.all_reduce_sum(self.dist, flat)
        total = flat[-1]
        grads = flat[:-2].div_(total)
        for p, g in zip(params, grads.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
        # fp16: the scaler skips steps with inf/NaN gradients by itself; otherwise they stop the run like the loss
        grads_ok = torch.isfinite(grads).all() if not self.scaler.is_enabled() else torch.ones((), dtype=torch.bool)
        loss, triplets, ok = torch.stack([flat[-2] / total, total, grads_ok.to(flat)]).tolist()  # one sync
        if not math.isfinite(loss) or not ok:
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss is {loss}" if not math.isfinite(loss) else "a gradient is not finite"
            raise AfineError(f"step {step}: {what}; training stopped (the last saved state in {self.state_dir} "
                             "is intact)")
        lrs = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lrs[group["name"]]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        self._tick_steps += 1
        self._tick_triplets += int(triplets)
        if self.dist.is_main:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{next(iter(lrs.values())):.2e}", refresh=False)
            if self.cfg.log_every and (step % self.cfg.log_every == 0 or step == self.cfg.total_iter):
                seconds = time.perf_counter() - self._tick
                self.log({"step": step, "epoch": self.epoch, "loss": loss, "lr": lrs,
                          "grad_norm": grads.norm().item() / self.scaler.get_scale() if self.scaler.is_enabled()
                          else grads.norm().item(),
                          "steps_per_s": self._tick_steps / seconds, "triplets_per_s": self._tick_triplets / seconds,
                          "time": time.time()})
                self._tick, self._tick_steps, self._tick_triplets = time.perf_counter(), 0, 0
        return loss

    # ------------------------------------------------------------------ validation, saving, logging

    def should_validate(self) -> bool:
        every = self.cfg.val_every
        return bool(every) and self.step != self.last_validated and \
            (self.step % every == 0 or self.step == self.cfg.total_iter)

    def should_save(self) -> bool:
        every = self.cfg.save_every
        return self.step == self.cfg.total_iter or (bool(every) and self.step % every == 0)

    @torch.no_grad()
    def validate(self, scores, sets: list[tuple[str, TripletDataset]]) -> dict[str, float]:
        """2AFC accuracy of g12 per validation list and per dataset, and their mean over datasets.

        Every rank scores its share of the shape-grouped batches; the counts are summed over ranks.

        scores(batch) -> (u1, u2) lower-is-better scores of x1 and x2.
        """
        tick = time.perf_counter()
        counts = torch.zeros(len(sets), 2, dtype=torch.float64)
        for k, (_, data) in enumerate(sets):
            batches = ShapeGroupedBatchSampler(data.shape, len(data), self.cfg.batch_size, shuffle=False)
            mine = batches.epoch_batches()[self.dist.rank::self.dist.world_size]
            loader = torch.utils.data.DataLoader(data, batch_sampler=mine, collate_fn=collate_triplets,
                                                 num_workers=self.cfg.workers,
                                                 pin_memory=self.device.type == "cuda")
            u1, u2, g = [], [], []
            for batch in loader:
                a, b = scores(batch)
                u1.append(a.float().cpu())
                u2.append(b.float().cpu())
                g.append(batch["g12"])
            if g:
                _, correct, pairs = two_afc_accuracy(torch.cat(u1), torch.cat(u2), torch.cat(g))
                counts[k] = torch.tensor([correct, pairs], dtype=torch.float64)
        counts = distributed.all_reduce_sum(self.dist, counts.to(self.device)).cpu()
        accuracy = {name: (c / n).item() if n else float("nan") for (name, _), (c, n) in zip(sets, counts)}
        pooled: dict[str, torch.Tensor] = {}  # per dataset (DiffIQA's type lists pooled)
        for (name, _), c in zip(sets, counts):
            dataset = name.split("/")[0]
            pooled[dataset] = pooled.get(dataset, 0) + c
        per_dataset = {name: (c[0] / c[1]).item() if c[1] else float("nan") for name, c in pooled.items()}
        accuracy.update(per_dataset)
        valid = [a for a in per_dataset.values() if not math.isnan(a)]
        mean = sum(valid) / len(valid) if valid else float("nan")
        self.last_validated = self.step
        if self.dist.is_main:
            self.log({"step": self.step, "val": accuracy, "val_mean": mean, "val_pairs": int(counts[:, 1].sum()),
                      "val_seconds": time.perf_counter() - tick, "time": time.time()})
            text = ", ".join(f"{name} {a:.3f}" for name, a in accuracy.items())
            message = f"step {self.step}: validation 2AFC mean {mean:.4f} ({text})"
            tqdm.write(message, file=sys.stderr) if self.bar is not None else print(message, file=sys.stderr)
        return {**accuracy, "mean": mean}

    def save(self, write_official_files) -> None:
        """The training state (atomic, with its checksum; the last two kept) and the official files."""
        rngs = distributed.gather_objects(self.dist, rng_state(self.device))
        if self.dist.is_main:
            path = self.state_dir / f"step_{self.step:08d}.pt"
            state = {"version": STATE_VERSION, "step": self.step, "epoch": self.epoch, "position": self.position,
                     "world_size": self.dist.world_size, "config": configs.to_dict(self.cfg),
                     "modules": {name: {k: v.detach().cpu() for k, v in m.state_dict().items()}
                                 for name, m in self.trained.items()},
                     "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                     "rng": rngs}
            atomic_save(state, path)
            finished = self.step >= self.cfg.total_iter
            write_json(path.with_suffix(".json"), {"step": self.step, "finished": finished,
                                                   "bytes": path.stat().st_size, "sha256": sha256(path),
                                                   "config": configs.to_dict(self.cfg)})
            for _, old in state_files(self.state_dir)[KEEP_STATES:]:
                old.unlink(missing_ok=True)
                old.with_suffix(".json").unlink(missing_ok=True)
            write_official_files(self.out)
            self.log({"step": self.step, "saved": path.name, "finished": finished, "time": time.time()})
        distributed.barrier(self.dist)

    def log(self, record: dict) -> None:
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def fit(self, losses, scores, val_sets: list[tuple[str, TripletDataset]], write_official_files) -> None:
        """The training loop every stage shares: validate at the start and every val_every steps, one
        optimiser step per batch (`losses(batch)` -> per-triplet losses [B]), save every save_every steps.

        `scores(batch)` -> (u1, u2) for validation; `write_official_files(out_dir)` writes the stage's files.
        """
        try:
            if self.should_validate():
                self.validate(scores, val_sets)
            for batch in self:
                self.update(losses(batch))
                if self.should_validate():
                    self.validate(scores, val_sets)
                if self.should_save():
                    self.save(write_official_files)
        finally:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- entry point


def main(train, config_class, argv: list[str] | None, doc: str) -> int:
    """Parse the config, join the process group, run `train(cfg, dist)`; user mistakes -> one line, exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(f"{doc.strip()}\n\nConfig keys (defaults; JSON file via --config, override with --key=value):\n"
              f"{configs.usage(config_class)}")
        return 0
    d = None
    try:
        cfg = configs.parse_args(config_class, argv)
        d = distributed.setup(cfg.device)
        train(cfg, d)
    except AfineError as e:
        if d is None or d.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if d is None or d.is_main:
            print("interrupted; run the same command again to resume from the last saved state", file=sys.stderr)
        return 130
    finally:
        if d is not None:
            distributed.close(d)
    return 0
