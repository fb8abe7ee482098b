"""Ctrl-C in the commands outside the work itself: while they start (importing torch, before any code of theirs
runs) it ends them with one line and exit code 130; importing afine or a command's module changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
