"""The augmentation experiment's statistics against a bootstrap computed by hand on a fixed small set."""

import numpy as np
import pytest

from maisi.evaluation.augment.stats import bootstrap_means, class_mean, paired_difference, summarize

# 2 training seeds × 3 test cases
SCORES = np.array([[0.2, 0.4, 0.9],
                   [0.3, 0.5, 0.7]])
# The first four draws of default_rng(0) in the documented order (seeds, then cases) and their means by hand:
#   seeds [1, 1], cases [1, 0, 0] -> (0.5 + 0.3 + 0.3) / 3
#   seeds [0, 0], cases [0, 0, 2] -> (0.2 + 0.2 + 0.9) / 3
#   seeds [1, 1], cases [1, 1, 2] -> (0.5 + 0.5 + 0.7) / 3   (twice)
HAND = [1.1 / 3, 1.3 / 3, 1.7 / 3, 1.7 / 3]


def test_bootstrap_means_match_hand_computed_draws():
    np.testing.assert_allclose(bootstrap_means(SCORES, 4, seed=0), HAND)


def test_summary_is_the_percentile_interval_of_the_hand_computed_means():
    s = summarize(SCORES, resamples=4, seed=0, confidence=0.95)
    # sorted means m0..m3; the 2.5th percentile lies at 0.075 of the way from m0 to m1, the 97.5th at m3
    lo = HAND[0] + 0.075 * (HAND[1] - HAND[0])
    assert s["mean"] == pytest.approx(SCORES.mean()) and s["n"] == 6
    assert s["ci"] == pytest.approx([lo, HAND[3]])


def test_bootstrap_matches_a_plain_loop_with_nan_cases():
    x = SCORES.copy()
    x[:, 1] = np.nan  # a test case without the class
    rng, want = np.random.default_rng(7), []
    for _ in range(50):
        s, c = rng.integers(0, 2, 2), rng.integers(0, 3, 3)
        vals = [x[i, j] for i in s for j in c if np.isfinite(x[i, j])]
        want.append(sum(vals) / len(vals) if vals else np.nan)
    np.testing.assert_allclose(bootstrap_means(x, 50, seed=7), want)
    assert summarize(x, 50, 7)["mean"] == pytest.approx(np.nanmean(x))


def test_paired_difference_pairs_case_and_seed():
    base = SCORES
    arm = SCORES + np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])  # +0.1 on every case: the interval is a point
    d = paired_difference(arm, base, resamples=200, seed=1)
    assert d["mean"] == pytest.approx(0.1) and d["ci"] == pytest.approx([0.1, 0.1])
    # unpaired, the spread of the cases would widen it
    assert summarize(arm, 200, 1)["ci"][1] - summarize(arm, 200, 1)["ci"][0] > 0.1
    with pytest.raises(ValueError, match="same seeds × cases shape"):
        paired_difference(arm[:1], base)


def test_edge_cases():
    assert summarize(np.full((2, 2), np.nan)) == {"mean": None, "ci": [None, None], "n": 0}
    with pytest.raises(ValueError, match="seeds × cases"):
        bootstrap_means(np.zeros(3), 10, 0)
    per_class = np.array([[[1.0, np.nan], [0.5, 0.3]]])  # 1 seed × 2 cases × 2 classes
    np.testing.assert_allclose(class_mean(per_class), [[1.0, 0.4]])
