"""A-FINE's non-linear mappings, the adaptive combination and the final 0..100 scale.

    D(dis, ref) = F(dis, ref) + exp(k (N(ref) - N(dis))) N(dis),   k = softplus(adapter k)
    D_scaled    = 100 / (1 + exp(-(D + 1.9710) / 2.3734))

N and F are the raw head outputs mapped into (-2, 2) by `logistic`. Lower is better for every term.
See docs/scoring.md, "What A-FINE computes".

Self-contained (imports only torch): copy this file alone into another project.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Published final scale: D_scaled = 100 / (1 + exp(-(D - SCALE_CENTER) / SCALE_WIDTH)).
SCALE_CENTER = -1.9710
SCALE_WIDTH = 2.3734
# Published start of the NR mapping, fitted on PIPAL's training MOS (docs/training.md, "Fit the NR mapping").
NR_YITA3, NR_YITA4 = 4.9592, 21.5968


def logistic(x: torch.Tensor, e1: float, e2: float, e3: torch.Tensor | float, e4: torch.Tensor | float) -> torch.Tensor:
    """(e1 - e2) / (1 + exp(-(x - e3) / (|e4| + 1e-10))) + e2, stable for any batch and any magnitude."""
    e4 = torch.as_tensor(e4, dtype=x.dtype, device=x.device)
    return (e1 - e2) * torch.sigmoid((x - e3) / (e4.abs() + 1e-10)) + e2


class NaturalnessMapping(nn.Module):
    """Maps raw N into (-2, 2) (released key `natural_scale`, official AFINENLM_NR_Fit)."""

    def __init__(self, yita3: float = NR_YITA3, yita4: float = NR_YITA4):
        super().__init__()
        self.yita3 = nn.Parameter(torch.tensor(float(yita3)))
        self.yita4 = nn.Parameter(torch.tensor(float(yita4)))

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        return logistic(n, 2.0, -2.0, self.yita3, self.yita4)


class FidelityMapping(nn.Module):
    """Maps raw F into (-2, 2) with clamped parameters (key `fidelity_scale`, AFINENLM_FR_Fit_with_limit)."""

    def __init__(self, yita3: float = 0.5, yita4: float = 0.15):
        super().__init__()
        self.yita3 = nn.Parameter(torch.tensor(float(yita3)))
        self.yita4 = nn.Parameter(torch.tensor(float(yita4)))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return logistic(f, 2.0, -2.0, self.yita3.clamp(0.05, 0.95), self.yita4.clamp(0.01, 0.70))


class Adapter(nn.Module):
    """Adaptive combination D = F + exp(k (N_ref - N_dis)) N_dis, k = softplus(`k`) (key `adapter`)."""

    def __init__(self, k: float = 5.0):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(float(k)))

    def forward(self, fidelity: torch.Tensor, natural_dis: torch.Tensor, natural_ref: torch.Tensor) -> torch.Tensor:
        return fidelity + torch.exp(F.softplus(self.k) * (natural_ref - natural_dis)) * natural_dis


def final_scale(d: torch.Tensor) -> torch.Tensor:
    """D -> the published 0..100 scale (lower is better, like D)."""
    return logistic(d, 100.0, 0.0, SCALE_CENTER, SCALE_WIDTH)
