"""The run folder (`out_dir`) of a training stage: lock, fresh start or resume, saving, best/, the log.

config.json (the resolved config), the stage's official files (the latest save), best/ (the official files of the
validation with the best mean accuracy), saves/step_XXXXXXXX/ (every save's official files, with keep_saves),
built_on.json (SHA-256 of the earlier stages' files it was trained on, by path relative to the run folder, as
config.json names their folders: a runs tree moved whole still resumes and loads), log.jsonl, state/step_XXXXXXXX.pt
+ .json (training state and its checksum; the last two kept), and with tensorboard the same curves as log.jsonl in
tb/ (docs/training.md, "Run folders" and "Curves").
A run holds a lock on its folder. Starting again with the same out_dir resumes bitwise from the newest intact
state; a damaged one is skipped with a warning. Training draws no random numbers (batch order and augmentation are
functions of seed, epoch and index), so a state is weights, optimiser, scaler and step (docs/training.md, "Resume").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import config as configs
from . import distributed
from .atomic import atomic_write, write_json
from .checkpoint import EARLIER_RUNS, PART_FILES, atomic_save, digests_by_name, load_strict, sha256
from .datasets import TripletDataset
from .distributed import Dist
from .errors import AfineError, optional_import, warn

STATE_VERSION = 2
KEEP_STATES = 2
OFFICIAL_FILES = (*PART_FILES.values(), "afine.pth")

# Fields a resumed run may change: they do not alter the training trajectory (the global batch is checked apart).
RESUMABLE = ("total_iter", "val_every", "save_every", "keep_saves", "log_every", "val_datasets", "workers", "device",
             "checkpoint_blocks", "resume", "overwrite", "data_root", "out_dir", "stage1_dir", "stage2_dir",
             "batch_size", "grad_accum", "micro_batch", "cache", "cache_dir", "tensorboard",
             "compile")


# ---------------------------------------------------------------------------------------------- start or resume


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


# ---------------------------------------------------------------------------------------------- the log


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


# ---------------------------------------------------------------------------------------------- saving


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
