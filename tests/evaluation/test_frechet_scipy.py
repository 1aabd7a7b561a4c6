"""Independent check of the Fréchet distance against the textbook scipy.linalg.sqrtm formula."""

import numpy as np
import pytest
import scipy.linalg

from maisi.evaluation.fid import fid_from_features, frechet_distance


@pytest.mark.parametrize("seed, n, d", [(0, 40, 6), (1, 10, 16), (2, 200, 3)])
def test_frechet_matches_scipy_sqrtm(seed, n, d):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, d)), rng.normal(0.3, 1.5, size=(n, d)) @ rng.normal(size=(d, d))
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6, abs=1e-8)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(60, 5))
    scores = [fid_from_features(a, a + rng.normal(0, s, a.shape)) for s in (0.0, 0.3, 1.0, 3.0)]
    assert scores[0] == pytest.approx(0.0, abs=1e-8)
    assert scores == sorted(scores) and scores[-1] > 10 * scores[1]
