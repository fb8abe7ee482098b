"""Fidelity head (SPEC section 5; released key `fidelity`, official name AFINEDhead).

A full-reference term in the style of DISTS: per channel, compare the means (structure-free
luminance-like term S1) and the covariance (structure term S2) of the test and reference
tokens at the pixel level and at every CLIP block, with learned softplus weights. Lower is better;
about 0 when test == reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .image import CLIP_MEAN, CLIP_STD
from .naturalness import pixel_tokens

C = 1e-10


def similarity(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [..., T, C] of test and reference (broadcastable) -> S1, S2 per channel [..., C]."""
    vx, mx = torch.var_mean(x, dim=-2, correction=0)
    vy, my = torch.var_mean(y, dim=-2, correction=0)
    cov = (x * y).mean(dim=-2) - mx * my
    s1 = (2 * mx * my + C) / (mx.square() + my.square() + C)
    s2 = (2 * cov + C) / (vx + vy + C)
    return s1, s2


class FidelityHead(nn.Module):
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

    def forward(self, x: torch.Tensor, x_features: torch.Tensor, y: torch.Tensor,
                y_features: torch.Tensor) -> torch.Tensor:
        """Test x and reference y (normalised images [B, 3, H, W] and CLIP features [B, L, T, W]) -> raw F [B].

        A reference batch of 1 is broadcast against every test image.
        """
        s1_pix, s2_pix = similarity(pixel_tokens(x, self.mean, self.std), pixel_tokens(y, self.mean, self.std))
        s1, s2 = similarity(x_features.relu(), y_features.relu())  # [B, L, W]
        s1 = torch.cat([s1_pix, s1.flatten(1)], dim=1)
        s2 = torch.cat([s2_pix, s2.flatten(1)], dim=1)
        a, b = self.channel_weights()
        return 1 - (s1 * a + s2 * b).sum(dim=1)
