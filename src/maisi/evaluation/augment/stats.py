"""Bootstrap statistics of per-case scores over test cases and training seeds (pure functions on arrays).

Scores of one arm and class form a seeds × cases matrix; NaN marks a case whose ground truth lacks the class.
One bootstrap resample, drawn from `np.random.default_rng(seed)` in this order, for b = 0 .. B-1:
    s = rng.integers(0, S, S)   # training seeds, with replacement
    c = rng.integers(0, N, N)   # test cases, with replacement
    stat_b = nanmean(scores[s][:, c])
The interval is the percentile interval of stat_b (linear interpolation). A paired difference draws the same
(s, c) for both arms, so it is the bootstrap of the seeds × cases matrix arm − baseline: the same test case, and
the same training seed (the same initialisation and data order)."""

from __future__ import annotations

import warnings

import numpy as np


def bootstrap_means(scores: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """`resamples` bootstrap means of a seeds × cases matrix (see the module docstring for the draws)."""
    x = np.asarray(scores, np.float64)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"scores must be a non-empty seeds × cases matrix, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    n_seeds, n_cases = x.shape
    out = np.empty(resamples)
    with warnings.catch_warnings():  # a resample of only NaN cases gives NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        for b in range(resamples):
            s = rng.integers(0, n_seeds, n_seeds)
            c = rng.integers(0, n_cases, n_cases)
            out[b] = np.nanmean(x[s][:, c])
    return out


def summarize(scores: np.ndarray, resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """{"mean", "ci": [lo, hi], "n"}: the mean of the finite scores and its bootstrap percentile interval."""
    x = np.asarray(scores, np.float64)
    n = int(np.isfinite(x).sum())
    if n == 0:
        return {"mean": None, "ci": [None, None], "n": 0}
    means = bootstrap_means(x, resamples, seed)
    means = means[np.isfinite(means)]
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(np.nanmean(x)), "ci": [float(lo), float(hi)], "n": n}


def paired_difference(arm: np.ndarray, baseline: np.ndarray, resamples: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> dict:
    """summarize(arm − baseline): the two seeds × cases matrices paired by test case and training seed."""
    a, b = np.asarray(arm, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same seeds × cases shape, got {a.shape} and {b.shape}")
    return summarize(a - b, resamples, seed, confidence)


def class_mean(per_class: np.ndarray) -> np.ndarray:
    """The mean over classes (last axis) of per-class scores, NaN classes left out (seeds × cases × classes → seeds × cases)."""
    x = np.asarray(per_class, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=-1)
