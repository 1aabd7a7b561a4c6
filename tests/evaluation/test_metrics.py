"""Evaluation metrics: Fréchet distance vs scipy, FID behaviour, plane slicing, Dice/PSNR/SSIM, quality check."""

import numpy as np
import pytest
import scipy.linalg
import torch

from maisi.evaluation.fid import (
    FIDSettings,
    fid_25d,
    fid_from_features,
    frechet_distance,
    pad_or_crop,
    plane_slices,
    preprocess_volume,
)
from maisi.evaluation.metrics import dice_per_label, ms_ssim, ms_ssim_settings, reconstruction_metrics
from maisi.labels import quality_check


def _scipy_fid(a, b):
    m1, s1, m2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))


@pytest.mark.parametrize("n1,n2,dim", [(200, 150, 8), (12, 20, 64), (40, 40, 40)])
def test_frechet_matches_scipy(n1, n2, dim):
    rng = np.random.default_rng(n1)
    a = rng.normal(size=(n1, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(size=(n2, dim)) * 1.3 + 0.4
    ref = _scipy_fid(a, b)
    assert fid_from_features(a, b) == pytest.approx(ref, rel=1e-5)
    stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*stats) == pytest.approx(ref, rel=1e-5)


def test_frechet_known_value_and_errors():
    # 1-D Gaussians N(0, 1) and N(3, 4): (0−3)² + 1 + 4 − 2·√4 = 10
    assert frechet_distance(np.zeros(1), np.eye(1), np.full(1, 3.0), 4 * np.eye(1)) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(np.zeros((1, 4)), np.zeros((5, 4)))


def test_fid_self_zero_and_monotonic_in_noise():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 16))
    feats = {p: torch.from_numpy(real) for p in ("xy", "yz", "zx")}
    assert fid_25d(feats, feats)["mean"] == pytest.approx(0.0, abs=1e-8)
    noise = rng.normal(size=real.shape)
    scores = [fid_from_features(real, real + s * noise) for s in (0.1, 0.3, 0.6, 1.0)]
    assert all(x < y for x, y in zip(scores, scores[1:])) and scores[0] > 0


def test_plane_slicing_axes_on_anisotropic_volume():
    vol = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)  # X=4, Y=5, Z=6
    xy, yz, zx = (plane_slices(vol, p, drop_empty=False) for p in ("xy", "yz", "zx"))
    assert xy.shape == (6, 1, 4, 5) and yz.shape == (4, 1, 5, 6) and zx.shape == (5, 1, 4, 6)
    assert torch.equal(xy[2, 0], vol[:, :, 2]) and torch.equal(yz[1, 0], vol[1]) and torch.equal(zx[3, 0], vol[:, 3])
    assert plane_slices(vol, "xy", center_fraction=0.5, drop_empty=False).shape[0] == 3
    vol[:, :, 0] = 0  # a constant (empty) slice is dropped
    assert plane_slices(vol, "xy").shape[0] == 5
    with pytest.raises(ValueError, match="unknown plane"):
        plane_slices(vol, "xz")


def test_preprocess_clip_resample_pad():
    hu = np.full((10, 10, 4), 2000.0, np.float32)
    hu[0] = -3000
    x = preprocess_volume(hu, (1.0, 1.0, 2.0), FIDSettings(spacing=(1.0, 1.0, 1.0), size=(12, 8, 8)))
    assert x.shape == (12, 8, 8) and float(x.max()) == 1.0 and float(x.min()) == 0.0
    assert float(x[0].max()) == 0.0  # padded with air
    assert pad_or_crop(torch.ones(3, 3, 3), (5, 1, 3)).shape == (5, 1, 3)
    with pytest.raises(ValueError, match="center_fraction"):
        FIDSettings(center_fraction=0)


def test_dice_psnr_ssim_known_values():
    t = np.zeros((8, 8, 8), int)
    t[:4] = 1
    t[4:, :2] = 2
    p = t.copy()
    p[:2] = 0  # half of label 1 missed: Dice 2·128/(128+256) = 2/3
    d = dice_per_label(p, t)
    assert d[1] == pytest.approx(2 / 3, abs=1e-6) and d[2] == pytest.approx(1.0)
    assert np.isnan(dice_per_label(p, t, [1, 7])[7])
    with pytest.raises(ValueError, match="differ in shape"):
        dice_per_label(p[:4], t)
    a = torch.rand(16, 16, 16)
    m = reconstruction_metrics(a, a)
    assert m["ssim"] == pytest.approx(1.0) and m["mae_hu"] == 0.0
    b = (a + 0.1).clamp(0, 1)
    mse = float(((a - b) ** 2).mean())
    m = reconstruction_metrics(b, a)
    assert m["psnr"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-4)
    assert m["mae_hu"] == pytest.approx(float((a - b).abs().mean()) * 2000, rel=1e-4)
    assert 0.5 < m["ssim"] < 1.0


def test_ms_ssim_small_volumes():
    assert ms_ssim_settings((64, 64, 64))[1] >= 3
    a = torch.rand(24, 24, 24)
    assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    assert ms_ssim(a, torch.rand(24, 24, 24)) < 0.5
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_settings((2, 20, 20))


def test_quality_check_pass_and_fail():
    label = np.zeros((10, 10, 10), np.uint8)
    label[:3] = 1  # liver
    label[5:7] = 28  # lung lobe
    image = np.full(label.shape, -1000.0, np.float32)
    image[label == 1] = 60
    image[label == 28] = -800
    r = quality_check(image, label)
    assert r["passed"] and set(r["organs"]) == {"liver", "lung"} and r["organs"]["lung"]["median_hu"] == -800
    image[label == 1] = 400  # liver far too bright
    r = quality_check(image, label)
    assert not r["passed"] and r["failed"] == ["liver"]
    with pytest.raises(ValueError, match="differs"):
        quality_check(image[:5], label)


def test_fid_25d_mean_is_the_mean_of_the_three_planes():
    """Each plane gets its own distance (synthetic features shifted by 0.5, 1 and 2 per plane); 'mean' is their
    average, not one plane's value nor the distance of the pooled slices."""
    rng = np.random.default_rng(1)
    real = {p: torch.from_numpy(rng.normal(size=(60, 6))) for p in ("xy", "yz", "zx")}
    fake = {p: real[p] + shift for p, shift in zip(("xy", "yz", "zx"), (0.5, 1.0, 2.0))}
    out = fid_25d(real, fake)
    per_plane = [fid_from_features(real[p], fake[p]) for p in ("xy", "yz", "zx")]
    assert [out[p] for p in ("xy", "yz", "zx")] == pytest.approx([6 * 0.25, 6 * 1.0, 6 * 4.0])  # D·shift²
    assert [out[p] for p in ("xy", "yz", "zx")] == pytest.approx(per_plane)
    assert out["mean"] == pytest.approx(sum(per_plane) / 3) and out["mean"] == pytest.approx(10.5)


def test_quality_check_judges_the_median_not_the_mean():
    """A skewed organ: 9 voxels in range and 1 far outside. The median stays in the liver's range while the
    mean leaves it, and the other way round: only the median decides."""
    lo, hi = -21.6, 162.0  # the liver's reference range (rounded inwards)
    label = np.zeros((10, 10, 10), np.uint8)
    label[:1] = 1  # 100 liver voxels
    image = np.full(label.shape, -1000.0, np.float32)
    liver = image[label == 1]
    liver[:] = 60.0
    liver[:10] = 3000.0  # mean 354 HU (> hi), median 60 HU
    image[label == 1] = liver
    assert np.mean(image[label == 1]) > hi
    r = quality_check(image, label)
    assert r["passed"] and r["organs"]["liver"]["median_hu"] == 60.0
    liver[:] = -40.0  # median −40 HU (< lo) ...
    liver[:45] = 200.0  # ... mean 68 HU (in range)
    image[label == 1] = liver
    assert lo < np.mean(image[label == 1]) < hi
    r = quality_check(image, label)
    assert r["passed"] is False and r["failed"] == ["liver"] and r["organs"]["liver"]["median_hu"] == -40.0
