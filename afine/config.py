"""Training configurations: one dataclass per stage, read from a JSON file plus `--key=value` overrides.

    python train_stage1.py --config configs/s1.json --batch_size=16 --lr.clip=1e-5 --schedule.periods=[500,500]

Defaults are the published settings (README, "Train the three stages"). Nested fields use dotted names;
`--key value` and hyphens (`--data-root`) are accepted too. Unknown keys, wrong types and out-of-range
values are AfineErrors naming the file or option. Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AfineError

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


# Fields a resumed run may change: they do not alter the training trajectory (the global batch is checked apart).
RESUMABLE = ("total_iter", "val_every", "save_every", "keep_saves", "log_every", "val_datasets", "workers", "device",
             "checkpoint_blocks", "resume", "overwrite", "data_root", "out_dir", "stage1_dir", "stage2_dir",
             "batch_size", "grad_accum", "micro_batch", "cache", "cache_dir")


def _coerce(value, tp, where: str):
    """`value` checked against the field type `tp` (ints accepted for floats; nested dataclasses built)."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise AfineError(f"{where}: expected an object of {', '.join(f.name for f in dataclasses.fields(tp))}")
        return build(tp, value, where)
    if typing.get_origin(tp) is list:
        if isinstance(value, list):
            return [_coerce(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    elif tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise AfineError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {json.dumps(value)}")


def _fields(cls) -> dict:
    """Field name -> type of a dataclass (class variables left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build(cls, raw: dict, where: str):
    """A dataclass from a dict: every key known, every value of its field's type."""
    hints = _fields(cls)
    for key in raw:
        if key not in hints:
            raise AfineError(f"{where}: unknown key {key!r} (known: {', '.join(hints)})")
    return cls(**{k: _coerce(v, hints[k], f"{where}: key {k!r}") for k, v in raw.items()})


def _cli_value(text: str, tp, option: str):
    """A command-line string as a value of type tp: strings raw, booleans true/false, lists JSON or 'a,b,c'."""
    if tp is str:
        return text
    if tp is bool:
        if text.lower() not in ("true", "false"):
            raise AfineError(f"{option}: expected true or false, got {text!r}")
        return text.lower() == "true"
    try:
        return json.loads(text)
    except ValueError:
        if typing.get_origin(tp) is list:
            item = typing.get_args(tp)[0]
            return [_cli_value(p.strip(), item, option) for p in text.strip("[]").split(",") if p.strip()]
        raise AfineError(f"{option}: expected {getattr(tp, '__name__', tp)}, got {text!r}") from None


def parse_args(cls, argv: list[str]):
    """`--config FILE` (optional) then `--key=value` / `--key value` overrides -> a checked config of `cls`."""
    args, raw, where, overrides = list(argv), {}, "defaults", []
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise AfineError(f"unexpected argument {arg!r}; use --config FILE and --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if not args:
                raise AfineError(f"{arg}: a value is needed (--{key}=VALUE)")
            value = args.pop(0)
        key = key.replace("-", "_")
        if key == "config":
            path = Path(value)
            try:
                raw = json.loads(path.read_text())
            except OSError as e:
                raise AfineError(f"{path}: cannot read config file ({e.strerror})") from None
            except ValueError as e:
                raise AfineError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(raw, dict):
                raise AfineError(f"{path}: expected a JSON object of config keys")
            where = str(path)
            build(cls, raw, where)  # the file's own mistakes are named before any override applies
        else:
            overrides.append((key, value, arg.partition("=")[0]))
    for key, text, option in overrides:
        node, tp, *parents = raw, cls, *key.split(".")
        leaf = parents.pop()
        for name in parents:
            tp = _fields(tp).get(name) if dataclasses.is_dataclass(tp) else None
            if not dataclasses.is_dataclass(tp) or not isinstance(node.setdefault(name, {}), dict):
                raise AfineError(f"{option}: unknown config key {key!r}")
            node = node[name]
        hints = _fields(tp)
        if leaf not in hints:
            raise AfineError(f"{option}: unknown config key {key!r} (--help lists them)")
        if dataclasses.is_dataclass(hints[leaf]):
            raise AfineError(f"{option}: {key!r} is a group; set its fields ({key}.<name>=...)")
        node[leaf] = _cli_value(text, hints[leaf], option)
    cfg = build(cls, raw, f"{where} + command line" if overrides else where)
    check(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def check(cfg) -> None:
    """Value checks beyond types: finite numbers in range, known choices, consistent schedule."""
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise AfineError(f"config key {key!r}: {why}")

    need(cfg.amp in AMP, "amp", f"expected one of {', '.join(AMP)}, got {cfg.amp!r}")
    need(cfg.device in DEVICES, "device", f"expected one of {', '.join(DEVICES)}, got {cfg.device!r}")
    need(bool(cfg.out_dir), "out_dir", "a run folder is needed")
    for key in ("total_iter", "batch_size", "grad_accum"):
        need(getattr(cfg, key) >= 1, key, "must be >= 1")
    for key in ("val_every", "save_every", "log_every", "workers", "micro_batch"):
        need(getattr(cfg, key) >= 0, key, "must be >= 0")
    need(bool(cfg.train_datasets), "train_datasets", "at least one dataset is needed")
    s = cfg.schedule
    need(bool(s.periods) and all(p >= 1 for p in s.periods), "schedule.periods", "positive step counts are needed")
    need(len(s.restart_weights) == len(s.periods), "schedule.restart_weights",
         f"needs one weight per period ({len(s.periods)})")
    numbers = {"schedule.eta_min": s.eta_min, "optim.weight_decay": cfg.optim.weight_decay, "optim.eps": cfg.optim.eps,
               **{f"schedule.restart_weights[{i}]": w for i, w in enumerate(s.restart_weights)},
               **{f"lr.{k}": v for k, v in dataclasses.asdict(cfg.lr).items()}}
    for key, value in numbers.items():
        need(math.isfinite(value) and value >= 0, key, f"must be a finite number >= 0, got {value}")
    need(cfg.optim.eps > 0, "optim.eps", "must be > 0")
    need(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
         "expected two numbers in [0, 1)")
    for key in cfg.required:
        need(bool(getattr(cfg, key)), key, "a path is needed")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        need(not isinstance(value, float) or math.isfinite(value), f.name, f"must be finite, got {value}")


def usage(cls) -> str:
    """Every key with its default, for --help."""
    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            else:
                yield f"  --{prefix}{f.name}={value if isinstance(value, str) else json.dumps(value)}"

    return "\n".join(walk(cls(), ""))


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys
