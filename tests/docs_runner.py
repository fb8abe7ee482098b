"""Runs the documentation's commands fast: a fork server that has imported torch and the project once.

Each example in the README and docs/ is a real command in a real shell, but starting Python and importing
torch takes seconds per command, and the manual holds dozens. So tests/test_docs.py puts two shims first on
PATH, `afine` and `python`, which run `python -S THIS_FILE shim NAME ARGS...`: a stdlib-only client that
hands its argv, working folder, environment and its stdin, stdout and stderr to the server over a Unix socket
and exits with the command's exit code. The server (`python THIS_FILE serve SOCKET`, started once per test
module in a session of its own) imported torch and the project's modules before any request and runs no
torch code itself; per request it forks a child that takes over the client's descriptors, folder and
environment and runs the command as `afine ...`, `python -m MODULE ...`, `python SCRIPT ...` or
`python -c CODE` would (runpy, with sys.argv set), in a process group of its own.

No process is left behind: when a client goes away (its block timed out and the test killed the block's
process group) the server kills that child's group; when the test closes the server's stdin, the server
kills every child's group and exits. Python invocations the server does not run (`python -m pip`, options)
are executed by the real interpreter.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys

SERVED_MODULES = ("afine", "afine.__main__", "afine.score", "afine.model", "afine.afine_loss", "afine.download",
                  "afine.checkpoint", "afine.evaluation", "afine.labels", "afine.synth", "afine.csvdataset",
                  "afine.plots", "afine.training", "afine.cache", "afine.datasets", "afine.benchmarks",
                  "afine.metrics", "scipy.optimize", "scipy.stats", "matplotlib.pyplot")


# ---------------------------------------------------------------------------------------------- substitutions


def tiny_scale():
    """The synthetic corpus at a size the docs test can afford (seconds): `--scale small` in the docs means this."""
    from afine.synth import SCALES, Scale

    small = SCALES["small"]
    return Scale(references=3, kadid_types=small.kadid_types[:2], pipal_types=small.pipal_types[:2],
                 tid_types=small.tid_types[:2], size=small.size, diffiqa_references=3, diffiqa_per_class=1,
                 sriqa_scenes=2)


# ---------------------------------------------------------------------------------------------- client


def shim(name: str, args: list[str]) -> int:
    """`afine ARGS` or `python ARGS` through the server; the real interpreter for what the server does not run."""
    real = os.environ["DOCS_REAL_PYTHON"]
    if name == "python" and not served(args):
        os.execv(real, [real, *args])
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(os.environ["DOCS_SERVER"])
        request = {"argv": [name, *args], "cwd": os.getcwd(), "env": dict(os.environ)}
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
        reply = conn.recv(64)
    return int(reply) if reply else 1  # no reply: the server is gone


def served(args: list[str]) -> bool:
    if not args:
        return False
    if args[0] == "-m":
        return len(args) > 1 and args[1] not in ("pip", "pytest", "venv", "torch.distributed.run")
    return args[0] == "-c" or not args[0].startswith("-")


# ---------------------------------------------------------------------------------------------- server


def serve(path: str) -> None:
    import importlib

    for module in SERVED_MODULES:  # imported here, once: a forked child finds them loaded
        importlib.import_module(module)
    from afine import synth

    synth.SCALES["small"] = tiny_scale()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}  # pid -> the client's connection
    try:
        while True:
            ready, _, _ = select.select([0, listener, *children.values()], [], [], 0.05)
            if 0 in ready and not os.read(0, 1):  # the test closed our stdin: stop
                return
            if listener in ready:
                conn, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                pid = os.fork()
                if pid == 0:
                    for other in (listener, conn, *children.values()):
                        other.close()
                    run_child(json.loads(message), fds)  # never returns
                for fd in fds:
                    os.close(fd)
                with _suppress():
                    os.setpgid(pid, pid)
                children[pid] = conn
            for pid, conn in list(children.items()):
                if conn in ready and not conn.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK):  # the client died
                    kill_group(pid)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = children.pop(pid, None)
                if conn is not None:
                    code = os.waitstatus_to_exitcode(status)
                    with _suppress():
                        conn.send(str(code if code >= 0 else 128 - code).encode())
                    conn.close()
    finally:
        for pid in children:
            kill_group(pid)
        for pid in children:
            with _suppress():
                os.waitpid(pid, 0)


def kill_group(pid: int) -> None:
    with _suppress():
        os.killpg(pid, signal.SIGKILL)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


def run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the requested command, then exit with its code."""
    import atexit
    import io
    import runpy
    import traceback

    code = 1
    try:
        os.setpgid(0, 0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        template = {0: sys.__stdin__, 1: sys.__stdout__, 2: sys.__stderr__}
        streams = []
        for fd, mode in ((0, "rb"), (1, "wb"), (2, "wb")):
            raw = open(fd, mode, closefd=False)
            stream = io.TextIOWrapper(raw, encoding=template[fd].encoding, errors=template[fd].errors,
                                      line_buffering=fd != 0 and os.isatty(fd), write_through=fd == 2)
            streams.append(stream)
        sys.stdin, sys.stdout, sys.stderr = streams
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        name, *args = request["argv"]
        try:
            if name == "afine":
                from afine.__main__ import entry

                sys.argv = ["afine", *args]
                code = entry()
            elif args[:2] == ["-m", "afine.synth"]:  # the loaded module, whose "small" is tiny_scale()
                sys.argv = [sys.modules["afine.synth"].__file__, *args[2:]]
                code = sys.modules["afine.synth"].main(args[2:])
            elif args[0] == "-m":
                module = args[1]
                sys.argv = [module, *args[2:]]
                sys.path[0] = os.getcwd()
                sys.modules.pop(module if module != "afine" else "afine.__main__", None)
                runpy.run_module(module, run_name="__main__", alter_sys=True)
                code = 0
            elif args[0] == "-c":
                sys.argv = ["-c", *args[2:]]
                sys.path[0] = ""
                exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
                code = 0
            else:
                sys.argv = list(args)
                sys.path[0] = os.path.dirname(os.path.realpath(args[0]))
                runpy.run_path(args[0], run_name="__main__")
                code = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - an uncaught exception: its traceback and exit code 1, as python does
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    if sys.argv[1] == "shim":
        sys.exit(shim(sys.argv[2], sys.argv[3:]))
    serve(sys.argv[2])
