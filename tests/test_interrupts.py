"""Ctrl-C in the commands outside the work itself: while they start (importing torch, before any code of theirs
runs) it ends them with one line and exit code 130; importing afine or a command's module changes nothing. Loader
workers die with the process that started them, and stop when its batches stop."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from afine.errors import AfineError
from tests import procs
from tests.tiny import ctrl_c_at_import

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command,module", [
    (["train_stage1.py"], "torch"), (["train_stage2.py"], "torch"), (["train_stage3.py"], "torch"),
    (["evaluate.py"], "torch"), (["fit_gamma.py"], "numpy"), (["-m", "afine", "score"], "torch"),
    (["-m", "afine.labels", "nlogn"], "numpy"), (["-m", "afine.synth"], "numpy")])
def test_ctrl_c_while_a_command_starts_is_one_line_and_exit_code_130(command, module, tmp_path):
    script = [str(ROOT / command[0]), *command[1:]] if command[0] != "-m" else command
    code, err = ctrl_c_at_import(script, module, tmp_path)
    assert (code, err) == (130, "interrupted\n")


def test_ctrl_c_while_the_installed_afine_command_starts_is_one_line_and_exit_code_130(tmp_path):
    script = tmp_path / "afine"  # what pip writes for the [project.scripts] entry
    script.write_text("import sys\nfrom afine.__main__ import entry\nsys.exit(entry())\n")
    code, err = ctrl_c_at_import([str(script), "score"], "torch", tmp_path)
    assert (code, err) == (130, "interrupted\n")


def test_importing_afine_and_the_commands_keeps_the_programs_own_ctrl_c():
    code = """
import signal
mine = lambda signum, frame: None
signal.signal(signal.SIGINT, mine)
import afine, afine.__main__, afine.labels, afine.synth, evaluate, fit_gamma, train_stage1, train_stage2, train_stage3
assert signal.getsignal(signal.SIGINT) is mine
"""
    proc = procs.run([sys.executable, "-c", code], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


# A loader whose worker starts slowly (its worker_init_fn writes the file argv[1], then sleeps): the test kills
# the main process while the worker is still starting.
SLOW_WORKER = """
import sys, time
import torch
from afine import interrupts

def slow_start(worker_id):
    open(sys.argv[1], "w").close()
    time.sleep(3)

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return i

for _ in interrupts.batches(torch.utils.data.DataLoader(Items(), num_workers=1, worker_init_fn=slow_start)):
    pass
"""


def test_a_loader_worker_dies_with_the_process_that_started_it(tmp_path):
    """A worker whose parent died as it started (SIGKILL, a crash, a Ctrl-C exit) waited for work forever:
    torch's worker notices a dead parent only from a check that starts after worker_init_fn."""
    started = tmp_path / "started"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = procs.start([sys.executable, "-c", SLOW_WORKER, started], env=env)
    deadline = time.monotonic() + 120
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the worker never started"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the main process alone
    proc.wait()
    procs.assert_none_left(proc)


class FailsAtOne(torch.utils.data.Dataset):
    """Items 0..7; item 1 is a bad image."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 1:
            raise AfineError("b.png: cannot read image")
        return torch.zeros(3, 8, 8)


@pytest.mark.parametrize("how", ["error", "closed"])
def test_loader_workers_stop_when_the_batches_stop(how):
    """Stopped by a worker's error (whose traceback keeps the loader alive) or closed after one batch, the loader's
    workers are stopped and joined at once. Before, they lived until a garbage collection, which then stalled
    10 s (5 s a worker) on a shutdown message lost among the collected objects."""
    import gc
    import multiprocessing

    from afine import interrupts

    before = set(multiprocessing.active_children())
    loader = torch.utils.data.DataLoader(FailsAtOne(), batch_size=None, num_workers=2)
    gc.disable()  # only what the code does itself counts
    try:
        batches = interrupts.batches(loader)
        if how == "error":
            with pytest.raises(AfineError) as error:
                for _ in batches:
                    pass
            assert "b.png: cannot read image" in str(error.value)
        else:
            next(batches)
            batches.close()
        assert set(multiprocessing.active_children()) <= before
    finally:
        gc.enable()
