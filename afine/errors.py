"""The one exception type for user mistakes (bad paths, files, labels, keys), and how command lines report it.

Command-line tools catch it, print its message as one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable


class AfineError(Exception):
    """A user-facing error whose message names the file, line or key at fault."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes are AfineErrors too, so a `command` reports them the same way."""

    def error(self, message: str):
        raise AfineError(message)


def command(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a command-line `main`: an AfineError becomes 'error: <message>' on stderr and exit code 2."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except AfineError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def warn(message: str) -> None:
    """A one-line 'warning: <message>' on stderr (for what is suspicious but not wrong)."""
    print(f"warning: {message}", file=sys.stderr)
