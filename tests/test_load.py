"""Loading for scoring: only the image tower, memory-mapped, no random initialisation, keys still checked strictly."""

from __future__ import annotations

import gc
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from afine.checkpoint import PART_FILES, build_clip, read_afine_parts, save_afine
from afine.errors import AfineError
from afine.model import TERMS, load_afine
from tests import procs
from tests.tiny import random_afine, tiny_clip, write_checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("load")
    save_afine(folder / "afine.pth", random_afine(tiny_clip(seed=5)).parts())
    return folder / "afine.pth"


def scores(model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.rand(2, 3, 64, 96, generator=g), torch.rand(2, 3, 64, 96, generator=g))


def test_scoring_model_leaves_out_the_text_tower_and_scores_as_the_full_one(merged):
    lean, full = load_afine(merged), load_afine(merged, text_tower=True)
    assert all(k.startswith("visual.") for k in lean.clip.state_dict())
    assert "token_embedding.weight" in full.clip.state_dict() and "logit_scale" in full.clip.state_dict()
    a, b = scores(lean), scores(full)
    assert all(torch.equal(a[t], b[t]) for t in TERMS)


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map `path` (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_model_holds_its_own_memory_and_scoring_leaves_the_text_tower_unread(merged):
    model = load_afine(merged)
    full = load_afine(merged, text_tower=True)
    gc.collect()
    assert mapped_ranges(merged) == []  # nothing of the file is mapped: a change to it cannot reach the models
    assert all(not p.is_meta for m in (model, full) for p in m.parameters())
    lean_parts, full_parts = read_afine_parts(merged, towers="image")[0], read_afine_parts(merged)[0]
    for part, state in lean_parts.items():
        for key, value in state.items():
            unread = part == "finetuned_clip" and not key.startswith("visual.")
            assert value.is_meta == unread, (part, key)  # meta: shape and dtype only, no byte of it read
            assert value.shape == full_parts[part][key].shape and value.dtype == full_parts[part][key].dtype
            assert unread or torch.equal(value, full_parts[part][key])
    assert sum(v.is_meta for v in lean_parts["finetuned_clip"].values()) > 10


# Run in a process of its own (a SIGBUS would end the test session): load models and a loss from the files of
# folder A, score, change each file in place into folder B's file, score again; the numbers must not move.
REWRITE_CHILD = """
import sys
from pathlib import Path
import torch
from afine.afine_loss import AFINELoss
from afine.model import load_afine
how, a, b = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

def change(name):
    if how == "torch.save" and name.endswith(".pth"):  # torch.save opens the path for writing: in place
        torch.save(torch.load(b / name, weights_only=True), a / name)
        return
    data = (b / name).read_bytes()
    with open(a / name, "r+b") as f:  # what cp does over an existing file: truncate, then write
        f.truncate(0)
        f.write(data if how != "truncated" else data[:1024])  # cut short: the rest of the file is gone

g = torch.Generator().manual_seed(0)
dis, ref = torch.rand(2, 3, 64, 96, generator=g), torch.rand(2, 3, 64, 96, generator=g)
uses = {"afine.pth": lambda: load_afine(a / "afine.pth"),
        "clip_model.pth": lambda: load_afine(a / "networks"),
        "clip_plain.pt": lambda: load_afine(a / "heads", clip=a / "clip_plain.pt"),
        "clip_ts.pt": lambda: load_afine(a / "heads", clip=a / "clip_ts.pt")}
for name, load in uses.items():
    model = load()
    with torch.no_grad():
        before = model(dis, ref)
    change("networks/clip_model.pth" if name == "clip_model.pth" else name)
    with torch.no_grad():
        after = model(dis, ref)
    assert all(torch.equal(before[t], after[t]) for t in before), (name, before, after)
    if how != "truncated":  # the change matters: a model loaded now scores otherwise
        with torch.no_grad():
            assert not torch.equal(load()(dis, ref)["afine_all"], before["afine_all"]), name
loss = AFINELoss(a / "loss.pth")
out = dis.clone().requires_grad_()
first = loss(out, ref)
(grad,) = torch.autograd.grad(first, out)
change("loss.pth")
again = loss(out, ref)
assert torch.equal(first, again) and torch.equal(grad, torch.autograd.grad(again, out)[0]), (first, again)
print("unchanged")
"""


@pytest.mark.parametrize("how", ["truncated", "rewritten", "torch.save"])
def test_files_changed_under_a_running_model_or_loss_change_nothing(tmp_path, how):
    for name, seed in (("a", 5), ("b", 6)):
        paths = write_checkpoints(tmp_path / name, random_afine(tiny_clip(seed=seed), seed=seed))
        shutil.copy(paths["afine"], tmp_path / name / "loss.pth")
        (tmp_path / name / "heads").mkdir()
        for file in PART_FILES.values():
            if file != "clip_model.pth":
                shutil.copy(paths["folder"] / file, tmp_path / name / "heads" / file)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = procs.run([sys.executable, "-c", REWRITE_CHILD, how, tmp_path / "a", tmp_path / "b"], cwd=ROOT,
                     env=env, timeout=240)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"  # -7: killed by SIGBUS
    assert proc.stdout.strip() == "unchanged"


def test_a_file_changed_while_it_is_read_is_one_error_line(merged, tmp_path, monkeypatch):
    import afine.checkpoint

    path = tmp_path / "afine.pth"
    shutil.copy(merged, path)
    other = tmp_path / "other.pth"
    save_afine(other, random_afine(tiny_clip(seed=7), seed=7).parts())
    load = torch.load

    def load_then_change(f, *args, **kwargs):  # the file is rewritten in place between its structure and its bytes
        out = load(f, *args, **kwargs)
        with open(path, "r+b") as g:
            g.write(other.read_bytes())
        return out

    monkeypatch.setattr(afine.checkpoint.torch, "load", load_then_change)
    with pytest.raises(AfineError) as info:
        load_afine(path)
    assert str(info.value) == f"{path}: changed while being read (is something writing it?); run again once it is " \
                              "written"


def test_clip_is_built_without_random_initialisation(merged, monkeypatch):
    drawn = []

    def spy(function):
        def record(*args, **kwargs):
            out = function(*args, **kwargs)
            if not out.is_meta:
                drawn.append(tuple(out.shape))
            return out
        return record

    for name in ("kaiming_uniform_", "xavier_uniform_", "normal_", "uniform_"):
        monkeypatch.setattr(nn.init, name, spy(getattr(nn.init, name)))
    monkeypatch.setattr(torch, "randn", spy(torch.randn))
    state = read_afine_parts(merged)[0]["finetuned_clip"]
    for text_tower in (False, True):
        build_clip(state, "afine.pth", text_tower)
    assert drawn == []
    tiny_clip()
    assert drawn  # the spies see the draws of an ordinary build


@pytest.mark.parametrize("case, culprit", [
    ("renamed", "token_embedding.weight"),
    ("renamed_unused_by_the_config", "ln_final.bias"),
    ("wrong_shape", r"transformer.resblocks.0.attn.out_proj.weight \(3, 3\)"),
    ("extra", "transformer.resblocks.0.extra"),
])
def test_text_tower_keys_are_still_checked_strictly(merged, tmp_path, case, culprit):
    parts = torch.load(merged, weights_only=True)
    clip = parts["finetuned_clip"]
    if case.startswith("renamed"):
        key = culprit
        clip[key + "s"] = clip.pop(key)
    elif case == "wrong_shape":
        clip["transformer.resblocks.0.attn.out_proj.weight"] = torch.zeros(3, 3)
    else:
        clip["transformer.resblocks.0.extra"] = torch.zeros(1)
    torch.save(parts, tmp_path / "bad.pth")
    with pytest.raises(AfineError, match=rf"bad.pth\[finetuned_clip\]: .*{culprit}"):
        load_afine(tmp_path / "bad.pth")


def test_float16_and_legacy_format_files_score_the_same(merged, tmp_path):
    parts = torch.load(merged, weights_only=True)
    half = {**parts, "finetuned_clip": {k: v.half() for k, v in parts["finetuned_clip"].items()}}
    torch.save(half, tmp_path / "half.pth")
    torch.save(parts, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    lean, full = load_afine(tmp_path / "half.pth"), load_afine(tmp_path / "half.pth", text_tower=True)
    for name, p in lean.clip.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, half["finetuned_clip"][name].float())
    a, b = scores(lean), scores(full)
    assert all(torch.equal(a[t], b[t]) for t in TERMS)
    a, b = scores(load_afine(tmp_path / "legacy.pth")), scores(load_afine(merged))
    assert all(torch.equal(a[t], b[t]) for t in TERMS)



def with_values(merged: Path, path: Path, part: str, key: str, values: list[float]) -> Path:
    """A copy of the merged file with the first values of parts[part][key] replaced."""
    parts = torch.load(merged, weights_only=True)
    flat = parts[part][key].view(-1)
    flat[: len(values)] = torch.tensor(values)
    torch.save(parts, path)
    return path


@pytest.mark.parametrize("part, key", [("finetuned_clip", "visual.transformer.resblocks.1.mlp.c_fc.weight"),
                                       ("natural", "proj_head.0.weight")])
def test_huge_but_finite_weights_whose_sum_overflows_are_not_refused(merged, tmp_path, part, key):
    huge = [3e38, 3e38, 3e38, -3e38, -3e38, -3e38, 3e38, 3e38]  # partial sums overflow both ways: the sum is NaN
    path = with_values(merged, tmp_path / "huge.pth", part, key, huge)
    for text_tower in (False, True):
        model = load_afine(path, text_tower=text_tower)
        loaded = (model.clip if part == "finetuned_clip" else getattr(model, part)).state_dict()
        inner = key.removeprefix("visual.") if part == "finetuned_clip" else key
        value = loaded.get(key, loaded.get(inner))
        assert value.view(-1)[: len(huge)].tolist() == torch.tensor(huge).tolist()


@pytest.mark.parametrize("values", [[math.inf], [math.nan], [-math.inf], [3e38, 3e38, math.nan], [math.inf, -math.inf]])
@pytest.mark.parametrize("part, key", [("finetuned_clip", "visual.transformer.resblocks.1.mlp.c_fc.weight"),
                                       ("finetuned_clip", "visual.ln_post.bias"), ("fidelity", "alpha")])
def test_one_nan_or_infinity_in_a_tensor_is_refused_naming_it(merged, tmp_path, part, key, values):
    path = with_values(merged, tmp_path / "bad.pth", part, key, values)
    for text_tower in (False, True):
        with pytest.raises(AfineError) as info:
            load_afine(path, text_tower=text_tower)
        assert str(info.value) == f"{path}[{part}]: tensor {key!r} holds NaN or infinity"


def test_the_finite_check_makes_no_boolean_copy_of_finite_weights(merged, monkeypatch):
    import afine.checkpoint

    checked = []
    isfinite = torch.isfinite

    def spy(t):
        checked.append(t.numel())
        return isfinite(t)

    monkeypatch.setattr(afine.checkpoint.torch, "isfinite", spy)
    load_afine(merged)
    load_afine(merged, text_tower=True)
    assert [n for n in checked if n > 1] == []  # one reduction per tensor, nothing the size of a tensor
