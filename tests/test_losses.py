"""Ranking loss (Thurstone Case V + fidelity loss) and the cosine-restart schedule against hand-computed values."""

import math

import pytest
import torch

from afine.losses import fidelity_loss, preference, rank_loss
from afine.schedule import cosine_restart_lr


def phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_preference_is_thurstone_case_v_for_lower_is_better_scores():
    u1 = torch.tensor([0.0, 1.0, -0.3, 2.5])
    u2 = torch.tensor([0.0, 3.0, 0.4, -1.0])
    expected = [phi((b - a) / math.sqrt(2)) for a, b in zip(u1.tolist(), u2.tolist())]
    assert preference(u1, u2).tolist() == pytest.approx(expected, abs=1e-6)
    assert preference(u1, u2)[1] > 0.9  # x1 scores much lower: x1 very likely better


def test_fidelity_loss_hand_values():
    p = torch.tensor([0.5, 0.5, 1.0, 0.0, 0.8])
    g = torch.tensor([1.0, 0.5, 1.0, 1.0, 0.0])
    expected = [1 - (math.sqrt(pi * gi + 1e-8) + math.sqrt((1 - pi) * (1 - gi) + 1e-8))
                for pi, gi in zip(p.tolist(), g.tolist())]
    assert fidelity_loss(p, g).tolist() == pytest.approx(expected, abs=1e-7)
    assert expected[0] == pytest.approx(1 - math.sqrt(0.5) - 1e-4, abs=1e-6)  # sqrt(1e-8) = 1e-4
    assert expected[3] == pytest.approx(1.0, abs=1e-3)  # certain and wrong: the maximum


def test_rank_loss_pushes_the_better_image_to_a_lower_score():
    u1 = torch.tensor([0.2], requires_grad=True)
    u2 = torch.tensor([0.1], requires_grad=True)
    rank_loss(u1, u2, torch.tensor([1.0])).sum().backward()
    assert u1.grad.item() > 0 > u2.grad.item()  # descent lowers u1 (better) and raises u2


PERIODS, WEIGHTS, ETA = [10, 10, 20], [1.0, 0.5, 0.25], 1e-3


@pytest.mark.parametrize("step, expected", [
    (1, ETA + 1.0 * 0.5 * (1 - ETA) * (1 + math.cos(math.pi * 1 / 10))),
    (5, ETA + 0.5 * (1 - ETA)),                       # middle of period 1
    (10, ETA),                                        # end of period 1
    (11, ETA + 0.5 * 0.5 * (1 - ETA) * (1 + math.cos(math.pi * 1 / 10))),  # restart at half
    (30, ETA + 0.25 * 0.5 * (1 - ETA) * (1 + math.cos(math.pi * 10 / 20))),
    (40, ETA),
    (41, ETA),                                        # after the last period
])
def test_cosine_restart_schedule(step, expected):
    assert cosine_restart_lr(step, 1.0, PERIODS, WEIGHTS, ETA) == pytest.approx(expected, rel=1e-12)


def test_published_schedule_shape():
    lr = [cosine_restart_lr(s, 5e-6, [10000] * 4, [1, 0.5, 0.5, 0.5], 1e-8) for s in range(1, 40001)]
    assert max(lr[:10000]) == pytest.approx(5e-6, rel=1e-6)
    assert max(lr[10000:20000]) == pytest.approx(1e-8 + 0.5 * (5e-6 - 1e-8), rel=1e-6)
    assert lr[9999] == lr[19999] == lr[39999] == pytest.approx(1e-8)
