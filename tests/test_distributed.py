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
