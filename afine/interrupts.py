"""Ctrl-C in commands that start DataLoader workers: one KeyboardInterrupt, in the main process, never lost.

A terminal's Ctrl-C goes to every process of the command, workers included. Left alone, a worker that dies of
it makes torch raise "DataLoader worker exited unexpectedly" in place of the interrupt, and an interrupt that
arrives while workers are being forked lands in os.fork's hooks, where Python prints it and carries on. Inside
`handled()`, workers forked from the main process ignore Ctrl-C (the main process shuts them down), workers
start with it held back, and one that Python dropped is raised at the next batch.

Outside `handled()`, a command run as a program (`exit_on_ctrl_c()` in its first lines, before its imports load
torch) exits at once on Ctrl-C with code 130: during start-up with the line "interrupted" (where Python would
print a traceback from inside `import torch`), and after the command reported a Ctrl-C silently (where a second
one would land in cleanup such as the DataLoader workers' shutdown, printing "Exception ignored ..."). A second
Ctrl-C while the command stops from the first ends it at once too (inside `handled()` as outside): its line
("interrupted") if it printed none yet, nothing if it did. Before such an exit the command kills the worker
processes it started, and every DataLoader worker dies with the process that started it (Linux), so no process
of a command outlives it, however Ctrl-C arrives. This module imports only the standard library, for that.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator

_owner: int | None = None  # the process that handles Ctrl-C; forked copies of it ignore it
_holding = 0  # > 0 while workers start: Ctrl-C is recorded, raised after
_pending = False  # a Ctrl-C was recorded and may not have been raised
_reporting = False  # the command is printing its line for a Ctrl-C (stopped())
_reported = False  # ... and has printed it
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
    if _reporting and not _reported:  # the command is printing its line: it exits right after
        return
    _kill_workers()
    if not _reporting:
        sys.stderr.write("interrupted\n")  # one write: never run into another process's line
    for stream in (sys.stdout, sys.stderr):  # what the command printed stays printed
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(130)


def _kill_workers() -> None:
    """SIGKILL to the worker processes this process started (multiprocessing's children): nothing they would
    print (a traceback of a transfer cut short) reaches the terminal, and none outlives the command."""
    multiprocessing = sys.modules.get("multiprocessing")  # not imported: no worker was started
    if multiprocessing is not None:
        for child in multiprocessing.active_children():
            with contextlib.suppress(Exception):
                child.kill()


def stopped(message: str | None = "interrupted") -> int:
    """Print a command's one line for a Ctrl-C (None: this process prints none, e.g. a rank other than 0) and
    return its exit code, 130."""
    global _reporting, _reported
    _reporting = True
    if message is not None:
        sys.stderr.write(f"{message}\n")  # one write: never run into another process's line
        sys.stderr.flush()
    _reported = True
    return 130


def _on_interrupt(signum, frame) -> None:
    global _pending
    if os.getpid() != _owner:
        return
    if _pending:  # a second Ctrl-C while the first stops the command: a program exits at once
        if os.getpid() == _program:
            _exit_interrupted(signum, frame)
        return  # (never a second KeyboardInterrupt, which would land in the cleanup the first one runs)
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


class _WorkerStart:
    """A DataLoader's worker_init_fn that first makes the worker ignore Ctrl-C (the process that started it
    stops it), keep quiet about a batch hand-over its parent broke off (multiprocessing prints that error from a
    thread of the worker) and, on Linux, die with its parent (PR_SET_PDEATHSIG): a worker whose parent is gone
    would otherwise wait for work forever (torch's check of its parent starts after worker_init_fn)."""

    def __init__(self, then: Callable | None, parent: int | None):
        self.then, self.parent = then, parent  # parent: the pid the worker's parent has (None: not known)

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.excepthook = _main_thread_only(sys.excepthook)
        if sys.platform.startswith("linux"):
            import ctypes

            with contextlib.suppress(AttributeError, OSError):  # (a C library without prctl: no such death)
                ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if self.parent is not None and os.getppid() != self.parent:  # it ended before prctl
                os._exit(0)
        if self.then is not None:
            self.then(worker_id)


def _main_thread_only(hook: Callable) -> Callable:
    """sys.excepthook for a worker: errors of its main thread as before; those of its other threads (handing
    batches to the parent, which reports what matters itself) not printed."""
    import threading

    def excepthook(*error) -> None:
        if threading.current_thread() is threading.main_thread():
            hook(*error)

    return excepthook


def _own_workers(loader) -> None:
    """Give a DataLoader with worker processes the worker_init_fn _WorkerStart (around its own)."""
    if getattr(loader, "num_workers", 0) <= 0 or isinstance(loader.worker_init_fn, _WorkerStart):
        return
    import multiprocessing

    context = loader.multiprocessing_context or multiprocessing
    forked_here = context.get_start_method() in ("fork", "spawn")  # forkserver: a server is the parent
    loader.worker_init_fn = _WorkerStart(loader.worker_init_fn, os.getpid() if forked_here else None)


def batches(loader: Iterable) -> Iterator:
    """The loader's batches: its worker processes start with Ctrl-C held back, ignore it once started (this
    process stops them) and die with this process, or stop as soon as the batches stop; a Ctrl-C held or dropped
    is raised before the next batch."""
    global _holding
    _own_workers(loader)
    _holding += 1
    try:
        iterator = iter(loader)
    finally:
        _holding -= 1
    interrupted = False
    try:
        _raise_pending()
        for batch in iterator:
            _raise_pending()
            yield batch
    except KeyboardInterrupt:  # the command stops: it reports the Ctrl-C first, then its workers go
        interrupted = True
        raise
    finally:  # stopped by an error or closed early: the workers stop now. Left to the garbage collector (the
        # error's traceback holds the iterator), their shutdown waited 5 s per worker for a message it had lost.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None and not interrupted:
            shutdown()
