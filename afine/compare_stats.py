"""The statistics of `afine compare` (docs/compare.md, "The statistics"), from per-image scores, lower is better.

- Bootstrap interval of a mean: the images of a test set are resampled with replacement `resamples` times, the
  indices drawn by numpy.random.default_rng(seed).integers(0, n, (resamples, n)) afresh for each set, the same
  draws for every method of the set (paired); the interval is the 2.5 and 97.5 percentiles (numpy's linear
  interpolation) of the resampled means.
- Rank: 1 for the lowest mean of a set, ties sharing the average of their ranks.
- Pairwise: the images on which one method scores lower (better) than the other, the other way round, and the
  ties, counted apart; the Wilcoxon signed-rank test of the paired scores (scipy.stats.wilcoxon, two-sided, tied
  images dropped), no p-value when every image ties.
"""

from __future__ import annotations

import warnings

import numpy as np


def resample_indices(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """[resamples, n] image indices, drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def interval(values: np.ndarray, indices: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values` [n] over the resamples `indices` [R, n]."""
    means = values[indices].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def ranks(means: list[float]) -> list[float]:
    """1 for the lowest (best) mean; ties share the average of their ranks."""
    from scipy import stats  # here: `afine score`, which builds the same command line, does not pay for scipy

    return [float(r) for r in stats.rankdata(means)]


def pairwise(a: np.ndarray, b: np.ndarray) -> dict:
    """How two methods' paired per-image scores compare: counts and fractions of the images where a is better
    (lower), where b is, and the ties; the Wilcoxon signed-rank statistic and p-value (None when all tie)."""
    n = len(a)
    a_better, b_better = int((a < b).sum()), int((b < a).sum())
    ties = n - a_better - b_better
    statistic = p = None
    if a_better + b_better:
        from scipy import stats

        with warnings.catch_warnings():  # scipy warns about the ties it drops and small samples; both are expected
            warnings.simplefilter("ignore")
            result = stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
        statistic, p = float(result.statistic), float(result.pvalue)
    return {"a_better": a_better, "b_better": b_better, "ties": ties, "a_better_fraction": a_better / n,
            "b_better_fraction": b_better / n, "tie_fraction": ties / n, "wilcoxon_statistic": statistic,
            "p_value": p}
