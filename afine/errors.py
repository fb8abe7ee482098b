"""The one exception type for user mistakes (bad paths, files, labels, keys), and how command lines report it.

Command-line tools catch it, print its message as one line on stderr and exit 2. File names that are not valid
UTF-8 are printed escaped (`printable`), in messages as in every table, CSV and JSON output.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable

from . import interrupts


def printable(value) -> str:
    """str(value) with the bytes of a file name that are not valid UTF-8 shown as `\\xNN` escapes (docs/scoring.md,
    "Output files and file names"): Python keeps such bytes as lone surrogates (os.fsdecode), which cannot be printed or
    written as UTF-8."""
    text = str(value)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class AfineError(Exception):
    """A user-facing error whose message names the file, line or key at fault."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes are AfineErrors too, so a `command` reports them the same way, and whose
    options take both spellings, `--data-root` and `--data_root`, like the training scripts' config keys."""

    def error(self, message: str):
        raise AfineError(message)

    def add_argument(self, *names, **kwargs):
        twins = ["--" + (name[2:].replace("-", "_") if "-" in name[2:] else name[2:].replace("_", "-"))
                 for name in names if name.startswith("--")]
        return super().add_argument(*names, *[t for t in twins if t not in names], **kwargs)


def command(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a command-line `main`: an AfineError becomes 'error: <message>' on stderr and exit code 2,
    Ctrl-C (handled as afine.interrupts says) 'interrupted' and exit code 130."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            with interrupts.handled():
                return main(*args, **kwargs)
        except AfineError as e:
            report(e)
            return 2
        except KeyboardInterrupt:
            return interrupts.stopped()

    return run


def optional_import(module: str, package: str, extra: str, what: str):
    """Import `module` of an optional dependency when a command needs it (never at start-up, so commands that
    do not use it neither need it nor pay for its import); missing, it is one AfineError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise AfineError(f"{what} needs the optional package {package}, which cannot be imported ({e}); install it "
                         f"with: pip install {package}  (or, in this repository: pip install '.[{extra}]')") from None


def check_choice(name: str, value, choices, hint: str = "") -> None:
    """A keyword argument outside its choices is a ValueError: 'NAME must be one of A, B, got VALUE'."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}{hint}")


def report(error: AfineError) -> None:
    """The one line a command prints for a user mistake: 'error: <message>' on stderr."""
    line(f"error: {printable(error)}")


def warn(message: str) -> None:
    """A one-line 'warning: <message>' on stderr (for what is suspicious but not wrong)."""
    line(f"warning: {printable(message)}")


def line(text: str) -> None:
    """`text` and its newline to stderr in one write, so that the lines of processes sharing a stderr (torchrun's
    ranks) never run into each other."""
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


WORKER_PREFIX = "Caught AfineError in DataLoader worker process"
ERROR_LINE = f"{AfineError.__module__}.{AfineError.__qualname__}: "


def unwrap_worker_error(error: BaseException) -> BaseException:
    """The one-line AfineError that a DataLoader worker raised, recovered from torch's multi-line re-raise.

    torch re-raises a worker's exception in the main process with the worker's whole traceback as its
    message, ending in 'afine.errors.AfineError: <message>'. Any other exception is returned unchanged.
    """
    text = str(error)
    if not text.startswith(WORKER_PREFIX):
        return error
    last = text.rstrip().splitlines()[-1]
    return AfineError(last[len(ERROR_LINE):]) if last.startswith(ERROR_LINE) else error
