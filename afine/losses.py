"""Learning-to-rank losses of A-FINE's training: Thurstone Case V preference and the fidelity loss.

Scores are lower-is-better; labels g are 1 (first better), 0 (second better) or 0.5 (same).
P(x1 better than x2) = Phi((u2 - u1) / sqrt(2)); L(p, g) = 1 - (sqrt(p g + 1e-8) + sqrt((1 - p)(1 - g) + 1e-8)).

Self-contained (imports only torch): copy this file alone into another project.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def preference(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """P(x1 better than x2) = Phi((u2 - u1) / sqrt(2)) = (1 + erf((u2 - u1) / 2)) / 2 for lower-is-better u."""
    return 0.5 * (1 + torch.erf((u2 - u1) / 2))


def fidelity_loss(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 - (sqrt(p g + 1e-8) + sqrt((1 - p)(1 - g) + 1e-8)); the stage averages it over the batch."""
    return 1 - (torch.sqrt(p * g + EPS) + torch.sqrt((1 - p) * (1 - g) + EPS))


def rank_loss(u1: torch.Tensor, u2: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Fidelity loss of the Thurstone preference of scores (u1, u2) against labels g, per pair [B]."""
    return fidelity_loss(preference(u1.float(), u2.float()), g.float())
