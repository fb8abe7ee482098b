"""Modules a user can copy alone into another project: they import only torch and the standard library.

Each file is checked twice: statically (every import statement, including those inside functions), and by
copying it alone into an empty folder and importing and running it from there in a fresh interpreter in which
`afine` and the other liftable files cannot be imported (one interpreter for all five, to pay torch's import
once; each file's own folder is the first entry of sys.path while it is imported). Also: the package's modules
import each other without cycles.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from afine import fidelity, image, naturalness
from tests import procs

ROOT = Path(__file__).resolve().parents[1]
LIFTABLE = ("clip", "naturalness", "fidelity", "mapping", "losses")

# What each lifted module must still do on its own, run in the fresh interpreter after the import.
EXERCISE = {
    "clip": """
model = m.CLIP(embed_dim=16, vision_width=32, vision_layers=2, vision_patch_size=8, grid_size=2,
               context_length=4, vocab_size=10, transformer_width=32, transformer_layers=1)
again = m.CLIP.from_state_dict(model.state_dict())
features = again.visual(torch.randn(1, 3, 32, 32))
assert len(features) == 2 and tuple(features[0].shape) == (1, 16, 32), [f.shape for f in features]
""",
    "naturalness": """
n = m.NaturalnessHead(width=8, layers=2)(torch.randn(2, 3, 16, 16), torch.randn(2, 2, 4, 8))
assert tuple(n.shape) == (2,) and torch.isfinite(n).all()
""",
    "fidelity": """
head = m.FidelityHead(width=8, layers=2)
x, features = torch.randn(2, 3, 16, 16), torch.randn(2, 2, 4, 8)
f = head(x, features, x, features)
assert tuple(f.shape) == (2,) and f.abs().max() < 1e-4, f
""",
    "mapping": """
assert abs(float(m.final_scale(torch.tensor(-1.9710))) - 50.0) < 1e-4
n = torch.tensor([0.5, -1.0])
d = m.Adapter()(m.FidelityMapping()(torch.tensor([0.5, 0.5])), n, n)
assert torch.allclose(d, n), d  # F maps to 0 at yita3 = 0.5; equal N: exp(0) N
assert tuple(m.NaturalnessMapping()(torch.zeros(3)).shape) == (3,)
""",
    "losses": """
loss = m.rank_loss(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 10.0]), torch.tensor([0.5, 1.0]))
assert loss.abs().max() < 1e-3, loss
""",
}

CHECK = """
import importlib, json, sys
import torch
names, folders, exercises = json.loads(sys.argv[1])
sys.modules["afine"] = None  # the project must not be reachable, even if installed
results = {}
for name, folder, exercise in zip(names, folders, exercises):
    for other in names:  # the other liftable files are absent too
        sys.modules[other] = None
    del sys.modules[name]
    sys.path[0] = folder  # holds nothing but the file
    before = set(sys.modules)
    result = results[name] = {"new_imports": [], "error": None}
    try:
        m = importlib.import_module(name)
        top = {k.split(".")[0] for k in set(sys.modules) - before}
        result["new_imports"] = sorted(top - set(sys.stdlib_module_names) - {"torch", name})
        exec(exercise, {"m": m, "torch": torch})
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def lifted(tmp_path_factory):
    """Each liftable file copied alone into its own folder, imported and exercised in one fresh interpreter."""
    root = tmp_path_factory.mktemp("lifted")
    folders = []
    for name in LIFTABLE:
        (root / name).mkdir()
        shutil.copy(ROOT / "afine" / f"{name}.py", root / name)
        folders.append(str(root / name))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    job = json.dumps([LIFTABLE, folders, [EXERCISE[n] for n in LIFTABLE]])
    proc = procs.run([sys.executable, "-c", CHECK, job], cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def imported_modules(path: Path) -> list[str]:
    """Every module an import statement of the file names ('.x' for relative imports, also for `from . import x`),
    in source order."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is None:
            names += ["." * node.level + alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + node.module)
    return names


@pytest.mark.parametrize("name", LIFTABLE)
def test_imports_only_torch_and_the_standard_library(name):
    allowed = set(sys.stdlib_module_names) | {"torch"}
    foreign = [m for m in imported_modules(ROOT / "afine" / f"{name}.py")
               if m.startswith(".") or m.split(".")[0] not in allowed]
    assert foreign == []


@pytest.mark.parametrize("name", LIFTABLE)
def test_file_copied_alone_imports_and_runs_in_a_fresh_interpreter(name, lifted):
    assert lifted[name] == {"new_imports": [], "error": None}


def test_the_heads_undo_the_normalisation_that_preprocessing_applies():
    """The heads carry their own copy of CLIP's mean and std; all copies must be the published values."""
    published = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert (image.CLIP_MEAN, image.CLIP_STD) == published
    for module, head in ((naturalness, naturalness.NaturalnessHead(8, 2)), (fidelity, fidelity.FidelityHead(8, 2))):
        assert (module.CLIP_MEAN, module.CLIP_STD) == published
        assert head.mean.flatten().tolist() == torch.tensor(published[0]).tolist()
        assert head.std.flatten().tolist() == torch.tensor(published[1]).tolist()
    pixels = torch.rand(2, 3, 4, 5)
    x = image.normalize(pixels)
    head = naturalness.NaturalnessHead(8, 2)
    for tokens in (naturalness.pixel_tokens(x, head.mean, head.std), fidelity.pixel_tokens(x, head.mean, head.std)):
        assert torch.allclose(tokens, pixels.flatten(2).transpose(1, 2), atol=1e-6)


def test_the_package_modules_import_each_other_without_cycles():
    """E.g. the command line of afine.labels takes from-csv from afine.csvdataset, which needs nothing of labels."""
    modules = {p.stem for p in (ROOT / "afine").glob("*.py")}
    imports = {name: {m.removeprefix("afine.").lstrip(".").split(".")[0]
                      for m in imported_modules(ROOT / "afine" / f"{name}.py") if m.startswith((".", "afine."))}
               & modules - {name}
               for name in modules}
    assert "csvdataset" in imports["labels"]

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(m == goal or (m not in seen and not seen.add(m) and reaches(m, goal, seen)) for m in imports[start])

    assert sorted(name for name in modules if reaches(name, name, set())) == []
