"""Tiny random checkpoints in the official file formats, for tests (no downloads, ever)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from afine.checkpoint import PART_FILES, save_afine, save_network_file
from afine.clip import CLIP
from afine.model import AFINE

TINY = dict(embed_dim=32, vision_width=64, vision_layers=3, vision_patch_size=16, grid_size=4, context_length=8,
            vocab_size=50, transformer_width=64, transformer_layers=1)


def tiny_clip(seed: int = 0, **overrides) -> CLIP:
    torch.manual_seed(seed)
    clip = CLIP(**{**TINY, **overrides})
    with torch.no_grad():  # larger random scales than the defaults, so every term is far from trivial
        for name, p in clip.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return clip


class _Archive(nn.Module):
    """Holds a CLIP's parameters at the top level plus the scalar entries OpenAI's archive carries."""

    def __init__(self, clip: CLIP, resolution: int):
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, p in clip.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.register_buffer("input_resolution", torch.tensor(resolution))
        self.register_buffer("context_length", torch.tensor(clip.positional_embedding.shape[0]))
        self.register_buffer("vocab_size", torch.tensor(clip.token_embedding.weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_torchscript_clip(path: Path, clip: CLIP) -> None:
    """A float16 TorchScript archive laid out like OpenAI's ViT-B-32.pt."""
    import copy

    half = copy.deepcopy(clip).half()
    resolution = half.visual.patch_size * round((half.visual.positional_embedding.shape[0] - 1) ** 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_Archive(half, resolution), torch.zeros(1), check_trace=False)
        traced.save(str(path))


def random_afine(clip: CLIP, seed: int = 1) -> AFINE:
    """An A-FINE model with random heads and non-default mapping parameters."""
    torch.manual_seed(seed)
    model = AFINE(clip)
    with torch.no_grad():
        for p in model.natural.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        model.fidelity.alpha.copy_(torch.randn_like(model.fidelity.alpha))
        model.fidelity.beta.copy_(torch.randn_like(model.fidelity.beta))
        model.natural_scale.yita3.fill_(0.3)
        model.natural_scale.yita4.fill_(0.7)
        model.fidelity_scale.yita3.fill_(0.4)
        model.fidelity_scale.yita4.fill_(0.2)
        model.adapter.k.fill_(0.8)
    return model.eval()


def write_checkpoints(folder: Path, model: AFINE) -> dict[str, Path]:
    """Merged afine.pth, the per-network folder, and CLIP in both formats. Returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"afine": folder / "afine.pth", "folder": folder / "networks", "clip_ts": folder / "clip_ts.pt",
             "clip_plain": folder / "clip_plain.pt"}
    save_afine(paths["afine"], model.parts())
    for part, name in PART_FILES.items():
        module = model.parts()[part]
        if part == "finetuned_clip":
            (paths["folder"]).mkdir(exist_ok=True)
            torch.save(module.state_dict(), paths["folder"] / name)
        else:
            save_network_file(paths["folder"] / name, module)
    write_torchscript_clip(paths["clip_ts"], model.clip)
    torch.save(model.clip.state_dict(), paths["clip_plain"])
    return paths


# A Ctrl-C to the command's whole process group (what a terminal sends) at the moment its AT-th DataLoader
# worker is forked (WHEN=fork) or, from another thread, as it asks a loader with workers for its AT-th batch
# (WHEN=batch); with GAP >= 0 a second one GAP seconds after the first, and with AGAIN=1 a second one as that
# loader shuts its workers down (after the command stopped): run as
# `python -c CTRL_C WHEN AT AGAIN GAP script.py args...` in a session of its own.
CTRL_C = """
import os, runpy, signal, sys, threading, time
import torch  # before the hook: only the forks of DataLoader workers count
from torch.utils.data import dataloader
when, at, again, gap = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
seen = []
def ctrl_c():
    os.killpg(os.getpgrp(), signal.SIGINT)
def later():
    if when == "batch":
        ctrl_c()
    if gap >= 0:
        time.sleep(gap)
        ctrl_c()
def hit():
    seen.append(True)
    if len(seen) == at:
        if when == "fork":
            ctrl_c()
        threading.Thread(target=later, daemon=True).start()
Iter = dataloader._MultiProcessingDataLoaderIter
shutdown, next_data = Iter._shutdown_workers, Iter._next_data
def ctrl_c_again(self):
    global again
    if again and len(seen) >= at:
        again = False
        ctrl_c()
    return shutdown(self)
def counted(self):
    hit()
    return next_data(self)
Iter._shutdown_workers = ctrl_c_again
if when == "fork":
    os.register_at_fork(after_in_parent=hit)
else:
    Iter._next_data = counted
sys.argv = sys.argv[5:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# A Ctrl-C as the command starts importing module M (torch, numpy: before any of the command's own code
# runs): `python -c CTRL_C_AT_IMPORT M script.py|-m module args...`.
CTRL_C_AT_IMPORT = """
import os, runpy, signal, sys
module = sys.argv[1]
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
if sys.argv[2] == "-m":
    sys.argv = sys.argv[3:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(code: str, args: list, cwd: Path) -> tuple[int, str]:
    from tests import procs

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = procs.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                     timeout=120)
    return proc.returncode, proc.stderr


def ctrl_c_at_worker(script: Path, args: list, cwd: Path, fork: int = 1, again: bool = False,
                     gap: float | None = None) -> tuple[int, str]:
    """(exit code, stderr) of `script args` hit by Ctrl-C as its `fork`-th DataLoader worker starts (and, with
    `again`, once more as that loader's workers are shut down; with `gap`, once more `gap` seconds later). The
    test fails if a process of the command outlives it (tests/procs.py)."""
    return _run(CTRL_C, ["fork", fork, int(again), -1 if gap is None else gap, script, *args], cwd)


def ctrl_c_at_batch(script: Path, args: list, cwd: Path, batch: int, gap: float | None = None) -> tuple[int, str]:
    """(exit code, stderr) of `script args` hit by Ctrl-C from another thread as it asks a loader with workers for
    its `batch`-th batch (and, with `gap`, once more `gap` seconds later): wherever the command then is, as a
    terminal's Ctrl-C would find it. The test fails if a process of the command outlives it."""
    return _run(CTRL_C, ["batch", batch, 0, -1 if gap is None else gap, script, *args], cwd)


def ctrl_c_at_import(command: list, module: str, cwd: Path) -> tuple[int, str]:
    """(exit code, stderr) of `command` (a script and its arguments, or ["-m", module, ...]) hit by Ctrl-C as it
    starts importing `module`."""
    return _run(CTRL_C_AT_IMPORT, [module, *command], cwd)
