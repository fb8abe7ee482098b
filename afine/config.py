"""Training configurations of the three A-FINE stages: one dataclass per stage, from JSON plus `--key=value`.

    python train_stage1.py --config configs/s1.json --batch_size=16 --lr.clip=1e-5 --schedule.periods=[500,500]

Defaults are the published settings (SPEC section 7). A JSON file may set any subset of the fields;
command-line overrides come last and use dotted names for nested fields. Unknown keys and values of
the wrong type are AfineErrors naming the file or option. Dataset names are folders under `data_root`;
every other path (out_dir, clip, stage1_dir, stage2_dir, nr_init_file) is relative to the current folder.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .datasets import DATASETS
from .errors import AfineError
from .mapping import NR_YITA3, NR_YITA4

AMP = ("bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")
RANDOM_TINY = "random-tiny"  # stage 1 `clip`: a small random CLIP (width 64, 3 blocks, patch 16), seeded by `seed`
TRAIN_DATASETS = ["DiffIQA", "KADID10K", "PIPAL", "TID2013"]
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

    data_root: str = "data"  # folder holding KADID10K/, PIPAL/, TID2013/, DiffIQA/
    out_dir: str = ""  # the run folder: config.json, official files, state/, log.jsonl
    seed: int = 0
    total_iter: int = 40000
    batch_size: int = 32  # triplets per process
    amp: str = "off"  # bf16 | fp16 (with a gradient scaler) | off
    val_every: int = 1000  # 0: no validation
    save_every: int = 1000  # training state + official files every this many steps (and at the end)
    log_every: int = 10  # one log.jsonl line every this many steps
    train_datasets: list[str] = field(default_factory=lambda: list(TRAIN_DATASETS))
    val_datasets: list[str] = field(default_factory=lambda: list(TRAIN_DATASETS))
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    workers: int = 4  # DataLoader worker processes per rank
    shuffle: bool = True  # false: fixed batch order (for reproducibility checks)
    resume: bool = True  # continue the run in out_dir if it has a training state
    overwrite: bool = False  # with resume=false: allowed to replace a finished run
    optim: Optim = field(default_factory=Optim)
    schedule: Schedule = field(default_factory=Schedule)


@dataclass
class Stage1LR:
    clip: float = 5e-6
    natural: float = 5e-6


@dataclass
class Stage1Config(RunConfig):
    """Stage 1: fine-tune CLIP (all weights) and train the naturalness head."""

    clip: str = "data/ViT-B-32.pt"  # OpenAI ViT-B-32.pt, a plain CLIP state dict, or "random-tiny"
    checkpoint_blocks: bool = False  # recompute CLIP blocks in the backward pass (saves activation memory)
    lr: Stage1LR = field(default_factory=Stage1LR)


@dataclass
class Stage2LR:
    fidelity: float = 5e-4


@dataclass
class Stage2Config(RunConfig):
    """Stage 2: train the fidelity head on the frozen stage-1 CLIP."""

    batch_size: int = 128
    val_every: int = 500
    save_every: int = 500
    train_datasets: list[str] = field(default_factory=lambda: list(TRADITIONAL))
    val_datasets: list[str] = field(default_factory=lambda: list(TRADITIONAL))
    stage1_dir: str = ""  # stage-1 run folder (clip_model.pth)
    lr: Stage2LR = field(default_factory=Stage2LR)


@dataclass
class Stage3LR:
    natural_scale: float = 1e-3
    fidelity_scale: float = 1e-3
    adapter: float = 1e-3


@dataclass
class Stage3Config(RunConfig):
    """Stage 3: train the NR and FR mappings and the adapter k, everything else frozen."""

    batch_size: int = 128
    val_every: int = 500
    save_every: int = 500
    stage1_dir: str = ""  # stage-1 run folder (clip_model.pth, net_qhead.pth); "": the one stage2_dir names
    stage2_dir: str = ""  # stage-2 run folder (net_dhead.pth)
    nr_yita3: float = NR_YITA3  # NR-mapping start (published fit_gamma values) ...
    nr_yita4: float = NR_YITA4
    nr_init_file: str = ""  # ... or fit_gamma's JSON output {"yita3": ..., "yita4": ...}, which then wins
    lr: Stage3LR = field(default_factory=Stage3LR)


STAGES = {1: Stage1Config, 2: Stage2Config, 3: Stage3Config}

# Fields a resumed run may change: they do not alter the training trajectory.
RESUMABLE_CHANGES = ("total_iter", "val_every", "save_every", "log_every", "val_datasets", "workers", "device",
                     "checkpoint_blocks", "resume", "overwrite", "data_root", "out_dir", "stage1_dir", "stage2_dir")


# ---------------------------------------------------------------------------------------------- parsing


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str):
    """Check (and, for CLI strings, convert) one value against a field type."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise AfineError(f"{where}: expected an object of {', '.join(f.name for f in dataclasses.fields(tp))}")
        return _build(tp, value, where)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise AfineError(f"{where}: expected a list, got {json.dumps(value)}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise AfineError(f"{where}: expected {_type_name(tp)}, got {json.dumps(value)}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _build(cls, raw: dict, where: str):
    """A dataclass from a dict, every key known and every value of the field's type."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise AfineError(f"{where}: unknown key {key!r} (known: {', '.join(names)})")
    return cls(**{k: _coerce(v, hints[k], f"{where}: key {k!r}") for k, v in raw.items()})


def _parse_cli_value(text: str, tp, option: str):
    """A command-line value for a field of type tp: strings raw, other types as JSON (lists also 'a,b,c')."""
    if tp is str:
        return text
    if tp is bool:
        low = text.lower()
        if low in ("true", "yes", "1"):
            return True
        if low in ("false", "no", "0"):
            return False
        raise AfineError(f"{option}: expected true or false, got {text!r}")
    try:
        return json.loads(text)
    except ValueError:
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            parts = [p.strip() for p in text.strip("[]").split(",") if p.strip()]
            return [p if item is str else _parse_cli_value(p, item, option) for p in parts]
        raise AfineError(f"{option}: expected {_type_name(tp)}, got {text!r}") from None


def _set_dotted(cls, raw: dict, dotted: str, text: str, option: str) -> None:
    """raw[a][b]... = value for --a.b=value, checking each name against the dataclass."""
    *parents, leaf = dotted.split(".")
    for name in parents:
        hints = _hints(cls)
        if name not in hints or not dataclasses.is_dataclass(hints[name]):
            raise AfineError(f"{option}: unknown config key {dotted!r}")
        cls = hints[name]
        raw = raw.setdefault(name, {})
        if not isinstance(raw, dict):
            raise AfineError(f"{option}: {name!r} is not an object in the config file")
    hints = _hints(cls)
    if leaf not in hints:
        raise AfineError(f"{option}: unknown config key {dotted!r}")
    if dataclasses.is_dataclass(hints[leaf]):
        raise AfineError(f"{option}: {dotted!r} is a group; set its fields ({dotted}.<name>=...)")
    raw[leaf] = _parse_cli_value(text, hints[leaf], option)


def parse_args(cls, argv: list[str]):
    """`--config FILE` (optional) plus `--key=value` overrides -> a checked config of dataclass `cls`."""
    config_file, overrides = None, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--config", "-c"):
            if not args:
                raise AfineError("--config: a JSON file is needed")
            config_file = args.pop(0)
        elif arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            overrides.append((key, value, arg))
        else:
            raise AfineError(f"unexpected argument {arg!r}; use --config FILE and --key=value")
    raw = {}
    where = "defaults"
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise AfineError(f"{path}: config file not found")
        try:
            raw = json.loads(path.read_text())
        except ValueError as e:
            raise AfineError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise AfineError(f"{path}: expected a JSON object of config keys")
        where = str(path)
        _build(cls, raw, where)  # errors name the file before any override is applied
    for key, value, option in overrides:
        _set_dotted(cls, raw, key, value, option.split("=", 1)[0])
    if overrides:
        where = f"{where} + command line"
    cfg = _build(cls, raw, where)
    check(cfg)
    return cfg


def load(cls, path: str | Path):
    """A config from a JSON file alone (e.g. a run folder's config.json)."""
    return parse_args(cls, ["--config", str(path)])


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def check(cfg) -> None:
    """Value checks beyond types."""
    def fail(key, why):
        raise AfineError(f"config key {key!r}: {why}")

    if cfg.amp not in AMP:
        fail("amp", f"expected one of {', '.join(AMP)}, got {cfg.amp!r}")
    if cfg.device not in DEVICES:
        fail("device", f"expected one of {', '.join(DEVICES)}, got {cfg.device!r}")
    if not cfg.out_dir:
        fail("out_dir", "a run folder is needed")
    for key in ("total_iter", "batch_size"):
        if getattr(cfg, key) < 1:
            fail(key, "must be >= 1")
    for key in ("val_every", "save_every", "log_every", "workers"):
        if getattr(cfg, key) < 0:
            fail(key, "must be >= 0")
    for key in ("train_datasets", "val_datasets"):
        for name in getattr(cfg, key):
            if name not in DATASETS or name == "SRIQA-Bench":
                fail(key, f"unknown dataset {name!r}; expected some of {', '.join(TRAIN_DATASETS)}")
    if not cfg.train_datasets:
        fail("train_datasets", "at least one dataset is needed")
    s = cfg.schedule
    if not s.periods or any(p < 1 for p in s.periods):
        fail("schedule.periods", "a non-empty list of positive step counts is needed")
    if len(s.restart_weights) != len(s.periods):
        fail("schedule.restart_weights", f"needs one weight per period ({len(s.periods)})")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        fail("optim.betas", "expected two numbers in [0, 1)")
    for name, lr in dataclasses.asdict(cfg.lr).items():
        if lr < 0:
            fail(f"lr.{name}", "must be >= 0")
    if isinstance(cfg, Stage1Config) and not cfg.clip:
        fail("clip", f"a CLIP checkpoint or {RANDOM_TINY!r} is needed")
    if isinstance(cfg, Stage2Config) and not cfg.stage1_dir:
        fail("stage1_dir", "the stage-1 run folder is needed")
    if isinstance(cfg, Stage3Config) and not cfg.stage2_dir:
        fail("stage2_dir", "the stage-2 run folder is needed")


def usage(cls) -> str:
    """Every key with its default, for --help."""
    lines = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"  --{prefix}{f.name}={value if isinstance(value, str) else json.dumps(value)}")

    walk(cls(), "")
    return "\n".join(lines)


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
