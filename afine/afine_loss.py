"""A-FINE as a training loss for restoration and super-resolution networks (docs/loss.md).

    criterion = AFINELoss("afine.pth", term="afine_all")
    loss = l1(output, gt) + w * criterion(output, gt)

The value of each term is the one scoring gives for the same images (the model's own encode, heads and terms);
gradients reach `output` only. The A-FINE model is frozen and stays in eval mode, the reference goes through it
without autograd, and the inputs are never modified.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .compiled import compile_model
from .errors import check_choice
from .image import MIN_SIDE
from .model import AFINE, HEADS, load_afine

# Terms that depend on the output image, and the parts of the weights each needs. `afine_nr_ref` (the
# naturalness of the reference) does not depend on the output, so it is no loss.
LOSS_TERMS = {"afine_all": HEADS, "afine_all_scale": HEADS, "afine_fr": ("fidelity", "fidelity_scale"),
              "afine_nr": ("natural", "natural_scale")}
REDUCTIONS = ("mean", "sum", "none")
AMP = ("off", "bf16", "fp16")  # the CLIP tower's precision, named as training's --amp
GRADIENTS = ("stable", "exact")  # of the fidelity statistics S1, S2 (see forward)
LOW_PRECISION = (torch.float16, torch.bfloat16)  # dtypes the frozen model is never converted to (see _apply)
# Reference pixel values beyond these are another convention ([0, 255], [-1, 1]), not [0, 1] images.
PLAUSIBLE = (-0.5, 1.5)


class AFINELoss(nn.Module):
    """A-FINE term `term` of `output` against `reference` (lower is better), reduced over the batch.

    weights: an `afine.pth` (released or trained here), a run folder, or an AFINE model (frozen in place);
    `clip` is the CLIP checkpoint for weights that hold no fine-tuned CLIP, as for load_afine.
    checkpoint_blocks: recompute the CLIP blocks in the backward pass (less memory, about one more forward).
    amp: "bf16" or "fp16" runs the CLIP tower of the loss's forward and backward in autocast; the heads and their
    statistics stay float32. With "fp16", scale the loss (torch.amp.GradScaler) as for any fp16 network.
    `.half()` / `.bfloat16()` (on the loss or a network holding it) leave the frozen model in float32: see _apply.
    gradient: "stable" (default) takes the gradient of the fidelity statistics S1, S2 from a well-conditioned twin
    (bounded on near-constant channels), "exact" from the published formulas; the values are the same, bit for
    bit (docs/loss.md).
    compile: compile the CLIP tower with torch.compile (afine/compiled.py), once per output shape; in place, so an
    AFINE model given as `weights` runs compiled elsewhere too. Measured on CPU only (docs/loss.md).
    save_weights: include the frozen A-FINE weights in state_dict() (by default a model holding this loss as a
    submodule saves and strictly loads its checkpoints without them).
    """

    def __init__(self, weights: str | Path | AFINE, term: str = "afine_all", reduction: str = "mean",
                 clip: str | Path | None = None, checkpoint_blocks: bool = False, amp: str = "off",
                 save_weights: bool = False, gradient: str = "stable", compile: bool = False):
        super().__init__()
        check_choice("term", term, LOSS_TERMS,
                     " (it does not depend on the output; afine_nr is the output's)" if term == "afine_nr_ref" else "")
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("amp", amp, AMP)
        check_choice("gradient", gradient, GRADIENTS)
        self.term, self.reduction, self.amp, self.gradient = term, reduction, amp, gradient
        self.checkpoint_blocks, self.save_weights = checkpoint_blocks, save_weights
        self.afine = weights if isinstance(weights, AFINE) else load_afine(weights, clip=clip, require=LOSS_TERMS[term])
        self.afine.requires_grad_(False).eval()
        if compile:
            compile_model(self.afine)
        self.register_state_dict_post_hook(drop_frozen_weights)
        self.register_load_state_dict_pre_hook(keep_frozen_weights)

    def train(self, mode: bool = True) -> AFINELoss:
        """The A-FINE model stays in eval mode whatever the caller (or a parent module) asks."""
        super().train(mode)
        self.afine.eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        """`.half()`, `.bfloat16()` or `.to(torch.float16)`, on the loss or on a network holding it, move the frozen
        A-FINE model where asked but keep its dtype: in float16 its heads' c = 1e-10 is 0 and their variances
        overflow, and the loss was NaN. The loss's own precision is `amp`; the output's gradient comes back in the
        output's dtype. Every other conversion (.to(device), .double(), ...) applies as to any module."""
        with torch.no_grad():
            probe = fn(torch.zeros(1, device=self.afine.fidelity.alpha.device))
        if isinstance(probe, torch.Tensor) and probe.dtype in LOW_PRECISION:
            device = probe.device
            return super()._apply(lambda t: t.to(device), recurse)
        return super()._apply(fn, recurse)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """model.encode (preprocessing, CLIP) in the loss's precision; results in the heads' dtype (float32)."""
        dtype = self.afine.fidelity.alpha.dtype
        precision = "fp32" if self.amp == "off" else self.amp
        x, features = self.afine.encode(images.to(dtype), self.checkpoint_blocks, precision)
        return x.to(dtype), features.to(dtype)

    def forward(self, output: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """output [B, 3, H, W] and reference [B or 1, 3, H, W], RGB in [0, 1], H and W >= 32 -> the loss
        (a scalar, or [B] with reduction "none"). `afine_nr` takes no reference (one given is not used)."""
        needs_reference = self.term != "afine_nr"
        check_images("output", output)
        if needs_reference:
            check_pair(output, reference)
        model = self.afine
        if needs_reference:  # first, while little else is held
            with torch.no_grad():
                y, y_features = self.encode(reference)
                n_ref = model.natural(y, y_features) if self.term != "afine_fr" else None
        x, features = self.encode(output)
        if self.term == "afine_nr":
            value = model.natural_scale(model.natural(x, features))
        else:
            # "stable": S1, S2 take their gradient from a well-conditioned twin; their values are the published
            # ones. Level by level: one CLIP level's temporaries at a time.
            f = model.fidelity.from_similarities(*model.fidelity.similarities(
                x, features, y, y_features, stable_gradient=self.gradient == "stable", by_level=True))
            del y, y_features  # not needed any more: free them before the naturalness head runs
            if self.term == "afine_fr":
                value = model.fidelity_scale(f)
            else:
                value = model.terms(model.natural(x, features), n_ref, f)[self.term]
        if self.reduction == "none":
            return value
        return value.mean() if self.reduction == "mean" else value.sum()

    def extra_repr(self) -> str:
        return (f"term={self.term!r}, reduction={self.reduction!r}, amp={self.amp!r}, gradient={self.gradient!r}, "
                f"checkpoint_blocks={self.checkpoint_blocks}, save_weights={self.save_weights}")


def check_images(name: str, images: torch.Tensor) -> None:
    """A ValueError naming the input unless it is a float RGB batch [B, 3, H, W] with H, W >= 32."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor [B, 3, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"{name}: expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected floating-point RGB in [0, 1], got {images.dtype}")
    if min(images.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"{name}: images must be at least {MIN_SIDE}x{MIN_SIDE} px, got shape {tuple(images.shape)}")


def check_pair(output: torch.Tensor, reference: torch.Tensor | None) -> None:
    """A ValueError unless `reference` is an image batch of the output's size, of 1 or the output's batch, in [0, 1]
    and finite.

    The reference is data, so values far outside [0, 1] are another convention ([0, 255], [-1, 1]); the output
    is not checked: a network in training overshoots [0, 1] by any amount, and is scored as it is.
    """
    if reference is None:
        raise ValueError("this term needs a reference image: criterion(output, reference)")
    check_images("reference", reference)
    if reference.shape[-2:] != output.shape[-2:]:
        raise ValueError(f"output and reference sizes differ: {tuple(output.shape)} vs {tuple(reference.shape)}")
    if reference.shape[0] not in (1, output.shape[0]):
        raise ValueError(f"reference batch must be 1 or {output.shape[0]} (the output's), got shape "
                         f"{tuple(reference.shape)}")
    # one reduction and one device sync; a NaN anywhere makes both NaN
    low, high = torch.stack(torch.aminmax(reference.detach())).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        kind = "NaN" if math.isnan(low) or math.isnan(high) else "infinite"
        raise ValueError(f"reference: expected RGB in [0, 1], got {kind} values")
    if low < PLAUSIBLE[0] or high > PLAUSIBLE[1]:
        raise ValueError(f"reference: expected RGB in [0, 1], got values in [{low:.4g}, {high:.4g}] "
                         "(a [0, 255] or [-1, 1] image?)")


def drop_frozen_weights(module: AFINELoss, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict() post-hook: leave the frozen A-FINE weights out unless `save_weights`."""
    if not module.save_weights:
        for key in [k for k in state_dict if k.startswith(prefix + "afine.")]:
            del state_dict[key]


def keep_frozen_weights(module: AFINELoss, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict() pre-hook: a checkpoint without the A-FINE weights keeps the loaded ones (strict loads
    pass); a checkpoint with them (save_weights) loads them."""
    for key, value in module.afine.state_dict(prefix=prefix + "afine.", keep_vars=True).items():
        state_dict.setdefault(key, value)
