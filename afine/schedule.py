"""Cosine annealing with warm restarts (A-FINE's training schedule), as a pure function of the step.

Step s = 1, 2, ... counts optimiser updates. Period i covers steps start_i < s <= start_i + period_i,
start_i = sum(periods[:i]); inside it

    lr(s) = eta_min + w_i * 0.5 * (base - eta_min) * (1 + cos(pi * (s - start_i) / period_i))

so each period ends exactly at eta_min and the next restarts near w_i * base. After the last period
lr stays at eta_min. Being a function of s alone, a resumed run needs to store nothing but the step.
"""

from __future__ import annotations

import math


def cosine_restart_lr(step: int, base: float, periods: list[int], restart_weights: list[float],
                      eta_min: float) -> float:
    """The learning rate of optimiser update `step` (1-based)."""
    start = 0
    for period, weight in zip(periods, restart_weights):
        if step <= start + period:
            return eta_min + weight * 0.5 * (base - eta_min) * (1 + math.cos(math.pi * (step - start) / period))
        start += period
    return eta_min
