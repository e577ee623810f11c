"""Scoring math of auto-interp: AUROC, balanced accuracy, bootstrap intervals (numpy only)."""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2; NaN without both classes."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    # Mann-Whitney U from average ranks (ties get the mean rank).
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    values = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(values))
    ranks[order] = _average_ranks(values)
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _average_ranks(sorted_values: np.ndarray) -> np.ndarray:
    """1-based ranks of sorted values, tied runs sharing their mean rank."""
    n = len(sorted_values)
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], n]
    mean_rank = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
    return np.repeat(mean_rank, ends - starts)


def balanced_accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Mean of the true-positive and true-negative rates of ``score > threshold``."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return float("nan")
    said = scores > threshold
    return float((said[labels].mean() + (~said[~labels]).mean()) / 2)


def bootstrap_ci(values: np.ndarray, n: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` (NaN dropped) over ``n`` resamples."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def difference_ci(
    a: np.ndarray, b: np.ndarray, n: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of mean(a) - mean(b), resampling the two independent sets separately."""
    a, b = (np.asarray(v, float) for v in (a, b))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    diffs = a[rng.integers(0, len(a), size=(n, len(a)))].mean(axis=1) - b[
        rng.integers(0, len(b), size=(n, len(b)))
    ].mean(axis=1)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
