"""Evaluation metrics: 2AFC accuracy on labelled pairs (docs/evaluation.md) and MOS correlations.

All A-FINE scores are lower-is-better; MOS is higher-is-better. Correlations are reported between
-score and MOS, so a good model gets positive SRCC, PLCC and KRCC.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import optimize, stats


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def two_afc_correct(u1, u2, g, delta: float = 0.0) -> np.ndarray:
    """Per pair: True when (u1 < u2 and g = 1) or (u1 > u2 and g = 0) or (|u1 - u2| <= delta and g = 0.5).

    Scores are lower-is-better; g = 1 means x1 is better, 0 that x2 is better, 0.5 the same.
    """
    u1, u2, g = _numpy(u1), _numpy(u2), _numpy(g)
    if not (u1.shape == u2.shape == g.shape):
        raise ValueError(f"u1, u2, g must have the same length, got {u1.shape}, {u2.shape}, {g.shape}")
    return ((u1 < u2) & (g == 1)) | ((u1 > u2) & (g == 0)) | ((np.abs(u1 - u2) <= delta) & (g == 0.5))


def two_afc_accuracy(u1, u2, g, delta: float = 0.0) -> tuple[float, int, int]:
    """2AFC accuracy of lower-is-better scores u1, u2 against labels g -> (accuracy, correct, pairs).

    Accepts numpy arrays, tensors or lists. delta = 0 (published): a tie is correct only for g = 0.5.
    An empty set gives accuracy nan.
    """
    correct = two_afc_correct(u1, u2, g, delta)
    n = int(correct.size)
    c = int(correct.sum())
    return (c / n if n else float("nan")), c, n


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The 4-parameter logistic used before PLCC: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2."""
    z = np.clip(-(x - b3) / (np.abs(b4) + 1e-10), -500, 500)
    return (b1 - b2) / (1.0 + np.exp(z)) + b2


def fit_logistic4(x, y) -> np.ndarray:
    """Least-squares 4-parameter logistic from predictions x to MOS y (start: MOS range, mean(x), std(x)).

    Trust-region least squares: its finite-difference steps stay sensible for parameters near 0 (MINPACK's
    relative steps freeze a centre that starts at, say, 1e-16). Falls back to the start if the fit fails.
    """
    x, y = _numpy(x), _numpy(y)
    start = [float(y.max()), float(y.min()), float(x.mean()), float(x.std()) or 1.0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = optimize.curve_fit(logistic4, x, y, p0=start, method="trf", max_nfev=20000)
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        params = np.asarray(start)
    return params


def correlations(scores, mos) -> dict[str, float]:
    """SRCC, PLCC (after the 4-parameter logistic fit) and KRCC between -scores and MOS.

    Scores are lower-is-better, MOS higher-is-better; the sign flip makes agreement positive.
    """
    x, y = -_numpy(scores), _numpy(mos)
    if x.shape != y.shape:
        raise ValueError(f"scores and mos must have the same length, got {x.shape}, {y.shape}")
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"srcc": float("nan"), "plcc": float("nan"), "krcc": float("nan")}
    fitted = logistic4(x, *fit_logistic4(x, y))
    plcc = float(stats.pearsonr(fitted, y)[0]) if np.ptp(fitted) > 0 else float("nan")
    return {"srcc": float(stats.spearmanr(x, y)[0]), "plcc": plcc, "krcc": float(stats.kendalltau(x, y)[0])}
