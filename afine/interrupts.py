"""Ctrl-C in commands that start DataLoader workers: one KeyboardInterrupt, in the main process, never lost.

A terminal's Ctrl-C goes to every process of the command, workers included. Left alone, a worker that dies of
it makes torch raise "DataLoader worker exited unexpectedly" in place of the interrupt, and an interrupt that
arrives while workers are being forked lands in os.fork's hooks, where Python prints it and carries on. Inside
`handled()`, workers forked from the main process ignore Ctrl-C (the main process shuts them down), workers
start with it held back, and one that Python dropped is raised at the next batch.

Outside `handled()`, a command run as a program (`exit_on_ctrl_c()` in its first lines, before its imports load
torch) exits at once on Ctrl-C with code 130: during start-up with the line "interrupted" (where Python would
print a traceback from inside `import torch`), and after the command reported a Ctrl-C silently (where a second
one would land in cleanup such as the DataLoader workers' shutdown, printing "Exception ignored ..."). This
module imports only the standard library, for that.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterable, Iterator

_owner: int | None = None  # the process that handles Ctrl-C; forked copies of it ignore it
_holding = 0  # > 0 while workers start: Ctrl-C is recorded, raised after
_pending = False  # a Ctrl-C was recorded and may not have been raised
_reported = False  # the command printed its line for a Ctrl-C (stopped())
_program: int | None = None  # the process that exit_on_ctrl_c() set up


def exit_on_ctrl_c() -> None:
    """For a command's first lines when run as a program (never on import): Ctrl-C outside `handled()` exits at
    once with code 130, as the module docstring says. A process started with Ctrl-C ignored keeps ignoring it."""
    global _program
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        _program = os.getpid()
        signal.signal(signal.SIGINT, _exit_interrupted)


def _exit_interrupted(signum, frame) -> None:
    if os.getpid() != _program:  # a forked worker: the program stops it
        return
    if not _reported:
        print("interrupted", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):  # what the command printed stays printed
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(130)


def stopped(message: str | None = "interrupted") -> int:
    """Print a command's one line for a Ctrl-C (None: this process prints none, e.g. a rank other than 0) and
    return its exit code, 130."""
    global _reported
    if message is not None:
        print(message, file=sys.stderr, flush=True)
    _reported = True
    return 130


def _on_interrupt(signum, frame) -> None:
    global _pending
    if os.getpid() != _owner:
        return
    _pending = True
    if not _holding:
        raise KeyboardInterrupt


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Ctrl-C handled as the module docstring says, for the `with` body (the main thread only; a process
    started with Ctrl-C ignored, as a background job is, keeps ignoring it)."""
    global _owner, _pending
    try:
        previous = signal.getsignal(signal.SIGINT)
        if previous is signal.SIG_IGN:
            raise ValueError
        signal.signal(signal.SIGINT, _on_interrupt)
    except ValueError:  # not the main thread, or Ctrl-C ignored
        yield
        return
    owner, _owner, _pending = _owner, os.getpid(), False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _owner = owner


def _raise_pending() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that was held back or dropped."""
    if _pending and not _holding and os.getpid() == _owner:
        raise KeyboardInterrupt


def batches(loader: Iterable) -> Iterator:
    """The loader's batches: its worker processes start with Ctrl-C held back, and a Ctrl-C held or dropped
    is raised before the next batch."""
    global _holding
    _holding += 1
    try:
        iterator = iter(loader)
    finally:
        _holding -= 1
    _raise_pending()
    for batch in iterator:
        _raise_pending()
        yield batch
