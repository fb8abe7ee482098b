"""Training configurations: a stage's dataclass read from a JSON file plus `--key=value` overrides.

    python train_stage1.py --config configs/s1.json --batch_size=16 --lr.clip=1e-5 --schedule.periods=[500,500]

The dataclasses (afine.training.RunConfig and each stage script's) hold the published settings as defaults
(docs/training.md). Nested fields use dotted names; `--key value` and hyphens (`--data-root`)
are accepted too. Unknown keys, wrong types and out-of-range values (the class's `check()`) are AfineErrors
naming the file or option. Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

from .errors import AfineError


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
    if hasattr(cfg, "check"):
        cfg.check()  # the class's value checks beyond types
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


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
