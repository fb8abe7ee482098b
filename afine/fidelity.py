"""Fidelity head of A-FINE (released key `fidelity`, official name AFINEDhead): the full-reference term F.

In the style of DISTS: per channel, over tokens, compare the means (S1) and the covariance (S2) of the test
image x and the reference y, at the pixel level and at every CLIP block (ReLU'd patch tokens), with learned
weights a = softplus(alpha), b = softplus(beta), jointly normalised to sum 1:

    S1 = (2 mx my + c) / (mx^2 + my^2 + c),   S2 = (2 cov + c) / (vx + vy + c),   c = 1e-10
    F_raw = 1 - sum over levels and channels of (a S1 + b S2)

(population variances; cov = mean(x y) - mx my). Lower is better; about 0 when x == y. See docs/scoring.md,
"What A-FINE computes". `stable_gradient=True` keeps these values and takes the gradient from a well-conditioned
twin of the formulas (docs/loss.md, "Gradients of the fidelity statistics").

Self-contained (imports only torch): copy this file alone into another project.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

# CLIP's per-channel input normalisation; the head undoes it to compare the pixel values.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
C = 1e-10  # keeps S1 and S2 finite for constant channels
GRAD_C = 1e-6  # c of the gradient twin (stable_gradient): DISTS's constant, of a size no real image structure has


def similarity(x: torch.Tensor, y: torch.Tensor, stable_gradient: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [..., T, C] of test and reference (broadcastable) -> S1, S2 per channel [..., C].

    `stable_gradient`: the same values, bit for bit, but the gradient of a twin with the covariance centred before
    the product and GRAD_C for c. Near-constant channels (flat images; ReLU'd channels that are almost all zero)
    otherwise give gradients of 1/sqrt(c) scale, thousands of times those of other channels: there mean(x y) -
    mx my is rounding noise, and c = 1e-10 divides it (docs/loss.md, "Gradients of the fidelity statistics").
    """
    vx, mx = torch.var_mean(x, dim=-2, correction=0)
    vy, my = torch.var_mean(y, dim=-2, correction=0)
    with torch.no_grad() if stable_gradient else contextlib.nullcontext():  # the values: the published formulas
        cov = (x * y).mean(dim=-2) - mx * my
        s1 = (2 * mx * my + C) / (mx.square() + my.square() + C)
        s2 = (2 * cov + C) / (vx + vy + C)
    if not stable_gradient:
        return s1, s2
    y_centred = y - my.unsqueeze(-2)  # mean(x y_c) - mx mean(y_c) is the covariance without the cancellation,
    centred_cov = (x * y_centred).mean(dim=-2) - mx * y_centred.mean(dim=-2)  # holding one centred copy
    t1 = (2 * mx * my + GRAD_C) / (mx.square() + my.square() + GRAD_C)
    t2 = (2 * centred_cov + GRAD_C) / (vx + vy + GRAD_C)
    return s1 + (t1 - t1.detach()), s2 + (t2 - t2.detach())  # t - t.detach() is exactly 0


def pixel_tokens(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised images [B, 3, H, W] -> pixel values as tokens [B, H*W, 3] (normalisation undone)."""
    return (x * std + mean).flatten(2).transpose(1, 2)


class FidelityHead(nn.Module):
    """Raw fidelity F of test images against references, from both images and their CLIP block outputs."""

    def __init__(self, width: int = 768, layers: int = 12):
        super().__init__()
        self.chns = (3,) + (width,) * layers
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))
        self.alpha = nn.Parameter(torch.empty(1, 1, sum(self.chns)).normal_(0.1, 0.01))
        self.beta = nn.Parameter(torch.empty(1, 1, sum(self.chns)).normal_(0.1, 0.01))

    def channel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """softplus(alpha), softplus(beta) as [sum(chns)], jointly normalised to sum 1."""
        a, b = F.softplus(self.alpha).flatten(), F.softplus(self.beta).flatten()
        total = a.sum() + b.sum() + C
        return a / total, b / total

    def similarities(self, x: torch.Tensor, x_features: torch.Tensor, y: torch.Tensor, y_features: torch.Tensor,
                     stable_gradient: bool = False, by_level: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """S1, S2 [B, sum(chns)] of every level and channel (pixels first, then the blocks): all that F takes
        from the images. They do not depend on the head's weights, so training on a frozen CLIP can compute
        them once (docs/training.md, "Cached statistics"). `stable_gradient`: see similarity(). `by_level`: the
        CLIP levels one at a time, the same values bit for bit: a training step holds one level's temporaries, not
        twelve."""
        s1_pix, s2_pix = similarity(pixel_tokens(x, self.mean, self.std), pixel_tokens(y, self.mean, self.std),
                                    stable_gradient)
        if by_level:
            levels = [similarity(x.relu(), y.relu(), stable_gradient)
                      for x, y in zip(x_features.unbind(1), y_features.unbind(1))]
            s1, s2 = (torch.stack(s, dim=1) for s in zip(*levels))
        else:
            s1, s2 = similarity(x_features.relu(), y_features.relu(), stable_gradient)  # [B, L, W]
        return torch.cat([s1_pix, s1.flatten(1)], dim=1), torch.cat([s2_pix, s2.flatten(1)], dim=1)

    def from_similarities(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """Raw F [B] from S1, S2 [B, sum(chns)] with the head's current weights."""
        a, b = self.channel_weights()
        return 1 - (s1 * a + s2 * b).sum(dim=1)

    def forward(self, x: torch.Tensor, x_features: torch.Tensor, y: torch.Tensor,
                y_features: torch.Tensor) -> torch.Tensor:
        """Test x and reference y (normalised images [B, 3, H, W] and CLIP features [B, L, T, W]) -> raw F [B].

        A reference batch of 1 is broadcast against every test image.
        """
        return self.from_similarities(*self.similarities(x, x_features, y, y_features))
