"""What the three training stages share, as plain functions; each train_stageN.py writes its own loop with them.

Run folder (`out_dir`): config.json (the resolved config), the stage's official files (the latest save),
best/ (the official files of the validation with the best mean accuracy), saves/step_XXXXXXXX/ (every save's
official files, with keep_saves), built_on.json (SHA-256 of the earlier stages' files it was trained on, by path
relative to the run folder, as config.json names their folders: a runs tree moved whole still resumes and loads),
log.jsonl, state/step_XXXXXXXX.pt + .json (training state and its checksum; the last two kept), and with
tensorboard the same curves as log.jsonl in tb/ (README, "Curves and plots").
A run holds a lock on its folder. Starting again with the same out_dir resumes bitwise from the newest
intact state; a damaged one is skipped with a warning. Training draws no random numbers (batch order and
augmentation are functions of seed, epoch and index), so a state is weights, optimiser, scaler and step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import config as configs
from . import distributed, interrupts
from .atomic import atomic_write, write_json
from .batches import shape_groups
from .checkpoint import EARLIER_RUNS, PART_FILES, atomic_save, digests_by_name, load_strict, sha256
from .datasets import ImageIndex, TripletDataset, collate_triplets, diffiqa_type_files, images_dir, resolve_triplets
from .distributed import Dist
from .errors import AfineError, optional_import, unwrap_worker_error, warn
from .metrics import two_afc_accuracy
from .schedule import cosine_restart_lr

STATE_VERSION = 2
KEEP_STATES = 2
OFFICIAL_FILES = (*PART_FILES.values(), "afine.pth")


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


# Fields a resumed run may change: they do not alter the training trajectory (the global batch is checked apart).
RESUMABLE = ("total_iter", "val_every", "save_every", "keep_saves", "log_every", "val_datasets", "workers", "device",
             "checkpoint_blocks", "resume", "overwrite", "data_root", "out_dir", "stage1_dir", "stage2_dir",
             "batch_size", "grad_accum", "micro_batch", "cache", "cache_dir", "tensorboard")


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


# ---------------------------------------------------------------------------------------------- the run folder


def lists_digest(data: TripletDataset, data_root: str | Path) -> str:
    """SHA-256 of what a run trains on: its triplets in order, image paths relative to data_root, and labels
    (a moved copy of the same data gives the same digest)."""
    root = str(Path(data_root)) + os.sep
    rows = "\n".join(f"{str(x1).removeprefix(root)}\t{str(x2).removeprefix(root)}\t{str(y).removeprefix(root)}\t"
                     f"{g12!r}\t{g1y!r}\t{g2y!r}" for x1, x2, y, g12, g1y, g2y in data.items)
    return hashlib.sha256(rows.encode()).hexdigest()


@dataclass
class Run:
    """Where a training run stands: its folder, step, best validation, log and progress bar."""

    cfg: object
    dist: Dist
    out: Path
    train_lists: str = ""  # lists_digest of the training lists
    step: int = 0
    best: dict = field(default_factory=lambda: {"step": None, "val_mean": -math.inf})
    saved: int | None = None  # step of the newest state on disk
    built_on: dict = field(default_factory=dict)  # {path relative to out: SHA-256} of the earlier stages' files
    log_file: object = None
    curves: object = None  # TensorBoard writer on tb/, with tensorboard
    bar: object = None
    lock: object = None
    tick: tuple = (0.0, 0)

    @property
    def state_dir(self) -> Path:
        return self.out / "state"

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        for handle in (self.bar, self.curves, self.log_file, self.lock):
            if handle is not None:
                handle.close()
        self.bar = self.curves = self.log_file = self.lock = None


def state_files(state_dir: Path) -> list[tuple[int, Path]]:
    """(step, state file) of every state file in the folder, newest first."""
    found = []
    for path in state_dir.glob("step_*.pt") if state_dir.is_dir() else []:
        with contextlib.suppress(ValueError):
            found.append((int(path.stem.split("_")[1]), path))
    return sorted(found, reverse=True)


def check_state_file(path: Path) -> dict | None:
    """The state's metadata if the file matches its recorded size and SHA-256, else None."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        if path.stat().st_size != meta["bytes"] or sha256(path) != meta["sha256"]:
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lock_folder(out: Path):
    """An exclusive lock on out_dir/.lock held for the run; a second run on the folder fails naming the holder.

    A POSIX record lock (fcntl): it belongs to this process alone, not to the DataLoader workers it forks (which
    share a flock), so the kernel frees it the moment the process dies, however it dies."""
    if out.exists() and not out.is_dir():
        raise AfineError(f"{out}: out_dir is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / ".lock", "a+")
    except OSError as e:
        raise AfineError(f"{out}: cannot use as run folder ({e.strerror})") from None
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise AfineError(f"{out}: in use by another training run ({holder}); wait for it or use another out_dir") \
            from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def remove_leftovers(out: Path) -> None:
    """Temporary files of a killed run (each may be a whole training state) and half-swapped best/ folders."""
    for folder in (out, out / "state", out / "best", *out.glob("saves/step_*")):
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
            tmp.unlink(missing_ok=True)
    if (out / "best.old").is_dir() and not (out / "best").is_dir():
        os.replace(out / "best.old", out / "best")
    for name in ("best.tmp", "best.old"):
        shutil.rmtree(out / name, ignore_errors=True)


def relative_paths(digests: dict[str, str], out: Path) -> dict[str, str]:
    """{path: SHA-256} with each path relative to the run folder, as built_on.json records them (a runs tree moved
    whole keeps them true; only the names and digests are compared)."""
    return {os.path.relpath(Path(path).resolve(), out.resolve()): digest for path, digest in digests.items()}


def recorded_config(cfg) -> dict:
    """The config as config.json and each save record it: the earlier stages' run folders relative to the run
    folder, so that evaluate.py, load_afine and a later stage find them in a runs tree moved whole."""
    saved = configs.to_dict(cfg)
    out = Path(cfg.out_dir).resolve()
    for key in EARLIER_RUNS:
        if saved.get(key):
            saved[key] = os.path.relpath(Path(saved[key]).resolve(), out)
    return saved


def fixed_keys_changed(saved: dict, cfg) -> list[str]:
    """Dotted keys of `cfg` that differ from the saved config dict and that a resumed run may not change."""
    return [k for k in configs.differences(saved, configs.to_dict(cfg)) if k.split(".")[0] not in RESUMABLE]


def _plan(cfg, d: Dist, out: Path, global_batch: int, built_on: dict, train_lists: str) -> tuple[str, str | None]:
    """Rank 0 decides: ('fresh', None) or ('resume', state file); user mistakes raise."""
    states = state_files(out / "state")
    if cfg.resume and states:
        for _, path in states:
            meta = check_state_file(path)
            if meta is None:
                warn(f"{path}: training state damaged (size or checksum mismatch); trying the previous one")
                continue
            changed = fixed_keys_changed(meta.get("config", {}), cfg)
            if changed:
                raise AfineError(f"{out}: config differs from the run being resumed in {', '.join(changed)}; use "
                                 "the same values, or --resume=false --overwrite=true to start afresh")
            if meta.get("global_batch") != global_batch:
                raise AfineError(f"{out}: global batch {global_batch} (batch_size x grad_accum x {d.world_size} "
                                 f"processes) differs from the run's {meta.get('global_batch')}; match it to resume")
            recorded = digests_by_name(meta.get("built_on", {}), str(path.with_suffix(".json")))
            now = digests_by_name(built_on, "built_on")
            if recorded != now:
                changed = sorted(set(recorded) ^ set(now) | {k for k in recorded if recorded[k] != now.get(k)})
                raise AfineError(f"{out}: was trained on other earlier-stage files than now ({', '.join(changed)} "
                                 "changed or differ); resume with the same stage folders or start afresh")
            if "train_lists" not in meta:
                warn(f"{path}: records no digest of the training lists (saved by an older version); not checked")
            elif meta["train_lists"] != train_lists:
                raise AfineError(f"{out}: the training lists under data_root {cfg.data_root} differ from those the "
                                 "run was trained on (other triplets, order or labels); resume on the same data, "
                                 "or start afresh with --resume=false --overwrite=true")
            if meta["step"] > cfg.total_iter:
                raise AfineError(f"{out}: the run is at step {meta['step']}, beyond total_iter {cfg.total_iter}")
            return "resume", str(path)
        raise AfineError(f"{out / 'state'}: no intact training state left; start afresh with --resume=false "
                         "--overwrite=true")
    held = [name for name in (*OFFICIAL_FILES, "best", "saves", "state") if (out / name).exists()]
    if held == ["best"] and _unsaved_start(out, cfg, built_on):
        print(f"{out}: the same run stopped before its first save; starting it afresh", file=sys.stderr)
    elif held and not cfg.overwrite:
        how = "resume it (--resume=true), pass" if states else "it has no training state to resume; pass"
        raise AfineError(f"{out}: holds an earlier run ({', '.join(held)}); {how} --overwrite=true to replace it, "
                         "or use another out_dir")
    for name in held + ["log.jsonl", "built_on.json", "tb"]:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return "fresh", None


def _unsaved_start(out: Path, cfg, built_on: dict) -> bool:
    """Whether out_dir holds only the step-0 validation of this same run (stopped before its first save), which
    a fresh start writes again: nothing to lose, so the same command starts afresh without --overwrite."""
    try:
        best = json.loads((out / "best" / "best.json").read_text())
        saved = json.loads((out / "config.json").read_text())
        saved_on = json.loads((out / "built_on.json").read_text())
    except (OSError, ValueError):
        return False
    try:
        same_files = digests_by_name(saved_on, "") == digests_by_name(built_on, "")
    except AfineError:
        return False
    return best.get("step") == 0 and not fixed_keys_changed(saved, cfg) and same_files


def start(cfg, d: Dist, trained: dict[str, nn.Module], optimizer, scaler, global_batch: int, data: TripletDataset,
          built_on: dict | None = None) -> Run:
    """Lock the run folder, then start afresh (every rank from rank 0's weights) or resume the newest state
    (refused if the training lists `data`, the earlier stages' files `built_on` or fixed config keys changed)."""
    out = Path(cfg.out_dir)
    built_on = relative_paths(built_on or {}, out)
    run = Run(cfg, d, out, built_on=built_on)
    plan = None
    if d.is_main:
        try:
            run.train_lists = lists_digest(data, cfg.data_root)
            run.lock = lock_folder(out)
            remove_leftovers(out)
            plan = _plan(cfg, d, out, global_batch, built_on, run.train_lists)
        except AfineError as e:
            plan = ("error", str(e))
    plan = distributed.broadcast_object(d, plan)
    if plan[0] == "error":
        run.__exit__()
        raise AfineError(plan[1])
    if plan[0] == "resume":
        path = Path(plan[1])
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("version") != STATE_VERSION:
            raise AfineError(f"{path}: training state version {state.get('version')}, expected {STATE_VERSION}")
        for name, module in trained.items():
            load_strict(module, state["modules"][name], f"{path}[{name}]")
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        run.step = run.saved = state["step"]
        run.best = state["best"]
    else:
        distributed.broadcast_parameters(d, [p for m in trained.values() for p in m.parameters()])
    if d.is_main:
        write_json(out / "config.json", recorded_config(cfg))
        write_json(out / "built_on.json", built_on)
        print(json.dumps(recorded_config(cfg), indent=2))
        if plan[0] == "resume":
            _truncate_log(out / "log.jsonl", run.step)
            print(f"resuming {out} from {Path(plan[1]).name} (step {run.step})", file=sys.stderr)
        run.log_file = open(out / "log.jsonl", "a")
        log(run, {"event": plan[0], "step": run.step, "world_size": d.world_size, "global_batch": global_batch})
        if cfg.tensorboard:
            run.curves = tensorboard_writer(out)
        if run.step >= cfg.total_iter:
            print(f"{out}: run finished at step {run.step} (total_iter {cfg.total_iter}); nothing to do. Raise "
                  "total_iter to train on, or --resume=false --overwrite=true to start again.")
        else:
            run.bar = tqdm(total=cfg.total_iter, initial=run.step, unit="step", dynamic_ncols=True, file=sys.stderr)
    run.tick = (time.perf_counter(), run.step)
    distributed.barrier(d)
    return run


def _truncate_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after the resumed state (they will be run again). A damaged line (not a log
    record) is kept, with a warning, when a later line is of the resumed step or before; past them, dropped."""
    if not path.is_file():
        return
    lines = log_lines(path)
    last = max((i for i, (_, _, r) in enumerate(lines) if r is not None and r["step"] <= step), default=-1)
    keep = [r["step"] <= step if r is not None else i < last for i, (_, _, r) in enumerate(lines)]
    for kept, what in ((True, "kept (before the resumed step)"), (False, "dropped (past the resumed step)")):
        bad = [n for (n, _, r), k in zip(lines, keep) if r is None and k == kept]
        if bad:
            warn(f"{path}: {line_numbers(bad)} not a log record (a JSON object with an integer \"step\"); {what}")
    kept = "".join(text + "\n" for (_, text, _), k in zip(lines, keep) if k).encode("utf-8", "surrogateescape")
    atomic_write(path, lambda f: f.write(kept))


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


def log(run: Run, record: dict) -> None:
    """One log.jsonl line (rank 0), and its scalars in TensorBoard with tensorboard."""
    record = {**record, "time": time.time()}
    if run.log_file is not None:
        run.log_file.write(json.dumps(record) + "\n")
        run.log_file.flush()
    if run.curves is not None:
        add_scalars(run.curves, record)


def log_lines(path: Path) -> list[tuple[int, str, dict | None]]:
    """(line number, text, record) of each line of a log.jsonl; the record is None where the line is not a JSON
    object with an integer "step" (and numbers as "loss" and "val_mean"). A last line without its newline (a run
    writing it now, or killed while it did) is left out."""
    lines = Path(path).read_bytes().decode("utf-8", "surrogateescape").split("\n")  # damaged bytes kept as they are
    lines.pop()  # "" after the last newline, or the unfinished last line
    found = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and type(record.get("step")) is int
                and all(isinstance(record.get(k, 0.0), (int, float)) for k in ("loss", "val_mean"))):
            record = None
        found.append((n, line, record))
    return found


def line_numbers(numbers: list[int]) -> str:
    """'line 7' or 'lines 3, 8, 9' (the first ten, then how many more)."""
    shown = ", ".join(map(str, numbers[:10])) + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")
    return f"line{'s' if len(numbers) > 1 else ''} {shown}"


def read_log(path: Path, quiet: bool = False) -> list[dict]:
    """The records of a log.jsonl; a line that is not one (damaged) is skipped with a warning naming the file and
    line, unless `quiet`; an unfinished last line (a run writing it now) silently."""
    lines = log_lines(path)
    bad = [n for n, _, r in lines if r is None]
    if bad and not quiet:
        warn(f"{path}: {line_numbers(bad)} not a log record (a JSON object with an integer \"step\"); skipped")
    return [r for _, _, r in lines if r is not None]


def require_tensorboard():
    """TensorBoard's SummaryWriter (optional package `tensorboard`; imported only by runs that use it)."""
    return optional_import("torch.utils.tensorboard", "tensorboard", "tensorboard",
                           "--tensorboard=true").SummaryWriter


def tensorboard_writer(out: Path):
    """A TensorBoard writer on out_dir/tb/, which it first rewrites from log.jsonl (a resume has cut the log
    back to the resumed step): the curves continue with every step once, whatever a killed run wrote past its
    last save, and a resume that turns tensorboard on gets the curves from step 0."""
    writer_class = require_tensorboard()
    shutil.rmtree(out / "tb", ignore_errors=True)
    writer = writer_class(str(out / "tb"), flush_secs=10)
    for record in read_log(out / "log.jsonl", quiet=True):  # a resume has just warned about damaged lines
        add_scalars(writer, record)
    return writer


def add_scalars(writer, record: dict) -> None:
    """A log.jsonl record's scalars at its step and time: loss, learning rate per group, gradient norm and
    speed of a logged step; validation accuracy per list and per dataset, and their mean."""
    if "loss" in record:
        scalars = {"train/loss": record["loss"], "train/grad_norm": record["grad_norm"],
                   "train/steps_per_s": record["steps_per_s"], **{f"lr/{k}": v for k, v in record["lr"].items()}}
    elif "val" in record:
        scalars = {**{f"val/{k}": v for k, v in record["val"].items()}, "val/mean": record["val_mean"]}
    else:
        return
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, record["step"], walltime=record["time"])


# ---------------------------------------------------------------------------------------------- validate, save


@torch.no_grad()
def validate(run: Run, sets: list[tuple[str, TripletDataset]], scores: Callable, model: nn.Module,
             caches: list | None = None) -> bool:
    """2AFC accuracy of g12 per validation list and per dataset, and their mean over datasets; logged.
    Every rank scores its share of the shape-grouped batches, or with `caches` (one afine.cache.CachedList per
    list) of the lists' cached statistics; the counts are summed over ranks.
    `scores(model, batch, run)` -> (u1, u2), lower is better. Returns whether the mean is the best so far."""
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
            u1, u2 = scores(model, batch, run)
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


def write_official(folder: Path, files: dict[str, object]) -> None:
    """The stage's official network files (name -> object for torch.save), each written atomically."""
    for name, obj in files.items():
        atomic_save(obj, folder / name)


def write_best(run: Run, files: dict[str, object]) -> None:
    """best/: the official files of the best validation so far, swapped in whole (never half old, half new)."""
    if not run.dist.is_main:
        return
    tmp, best, old = run.out / "best.tmp", run.out / "best", run.out / "best.old"
    shutil.rmtree(tmp, ignore_errors=True)
    write_official(tmp, files)
    write_json(tmp / "best.json", run.best)
    if best.is_dir():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)


def save(run: Run, trained: dict[str, nn.Module], optimizer, scaler, files: dict[str, object],
         global_batch: int) -> None:
    """The training state (atomic, with its checksum; the last two kept) and the official files (rank 0)."""
    if run.dist.is_main:
        path = run.state_dir / f"step_{run.step:08d}.pt"
        state = {"version": STATE_VERSION, "step": run.step, "best": run.best,
                 "modules": {name: {k: v.detach().cpu() for k, v in m.state_dict().items()}
                             for name, m in trained.items()},
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {}}
        atomic_save(state, path)
        finished = run.step >= run.cfg.total_iter
        write_json(path.with_suffix(".json"), {"step": run.step, "finished": finished, "bytes": path.stat().st_size,
                                               "sha256": sha256(path), "global_batch": global_batch,
                                               "built_on": run.built_on, "train_lists": run.train_lists,
                                               "config": recorded_config(run.cfg)})
        for _, stale in state_files(run.state_dir)[KEEP_STATES:]:
            stale.unlink(missing_ok=True)
            stale.with_suffix(".json").unlink(missing_ok=True)
        write_official(run.out, files)
        if run.cfg.keep_saves:
            write_official(run.out / "saves" / f"step_{run.step:08d}", files)
        log(run, {"step": run.step, "saved": path.name, "finished": finished})
    run.saved = run.step
    distributed.barrier(run.dist)


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
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if d is not None:
            distributed.close(d)
    return 0
