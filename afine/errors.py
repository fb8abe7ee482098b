"""The one exception type for user mistakes (bad paths, files, labels, keys), and how command lines report it.

Command-line tools catch it, print its message as one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from . import interrupts


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
            print("interrupted", file=sys.stderr)
            return 130

    return run


def report(error: AfineError) -> None:
    """The one line a command prints for a user mistake: 'error: <message>' on stderr."""
    print(f"error: {error}", file=sys.stderr)


def warn(message: str) -> None:
    """A one-line 'warning: <message>' on stderr (for what is suspicious but not wrong)."""
    print(f"warning: {message}", file=sys.stderr)


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
