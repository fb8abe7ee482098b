"""A-FINE as a torchmetrics metric, for validation loops (docs/scoring.md, "torchmetrics").

    metric = AFINEMetric()                 # the released weights, downloaded on first use
    for output, reference in loader:
        metric.update(output, reference)   # RGB in [0, 1], [B, 3, H, W], any size from 32 px
    metric.compute()                       # the mean over every image seen, on every process

torchmetrics is an optional package (`pip install torchmetrics`, or `pip install '.[metrics]'` here): `import afine`
does not import it, and `afine.AFINEMetric` without it is one error saying how to install it. The states are a sum
and a count (and the values with reduction "none"), reduced across processes by torchmetrics, so a distributed
validation gives the mean over all images, not a mean of per-process means. Each update scores as `afine score`
does: the same model, the same preprocessing, the same terms.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .afine_loss import REDUCTIONS, check_images
from .errors import check_choice, optional_import
from .model import AFINE, PRECISIONS, TERMS, load_afine

torchmetrics = optional_import("torchmetrics", "torchmetrics", "metrics", "afine.AFINEMetric")
from torchmetrics.utilities import dim_zero_cat  # noqa: E402  (after the check that torchmetrics is there)

# Where each term lies, for torchmetrics' plots: the 0-100 scale, and the (-2, 2) of the mapped terms; D is unbounded.
BOUNDS = {"afine_all_scale": (0.0, 100.0), "afine_all": (None, None), "afine_fr": (-2.0, 2.0),
          "afine_nr": (-2.0, 2.0), "afine_nr_ref": (-2.0, 2.0)}


class AFINEMetric(torchmetrics.Metric):
    """A-FINE term `term` of test images against their references (lower is better), over every update.

    weights: None for the released afine.pth (downloaded on first use, as `afine score` does), an afine.pth or a run
    folder, or a loaded AFINE model (frozen in place; several metrics can share one). `clip` is the CLIP checkpoint
    for weights that hold no fine-tuned CLIP. reduction: "mean" (default) or "sum" over all images, or "none" for
    every image's value, in update order (process by process under torch.distributed). precision: CLIP's, as
    `afine score --precision`. Other keyword arguments go to torchmetrics.Metric (dist_sync_on_step, ...).

    The model follows the metric's device (`.to()`), stays frozen and in eval mode, and is left out of the
    metric's state dict; inputs are moved to its device.
    """

    higher_is_better = False
    is_differentiable = False  # the model runs without autograd; AFINELoss is the differentiable form
    full_state_update = False

    def __init__(self, weights: str | Path | AFINE | None = None, term: str = "afine_all_scale",
                 reduction: str = "mean", clip: str | Path | None = None, precision: str = "fp32", **kwargs):
        super().__init__(**kwargs)
        check_choice("term", term, TERMS)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("precision", precision, PRECISIONS)
        self.term, self.reduction, self.precision = term, reduction, precision
        if not isinstance(weights, AFINE):
            weights = load_afine(weights, clip=clip)  # None: the released weights, downloaded on first use
        self.afine = weights.requires_grad_(False).eval()
        self.register_state_dict_post_hook(drop_model_weights)
        self.register_load_state_dict_pre_hook(keep_model_weights)
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if reduction == "none":
            self.add_state("values", [], dist_reduce_fx="cat")

    @property
    def plot_lower_bound(self) -> float | None:
        return BOUNDS[self.term][0]

    @property
    def plot_upper_bound(self) -> float | None:
        return BOUNDS[self.term][1]

    def train(self, mode: bool = True) -> AFINEMetric:
        """The A-FINE model stays in eval mode whatever the caller (or a parent module) asks."""
        super().train(mode)
        self.afine.eval()
        return self

    def update(self, output: torch.Tensor, reference: torch.Tensor) -> None:
        """Score test images `output` [B, 3, H, W] against `reference` [B or 1, 3, H, W]: RGB in [0, 1], H and W
        at least 32 (resized to multiples of 32 inside, as `afine score` does). Sizes may change between updates."""
        check_batch(output, reference)
        weight = self.afine.fidelity.alpha
        with torch.no_grad():
            terms = self.afine(output.to(weight.device, weight.dtype), reference.to(weight.device, weight.dtype),
                               precision=self.precision)
        values = terms[self.term].detach().to(self.total.device, self.total.dtype)
        self.total += values.sum()
        self.count += values.numel()
        if self.reduction == "none":
            self.values.append(values)

    def compute(self) -> torch.Tensor:
        """The mean (NaN before any image) or sum over every image of every process, or, with reduction "none",
        each image's value [N]."""
        if self.reduction == "none":
            return dim_zero_cat(self.values) if len(self.values) else self.total.new_zeros(0)
        return self.total if self.reduction == "sum" else self.total / self.count

    def extra_repr(self) -> str:
        return f"term={self.term!r}, reduction={self.reduction!r}, precision={self.precision!r}"


def check_batch(output: torch.Tensor, reference: torch.Tensor) -> None:
    """A ValueError naming the input unless both are float RGB batches [B, 3, H, W] of one size, H, W >= 32, the
    reference batch 1 or the output's, with finite values in [0, 1] (what `afine score` reads from image files)."""
    check_images("output", output)
    check_images("reference", reference)
    if reference.shape[-2:] != output.shape[-2:]:
        raise ValueError(f"output and reference sizes differ: {tuple(output.shape)} vs {tuple(reference.shape)}")
    if reference.shape[0] not in (1, output.shape[0]):
        raise ValueError(f"reference batch must be 1 or {output.shape[0]} (the output's), got shape "
                         f"{tuple(reference.shape)}")
    ranges = torch.stack([x.detach().float() for images in (output, reference)
                          for x in (images.amin(), images.amax())]).tolist()  # one device sync; NaN propagates
    for name, (low, high) in (("output", ranges[:2]), ("reference", ranges[2:])):
        if not (abs(low) < float("inf") and abs(high) < float("inf")):
            raise ValueError(f"{name}: non-finite values (NaN or infinity)")
        if low < 0 or high > 1:
            hint = "; clamp a network's output with output.clamp(0, 1)" if name == "output" else ""
            raise ValueError(f"{name}: expected RGB in [0, 1], got values in [{low:.4g}, {high:.4g}] (a [0, 255] or "
                             f"[-1, 1] image?{hint})")


def drop_model_weights(module: AFINEMetric, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict() post-hook: the frozen A-FINE weights are not the metric's state; leave them out."""
    for key in [k for k in state_dict if k.startswith(prefix + "afine.")]:
        del state_dict[key]


def keep_model_weights(module: AFINEMetric, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict() pre-hook: a state dict without the A-FINE weights (every one the metric writes) keeps the
    loaded ones, so strict loads pass."""
    for key, value in module.afine.state_dict(prefix=prefix + "afine.", keep_vars=True).items():
        state_dict.setdefault(key, value)
