"""Loading for scoring: only the image tower, memory-mapped, no random initialisation, keys still checked strictly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from afine.checkpoint import build_clip, read_afine_parts, save_afine
from afine.errors import AfineError
from afine.model import TERMS, load_afine
from tests.tiny import random_afine, tiny_clip


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
    lean, full = load_afine(None, merged), load_afine(None, merged, text_tower=True)
    assert all(k.startswith("visual.") for k in lean.clip.state_dict())
    assert "token_embedding.weight" in full.clip.state_dict() and "logit_scale" in full.clip.state_dict()
    a, b = scores(lean), scores(full)
    assert all(torch.equal(a[t], b[t]) for t in TERMS)
    with pytest.raises(AfineError, match=r"loaded for scoring.*text_tower=True"):
        lean.parts()  # exporting it would write an afine.pth without the text tower


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
def test_image_tower_is_the_files_mapped_pages_not_a_copy(merged):
    model = load_afine(None, merged)
    ranges = mapped_ranges(merged)
    assert ranges
    for name, p in model.clip.named_parameters():
        assert any(start <= p.data_ptr() < end for start, end in ranges), name
    full = load_afine(None, merged, text_tower=True)  # training and export get their own copies
    assert not any(start <= p.data_ptr() < end for p in full.clip.parameters() for start, end in mapped_ranges(merged))


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
        load_afine(None, tmp_path / "bad.pth")


def test_float16_and_legacy_format_files_score_the_same(merged, tmp_path):
    parts = torch.load(merged, weights_only=True)
    half = {**parts, "finetuned_clip": {k: v.half() for k, v in parts["finetuned_clip"].items()}}
    torch.save(half, tmp_path / "half.pth")
    torch.save(parts, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    lean, full = load_afine(None, tmp_path / "half.pth"), load_afine(None, tmp_path / "half.pth", text_tower=True)
    for name, p in lean.clip.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, half["finetuned_clip"][name].float())
    a, b = scores(lean), scores(full)
    assert all(torch.equal(a[t], b[t]) for t in TERMS)
    a, b = scores(load_afine(None, tmp_path / "legacy.pth")), scores(load_afine(None, merged))
    assert all(torch.equal(a[t], b[t]) for t in TERMS)

