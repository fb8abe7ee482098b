"""Commands that tests start: each with a hard timeout, and nothing of it left behind.

`run(cmd, timeout=...)` is subprocess.run for tests. The command starts in a session of its own (its own process
group, which a terminal's Ctrl-C would reach), with a marker in its environment that every process it starts
inherits: DataLoader workers, and torchrun's ranks, which torchrun starts in sessions of their own. Its output is
read with a timeout, so an orphan holding the pipes cannot block the test; once the command has ended, the test
fails if any process of it (of its group, or carrying its marker) is still alive. On a timeout every process of
it is killed and the test fails with the end of what it printed. `start(cmd)` is for a test that waits for
something itself; the conftest kills what is left of such a command when the test ends, and fails the test.

Commands get AFINE_DIST_TIMEOUT=60 unless their environment sets it: a torchrun process waiting for one that
stopped or hangs gives up after a minute (afine/distributed.py), not torch's 30 minutes (a minute: time enough
for the slowest process of a run on a busy machine).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import time

import pytest

GRACE = 10.0  # seconds a command's last processes get to finish exiting after it has ended
DIST_TIMEOUT = "60"  # AFINE_DIST_TIMEOUT for the commands started here
MARK = "AFINE_TEST_COMMAND"  # environment variable holding a command's marker
_count = itertools.count()
_started: list[subprocess.Popen] = []


def start(cmd: list, **kwargs) -> subprocess.Popen:
    """Popen(cmd) in a session of its own, marked (stdin from /dev/null unless given); remembered for the
    teardown."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    mark = f"{os.getpid()}.{next(_count)}"
    env = os.environ if kwargs.get("env") is None else kwargs["env"]
    kwargs["env"] = {"AFINE_DIST_TIMEOUT": DIST_TIMEOUT, **env, MARK: mark}
    proc = subprocess.Popen([str(c) for c in cmd], start_new_session=True, **kwargs)
    proc.mark = mark
    _started.append(proc)
    return proc


def members(proc: subprocess.Popen) -> list[int]:
    """The live processes (zombies aside, which no-one may have reaped) of a started command: its process group
    and every process carrying its marker."""
    if not os.path.isdir("/proc"):  # no /proc: whether the group still has a member at all
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [proc.pid]
    mark = f"\0{MARK}={proc.mark}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            if fields[0] in "ZX":
                continue
            if int(fields[2]) != proc.pid:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if mark not in b"\0" + f.read():
                        continue
        except (OSError, IndexError, ValueError):  # ended meanwhile, or not ours to read
            continue
        found.append(int(entry))
    return found


def kill(proc: subprocess.Popen) -> list[int]:
    """SIGKILL to every process of a started command; returns the ones that were alive."""
    alive = members(proc)
    if alive or proc.poll() is None:  # (an ended, reaped group's number may be another's by now)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=GRACE)
    return alive


def ps(pids: list[int]) -> str:
    """One line per process: pid and command line, for a failure message."""
    lines = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
            lines.append(f"{pid}: {command[:200]}")
        except OSError:
            lines.append(str(pid))
    return "\n".join(lines)


def assert_none_left(proc: subprocess.Popen) -> None:
    """After a started command ended: none of its processes is alive (each gets GRACE seconds to finish
    exiting); any left are killed and the test fails, naming them."""
    deadline = time.monotonic() + GRACE
    while members(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = members(proc)
    if left:
        kill(proc)
        pytest.fail(f"processes of the command outlived it:\n{ps(left)}", pytrace=False)


def finish(proc: subprocess.Popen, timeout: float, input: str | bytes | None = None) -> tuple:
    """(stdout, stderr) of a started command once it and all its processes have ended; fails the test, with
    them killed, if that takes longer than `timeout` seconds."""
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        ended = proc.poll() is not None
        left = kill(proc)
        said = e.stderr
        with contextlib.suppress(subprocess.TimeoutExpired):
            said = proc.communicate(timeout=GRACE)[1]
        if isinstance(said, bytes):
            said = said.decode(errors="replace")
        what = "ended but processes it started held its output open" if ended else "did not end"
        pytest.fail(f"{proc.args[:6]} {what} within {timeout} s; killed:\n{ps(left)}\nits stderr ended with:\n"
                    f"{(said or '')[-3000:]}", pytrace=False)
    assert_none_left(proc)
    return out, err


def run(cmd: list, *, timeout: float = 120, input: str | bytes | None = None, capture_output: bool = True,
        text: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd) as the module docstring says."""
    if capture_output:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    proc = start(cmd, text=text, **kwargs)
    out, err = finish(proc, timeout, input)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def teardown() -> list[str]:
    """Kill what is left of every command started during a test; one entry for each that had a live process."""
    leftovers = []
    while _started:
        proc = _started.pop()
        left = kill(proc)
        if left:
            leftovers.append(f"{proc.args[:6]}:\n{ps(left)}")
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    return leftovers
