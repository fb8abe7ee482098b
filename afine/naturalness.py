"""Naturalness head of A-FINE (released key `natural`, official name AFINEQhead): the no-reference term N.

Thirteen levels describe an image: level 0 is its pixels, levels 1..12 are the ReLU'd patch tokens of the
CLIP blocks. Each level is pooled over tokens to its per-channel mean and (population) variance; levels
1..12 are projected by `proj_feat` (2W -> 128), and `proj_head` (Linear, GELU, Linear) regresses the
concatenation to one raw score per image. Lower is better. See docs/scoring.md, "What A-FINE computes".

Self-contained (imports only torch): copy this file alone into another project.
"""

from __future__ import annotations

import torch
from torch import nn

# CLIP's per-channel input normalisation; the head undoes it to pool statistics of the pixel values.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def token_statistics(tokens: torch.Tensor) -> torch.Tensor:
    """[..., T, C] -> [..., 2C]: mean and population variance over tokens, concatenated."""
    var, mean = torch.var_mean(tokens, dim=-2, correction=0)
    return torch.cat([mean, var], dim=-1)


def pixel_tokens(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised images [B, 3, H, W] -> pixel values as tokens [B, H*W, 3] (normalisation undone)."""
    return (x * std + mean).flatten(2).transpose(1, 2)


class NaturalnessHead(nn.Module):
    """Raw naturalness N of CLIP-normalised images and their CLIP block outputs (width W, `layers` blocks)."""

    def __init__(self, width: int = 768, layers: int = 12, feat_dim: int = 128, hidden: int = 768):
        super().__init__()
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))
        self.proj_feat = nn.Linear(2 * width, feat_dim)
        self.proj_head = nn.Sequential(nn.Linear(6 + layers * feat_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """x: normalised images [B, 3, H, W]; features: CLIP block outputs [B, L, T, W] -> raw N [B]."""
        level0 = token_statistics(pixel_tokens(x, self.mean, self.std))  # [B, 6]
        levels = self.proj_feat(token_statistics(features.relu()))  # [B, L, 128]
        return self.proj_head(torch.cat([level0, levels.flatten(1)], dim=1)).squeeze(1)
