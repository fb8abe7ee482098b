"""The benchmark scripts (bench/) still import: they are run by hand, not by the suite, so a helper they share
that moves or is renamed would otherwise go unnoticed until someone measures."""

from __future__ import annotations

import sys
from pathlib import Path

from tests import procs

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_script_imports():
    modules = sorted(f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__")
    assert len(modules) >= 7
    proc = procs.run([sys.executable, "-c", f"import {', '.join(modules)}"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
