"""`pip install .` gives an `afine` command that scores as `python -m afine` does."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from afine.__main__ import main
from afine.checkpoint import save_afine
from tests import procs
from tests.tiny import random_afine, tiny_clip

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_gives_the_afine_command(tmp_path, monkeypatch, capsys):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(ROOT / "afine", source / "afine", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    target = tmp_path / "site"
    built = procs.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                       "--no-index", "--target", target, source], timeout=300)
    assert built.returncode == 0, built.stderr
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    found = procs.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('afine').origin)"],
                      env=env, cwd=tmp_path)
    assert Path(found.stdout.strip()).is_relative_to(target)  # the command below runs the installed copy
    (metadata,) = target.glob("afine-*.dist-info/METADATA")  # the licence travels with the package
    assert "License-Expression: Apache-2.0" in metadata.read_text().splitlines()
    assert (metadata.parent / "licenses" / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes()

    save_afine(tmp_path / "afine.pth", random_afine(tiny_clip(seed=7)).parts())
    rng = np.random.default_rng(0)
    for name in ("dis", "ref"):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    args = ["score", "--no-progress", "--json", "--weights", "afine.pth", "dis.png", "ref.png"]
    installed = procs.run([target / "bin" / "afine", *args], env=env, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0
    assert json.loads(installed.stdout) == json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv0, prog", [("/venv/bin/afine", "afine"),
                                          (str(ROOT / "afine" / "__main__.py"), "python -m afine")])
def test_usage_names_the_command_as_it_was_run(monkeypatch, capsys, argv0, prog):
    monkeypatch.setattr(sys, "argv", [argv0])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")
