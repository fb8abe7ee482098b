"""The A-FINE model: CLIP image tower + naturalness and fidelity heads + mappings + adapter (docs/scoring.md).

    D(dis, ref) = F(dis, ref) + exp(k (N(ref) - N(dis))) N(dis),   lower is better.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .checkpoint import PART_FILES, build_clip, load_strict, read_afine_parts, read_clip_file
from .clip import CLIP
from .errors import AfineError
from .fidelity import FidelityHead
from .image import preprocess
from .mapping import Adapter, FidelityMapping, NaturalnessMapping, final_scale
from .naturalness import NaturalnessHead

TERMS = ("afine_all_scale", "afine_all", "afine_fr", "afine_nr", "afine_nr_ref")
HEADS = ("natural", "fidelity", "natural_scale", "fidelity_scale", "adapter")
PRECISIONS = ("fp32", "bf16", "fp16")  # of the CLIP forward pass; heads, mappings and adapter always run in float32
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str):
    """Mixed precision for the CLIP forward pass: bf16 or fp16 autocast. fp32 (training's amp "off") changes
    nothing, so float32 runs as published and a caller's own torch.autocast still applies."""
    dtype = HALF.get(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


class AFINE(nn.Module):
    """Attribute names follow the released `afine.pth` parts (`clip` holds `finetuned_clip`)."""

    def __init__(self, clip: CLIP):
        super().__init__()
        width, layers = clip.visual.conv1.out_channels, len(clip.visual.transformer.resblocks)
        self.clip = clip
        self.natural = NaturalnessHead(width, layers)
        self.fidelity = FidelityHead(width, layers)
        self.natural_scale = NaturalnessMapping()
        self.fidelity_scale = FidelityMapping()
        self.adapter = Adapter()
        self.compiled_tower = None  # afine.compiled.compile_model sets it: encode then runs the compiled tower

    def tower(self, images: torch.Tensor, checkpoint_blocks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessing and CLIP: images [B, 3, H, W] in [0, 1] -> (normalised, resized images; features
        [B, L, T, W]). The part that `--compile` compiles (afine/compiled.py)."""
        x = preprocess(images)
        return x, torch.stack(self.clip.visual(x, checkpoint_blocks), dim=1)

    def encode(self, images: torch.Tensor, checkpoint_blocks: bool = False,
               precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] in [0, 1] -> (normalised, resized images; CLIP features [B, L, T, W]).

        `precision` bf16 or fp16 runs CLIP under autocast (docs/scoring.md, "Precision") and returns float32 for the
        heads; fp32 (training's amp "off") is exact and returns the model's own dtype (float64 for a .double() model).
        """
        with autocast(images.device, precision):
            x, features = (self.compiled_tower or self.tower)(images, checkpoint_blocks)
        return (x.float(), features.float()) if precision in HALF else (x, features)

    def terms(self, n_dis: torch.Tensor, n_ref: torch.Tensor, f: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw N(dis), N(ref), F(dis, ref) [B] -> the five published terms [B]."""
        natural_dis, natural_ref = self.natural_scale(n_dis), self.natural_scale(n_ref)
        fidelity = self.fidelity_scale(f)
        d = self.adapter(fidelity, natural_dis, natural_ref)
        return {"afine_all_scale": final_scale(d), "afine_all": d, "afine_fr": fidelity,
                "afine_nr": natural_dis, "afine_nr_ref": natural_ref}

    def score(self, dis: torch.Tensor, refs: torch.Tensor, ref_index: torch.Tensor,
              precision: str = "fp32") -> dict[str, torch.Tensor]:
        """dis [B, 3, H, W] paired with refs[ref_index] (refs [U, 3, H, W], each distinct reference once).

        Test and reference images go through CLIP together (in `precision`), each reference once.
        """
        if dis.shape[1:] != refs.shape[1:]:
            raise ValueError(f"dis and ref sizes differ: {tuple(dis.shape[-2:])} vs {tuple(refs.shape[-2:])}")
        x, features = self.encode(torch.cat([dis, refs]), precision=precision)
        b = dis.shape[0]
        n = self.natural(x, features)
        ref_index = ref_index.to(x.device) + b
        if refs.shape[0] == 1:  # one shared reference: broadcast it rather than copy its features B times
            f = self.fidelity(x[:b], features[:b], x[b:], features[b:])
        else:
            f = self.fidelity(x[:b], features[:b], x[ref_index], features[ref_index])
        return self.terms(n[:b], n[ref_index], f)

    def forward(self, dis: torch.Tensor, ref: torch.Tensor, precision: str = "fp32") -> dict[str, torch.Tensor]:
        """dis [B, 3, H, W] and ref [B or 1, 3, H, W] in [0, 1] -> the five terms, each [B].

        A reference batch of 1 is paired with every test image and encoded once; CLIP runs in `precision`.
        """
        if ref.shape[0] not in (1, dis.shape[0]):
            raise ValueError(f"ref batch must be 1 or {dis.shape[0]}, got {ref.shape[0]}")
        ref_index = torch.arange(dis.shape[0]) if ref.shape[0] == dis.shape[0] else torch.zeros(dis.shape[0],
                                                                                                dtype=torch.long)
        return self.score(dis, ref, ref_index, precision)

    def load_parts(self, parts: dict[str, dict[str, torch.Tensor]], sources: dict[str, str]) -> None:
        """Load the given released parts strictly (`finetuned_clip` into `clip`)."""
        for part, state in parts.items():
            load_strict(self.clip if part == "finetuned_clip" else getattr(self, part), state, sources[part])

    def parts(self) -> dict[str, nn.Module]:
        """The six parts of a merged `afine.pth`, by their released names."""
        if not self.clip.text_tower:
            raise AfineError("this model was loaded for scoring, without CLIP's text tower; load it with "
                             "load_afine(..., text_tower=True) to save or train it")
        return {part: self.clip if part == "finetuned_clip" else getattr(self, part) for part in PART_FILES}


def load_afine(clip: str | Path | None, weights: str | Path | None, require: tuple[str, ...] = HEADS,
               default_clip: str | Path | None = None, text_tower: bool = False) -> AFINE:
    """An A-FINE model from a CLIP checkpoint and A-FINE weights (merged `afine.pth` or a folder of files).

    The fine-tuned CLIP inside the weights, when present, replaces the CLIP checkpoint's weights.
    `require` names the parts the caller needs; a missing one is an AfineError naming the weights path.
    `default_clip` is read when no `clip` is given and the weights hold no fine-tuned CLIP.
    The model is for scoring: CLIP's text tower is checked but not loaded (A-FINE never runs it), and a float32
    image tower is used from the memory-mapped file. `text_tower=True` loads the whole CLIP, to train or save it.
    """
    parts, sources = read_afine_parts(weights) if weights is not None else ({}, {})
    missing = [p for p in require if p not in parts]
    if missing:
        raise AfineError(f"{weights}: A-FINE parts missing: {', '.join(missing)}")
    if clip is not None and not Path(clip).is_file():
        raise AfineError(f"{clip}: CLIP checkpoint not found")
    if "finetuned_clip" in parts:
        clip_state, clip_source = parts.pop("finetuned_clip"), sources["finetuned_clip"]
    elif clip is not None or default_clip is not None:
        clip = clip if clip is not None else default_clip
        if not Path(clip).is_file():
            raise AfineError(f"{clip}: CLIP checkpoint not found ({weights} holds no fine-tuned CLIP; --clip points "
                             "to one)")
        clip_state, clip_source = read_clip_file(clip), str(clip)
    else:
        raise AfineError(f"{weights}: holds no fine-tuned CLIP; give the CLIP checkpoint (--clip)")
    model = AFINE(build_clip(clip_state, clip_source, text_tower))
    model.load_parts(parts, sources)
    return model.eval()


def load_init(model: AFINE, path: str | Path, names: tuple[str, ...]) -> None:
    """Start the parts `names` from a released or earlier model (afine.pth or a run folder): fine-tuning."""
    parts, sources = read_afine_parts(path)
    missing = [name for name in names if name not in parts]
    if missing:
        raise AfineError(f"{path}: init_from holds no {', '.join(missing)}")
    model.load_parts({name: parts[name] for name in names}, sources)
