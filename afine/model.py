"""The A-FINE model: CLIP image tower + naturalness and fidelity heads + mappings + adapter (docs/scoring.md).

    D(dis, ref) = F(dis, ref) + exp(k (N(ref) - N(dis))) N(dis),   lower is better.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    PART_FILES,
    build_clip,
    file_stamp,
    load_strict,
    read_afine_parts,
    read_clip_file,
    read_text_tower,
    weight_files,
)
from .clip import CLIP
from .download import released_path, released_weights
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
        # where a model loaded for scoring (no text tower) finds its CLIP's text tower to be exported whole:
        # (file, kind, file stamp), see load_afine and checkpoint.read_text_tower
        self.text_tower_source: tuple | None = None
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
        """The six parts of a merged `afine.pth`, by their released names: `save_afine("afine.pth", model.parts())`.

        A model loaded for scoring holds no text tower: its `finetuned_clip` is then a new CLIP made of the model's
        image tower and the text tower read now from the file the model was loaded from (an AfineError if that file
        changed since, or if the model was not loaded from a file).
        """
        clip = self.clip if self.clip.text_tower else self.whole_clip()
        return {part: clip if part == "finetuned_clip" else getattr(self, part) for part in PART_FILES}

    def whole_clip(self) -> CLIP:
        """The model's CLIP with the text tower of the file it was loaded from (see parts)."""
        if self.text_tower_source is None:
            raise AfineError("this model holds no CLIP text tower, and no file it was loaded from has one; load it "
                             "with load_afine(..., text_tower=True) to save or train it")
        file, kind, stamp = self.text_tower_source
        image = {k: v.detach() for k, v in self.clip.state_dict().items()}
        device = next(iter(image.values())).device
        text = {k: v.to(device) for k, v in read_text_tower(file, kind, stamp).items()}
        return build_clip({**text, **image}, str(file))


OLD_ORDER = ("clip", "weights", "require", "default_clip", "text_tower")  # load_afine's positional order in 0.1


def load_afine(weights: str | Path | None = None, *old_order, clip: str | Path | None = None,
               require: tuple[str, ...] = HEADS, default_clip: str | Path | None = None,
               text_tower: bool = False) -> AFINE:
    """An A-FINE model (docs/scoring.md): `load_afine()` is the released one, downloaded on first use.

    weights: a merged `afine.pth` or a folder of per-network files (a run folder); none: the released afine.pth,
    from the torch hub cache or downloaded there first (afine/download.py; AFINE_OFFLINE=1 forbids the download).
    clip: the CLIP checkpoint, needed only when the weights hold no fine-tuned CLIP (`default_clip` is read then if
    `clip` is not given). `require` names the parts the caller needs; a missing one is an AfineError naming the
    weights. Failures are an AfineError with a one-line message.
    The model is for scoring: CLIP's text tower has its keys and shapes checked but is never read (A-FINE never
    runs it); `model.parts()` reads it when the model is exported. `text_tower=True` loads the whole CLIP, to
    train the model. The model holds its own copy of every tensor: a file changed afterwards changes nothing.

    The order of 0.1, `load_afine(clip, weights, ...)`, still works until the next release, with a
    DeprecationWarning: a second positional argument means that order (in the new one, `clip` is keyword-only).
    """
    if old_order:
        if len(old_order) > len(OLD_ORDER) - 1:
            raise TypeError(f"load_afine() takes at most {len(OLD_ORDER)} positional arguments in the old order "
                            f"(clip, weights, require, default_clip, text_tower), {len(old_order) + 1} given")
        given = dict(zip(OLD_ORDER, (weights, *old_order)))
        keywords = {"clip": clip is not None, "require": require is not HEADS,
                    "default_clip": default_clip is not None, "text_tower": text_tower is not False}
        twice = [name for name in given if keywords.get(name)]
        if twice:
            raise TypeError(f"load_afine() got multiple values for {', '.join(map(repr, twice))}")
        warnings.warn("load_afine(clip, weights) is deprecated and goes in the next release: give the weights first, "
                      "load_afine(weights, clip=clip)", DeprecationWarning, stacklevel=2)
        return read_afine(given["weights"], given["clip"], given.get("require", require),
                          given.get("default_clip", default_clip), given.get("text_tower", text_tower))
    if weights is None:
        try:
            weights = released_weights(instead='pass the file: load_afine("afine.pth")', check=check_weights)
        except AfineError as e:  # raised again here, without its context: a traceback of two lines ends at the call
            raise AfineError(str(e)) from None
    try:
        return read_afine(weights, clip, require, default_clip, text_tower)
    except AfineError as e:
        if not is_released_file(weights):
            raise
        # the downloaded released file no longer loads (a copy cut short, a disk error): say how to get it again
        raise AfineError(f"{e} (the released weights downloaded to {weights} are damaged: delete that file and run "
                         "again to download them afresh)") from None


def is_released_file(weights: str | Path) -> bool:
    """Whether `weights` is the file the released weights were downloaded to (afine/download.py)."""
    try:
        return Path(weights).is_file() and os.path.samefile(weights, released_path())
    except OSError:
        return False


def check_weights(path: Path) -> None:
    """AfineError unless `path` loads strictly as a model for scoring: a downloaded afine.pth is kept only then."""
    read_afine(path, None, HEADS, None, False)


def read_afine(weights: str | Path | None, clip: str | Path | None, require: tuple[str, ...],
               default_clip: str | Path | None, text_tower: bool) -> AFINE:
    """load_afine's work once the weights are known (None: only a CLIP, for callers of the old order)."""
    towers = "both" if text_tower else "image"
    # the files' stamps before they are read: a model loaded for scoring reads its text tower only at export, from
    # the file it was loaded from, if that file is still the same
    files = [*(weight_files(weights) if weights is not None else []), *(Path(c) for c in (clip, default_clip) if c)]
    stamps = {}
    for file in files:
        try:
            stamps[os.path.realpath(file)] = file_stamp(os.stat(file))
        except OSError:
            pass
    parts, sources = read_afine_parts(weights, towers) if weights is not None else ({}, {})
    missing = [p for p in require if p not in parts]
    if missing:
        raise AfineError(f"{weights}: A-FINE parts missing: {', '.join(missing)}")
    if clip is not None and not Path(clip).is_file():
        raise AfineError(f"{clip}: CLIP checkpoint not found")
    if "finetuned_clip" in parts:
        clip_state, clip_source = parts.pop("finetuned_clip"), sources["finetuned_clip"]
        clip_file, kind = (Path(clip_source), "plain") if Path(weights).is_dir() else (Path(weights), "merged")
    elif clip is not None or default_clip is not None:
        clip = clip if clip is not None else default_clip
        if not Path(clip).is_file():
            raise AfineError(f"{clip}: CLIP checkpoint not found ({weights} holds no fine-tuned CLIP; --clip points "
                             "to one)")
        clip_state, clip_source = read_clip_file(clip, towers=towers), str(clip)
        clip_file, kind = Path(clip), "clip"
    else:
        raise AfineError(f"{weights}: holds no fine-tuned CLIP; give the CLIP checkpoint (--clip)")
    model = AFINE(build_clip(clip_state, clip_source, text_tower))
    model.load_parts(parts, sources)
    stamp = stamps.get(os.path.realpath(clip_file))
    if not text_tower and stamp is not None:
        model.text_tower_source = (str(clip_file), kind, stamp)
    return model.eval()


def load_init(model: AFINE, path: str | Path, names: tuple[str, ...]) -> None:
    """Start the parts `names` from a released or earlier model (afine.pth or a run folder): fine-tuning."""
    parts, sources = read_afine_parts(path)
    missing = [name for name in names if name not in parts]
    if missing:
        raise AfineError(f"{path}: init_from holds no {', '.join(missing)}")
    model.load_parts({name: parts[name] for name in names}, sources)
