"""2AFC accuracy and MOS correlations against hand counts and hand-computed values."""

import math

import numpy as np
import pytest
import torch

from afine.metrics import correlations, fit_logistic4, logistic4, two_afc_accuracy, two_afc_correct

# (u1, u2, g, correct?) -- lower score is better
CASES = [
    (0.1, 0.2, 1.0, True),    # x1 better, said so
    (0.1, 0.2, 0.0, False),
    (0.1, 0.2, 0.5, False),   # not a tie at delta 0
    (0.3, 0.2, 0.0, True),
    (0.3, 0.2, 1.0, False),
    (0.5, 0.5, 0.5, True),    # exact tie, labelled same
    (0.5, 0.5, 1.0, False),   # a tie is never right for a strict label
    (0.5, 0.5, 0.0, False),
    (-2.0, 3.0, 1.0, True),
]


def test_accuracy_equals_hand_count_with_ties():
    u1, u2, g, expected = map(list, zip(*CASES))
    accuracy, correct, pairs = two_afc_accuracy(np.array(u1), np.array(u2), np.array(g))
    assert (correct, pairs) == (4, 9)
    assert accuracy == 4 / 9
    assert two_afc_correct(u1, u2, g).tolist() == expected


def test_accuracy_accepts_tensors_and_lists():
    u1, u2, g, _ = map(list, zip(*CASES))
    as_tensors = two_afc_accuracy(torch.tensor(u1), torch.tensor(u2), torch.tensor(g))
    as_lists = two_afc_accuracy(u1, u2, g)
    assert as_tensors == as_lists == (4 / 9, 4, 9)


def test_delta_widens_ties():
    # |u1 - u2| = 0.1 <= delta: g = 0.5 is correct; strict labels still judged by order
    accuracy, correct, pairs = two_afc_accuracy([0.1, 0.1, 0.1], [0.2, 0.2, 0.5], [0.5, 1.0, 0.5], delta=0.15)
    assert (correct, pairs) == (2, 3)


def test_empty_and_mismatched():
    accuracy, correct, pairs = two_afc_accuracy([], [], [])
    assert (correct, pairs) == (0, 0) and math.isnan(accuracy)
    with pytest.raises(ValueError):
        two_afc_accuracy([1.0, 2.0], [1.0], [1.0])


def test_correlations_sign_and_hand_values():
    # scores lower-is-better; MOS higher-is-better; exact reverse order -> +1 for rank correlations
    scores = np.array([0.4, 0.1, 0.9, 0.3])
    mos = np.array([3.0, 4.5, 1.0, 3.5])
    r = correlations(scores, mos)
    assert r["srcc"] == pytest.approx(1.0)
    assert r["krcc"] == pytest.approx(1.0)
    assert r["plcc"] > 0.99
    # one swapped pair among 4 items: SRCC = 1 - 6 * 2 / (4 * 15) = 0.8; KRCC = (5 - 1) / 6
    mos2 = np.array([3.5, 4.5, 1.0, 3.0])
    r2 = correlations(scores, mos2)
    assert r2["srcc"] == pytest.approx(0.8)
    assert r2["krcc"] == pytest.approx(4 / 6)


def test_logistic4_fit_recovers_parameters():
    x = np.linspace(-3, 3, 40)
    y = logistic4(x, 5.0, 1.0, 0.3, 0.7)
    b1, b2, b3, b4 = fit_logistic4(x, y)
    assert (b1, b2, b3, abs(b4)) == pytest.approx((5.0, 1.0, 0.3, 0.7), rel=1e-4, abs=1e-4)
    # PLCC after the fit is 1 for data lying exactly on a logistic of -score
    assert correlations(-x, y)["plcc"] == pytest.approx(1.0)


def test_degenerate_correlations_are_nan():
    r = correlations([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    assert all(math.isnan(v) for v in r.values())
