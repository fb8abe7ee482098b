"""Ctrl-C in commands that start DataLoader workers: one KeyboardInterrupt, in the main process, never lost.

A terminal's Ctrl-C goes to every process of the command, workers included. Left alone, a worker that dies of
it makes torch raise "DataLoader worker exited unexpectedly" in place of the interrupt, and an interrupt that
arrives while workers are being forked lands in os.fork's hooks, where Python prints it and carries on. Inside
`handled()`, workers forked from the main process ignore Ctrl-C (the main process shuts them down), workers
start with it held back, and one that Python dropped is raised at the next batch.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable, Iterator

_owner: int | None = None  # the process that handles Ctrl-C; forked copies of it ignore it
_holding = 0  # > 0 while workers start: Ctrl-C is recorded, raised after
_pending = False  # a Ctrl-C was recorded and may not have been raised


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
