"""afine.distributed under torchrun: a process waiting in a collective for one that hangs gives up after
AFINE_DIST_TIMEOUT seconds with one error line, and nothing of the run is left behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from afine import distributed
from afine.errors import AfineError
from tests import procs

ROOT = Path(__file__).resolve().parents[1]

# rank 0 gathers; rank 1 never takes part (as a rank that met an error the others were not told of, waiting in
# another collective, or hanging)
ONE_RANK_WAITS = """
import sys, time
from afine import distributed
from afine.errors import AfineError

d = distributed.setup("cpu")
try:
    if d.rank == 0:
        distributed.gather_objects(d, 0)
    else:
        time.sleep(300)
except AfineError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def test_a_rank_waiting_for_one_that_hangs_gives_up_after_the_timeout_with_one_line(tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(ONE_RANK_WAITS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "AFINE_DIST_TIMEOUT": "3"}
    run = procs.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", runner],
                    env=env, cwd=tmp_path, timeout=90)  # torch's own wait: 30 minutes
    errors = [line for line in run.stderr.splitlines() if "error: " in line]
    assert run.returncode != 0 and len(errors) == 1, run.stderr
    assert errors[0].startswith("error: waited 3 s for the other processes in a gathering of results: one of "
                                "them stopped or hangs (set the wait with AFINE_DIST_TIMEOUT=SECONDS)"), errors


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_bad_timeout_is_one_error_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("AFINE_DIST_TIMEOUT", value)
    with pytest.raises(AfineError, match=f"^AFINE_DIST_TIMEOUT='{value}': expected a number of seconds above 0$"):
        distributed.timeout()
    monkeypatch.setenv("AFINE_DIST_TIMEOUT", "2.5")
    assert distributed.timeout().total_seconds() == 2.5


def test_every_line_a_command_prints_on_stderr_is_one_write(monkeypatch):
    """torchrun's ranks share one stderr: two ranks' error lines ran into one ("...(image file is
    truncated)error: ...") while a line and its newline were two writes."""
    from afine import interrupts
    from afine.errors import report, warn

    writes = []

    class Stderr:
        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Stderr())
    monkeypatch.setattr(interrupts, "_reporting", False)  # stopped() marks the process as reporting: undone after
    monkeypatch.setattr(interrupts, "_reported", False)
    report(AfineError("a.png: cannot read image (image file is truncated)"))
    warn("b.png: larger than 4096 px")
    assert interrupts.stopped("interrupted; run the same command again") == 130
    assert writes == ["error: a.png: cannot read image (image file is truncated)\n",
                      "warning: b.png: larger than 4096 px\n", "interrupted; run the same command again\n"]
