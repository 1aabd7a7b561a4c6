"""Training losses: KL, least-squares adversarial, LPIPS-style 2.5D perceptual, weighted and contrastive L1."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def kl_loss(mu: Tensor, sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma²) ‖ N(0, 1)) summed over latent voxels, averaged over the batch (REFERENCE §4)."""
    var = sigma.float().pow(2)
    kl = 0.5 * (mu.float().pow(2) + var - torch.log(var.clamp_min(1e-30)) - 1)
    return kl.flatten(1).sum(1).mean()


_lsgan = PatchAdversarialLoss(criterion="least_squares")  # MONAI's, as the reference uses


def generator_adversarial_loss(logits_fake: Tensor | list[Tensor]) -> Tensor:
    """Least-squares GAN loss pushing the discriminator's patches on fakes towards 'real'."""
    return _lsgan(logits_fake, target_is_real=True, for_discriminator=False)


def discriminator_loss(logits_fake: Tensor | list[Tensor], logits_real: Tensor | list[Tensor]) -> Tensor:
    """Least-squares discriminator loss: ½·(fake → 0, real → 1)."""
    fake = _lsgan(logits_fake, target_is_real=False, for_discriminator=True)
    real = _lsgan(logits_real, target_is_real=True, for_discriminator=True)
    return 0.5 * (fake + real)


def _unit(f: Tensor, eps: float = 1e-10) -> Tensor:
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)


class PerceptualLoss25D(nn.Module):
    """LPIPS-style perceptual distance of 3D volumes over 2D slices of each axis ("2.5D").

    `features(x)` maps an N×3×H×W ImageNet-normalised batch to a list of feature maps (a frozen 2D
    backbone). For every sample and axis a random `fraction` of the slices is compared: feature vectors
    are unit-normalised along channels, squared differences summed over channels, averaged over positions,
    then averaged over layers, slices and the three axes (LPIPS without learned layer weights).
    """

    def __init__(self, features: nn.Module | Callable[[Tensor], Sequence[Tensor]], fraction: float = 0.2,
                 imagenet_normalise: bool = True):
        super().__init__()
        self.imagenet_normalise = imagenet_normalise  # False: `features` takes N×1×H×W in [0, 1] itself
        if not 0 < fraction <= 1:
            raise ValueError(f"perceptual slice fraction must be in (0, 1], got {fraction}")
        self.features = features
        self.fraction = fraction
        if isinstance(features, nn.Module):
            features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> PerceptualLoss25D:
        super().train(mode)
        if isinstance(self.features, nn.Module):
            self.features.eval()  # the backbone stays frozen (no batch-norm updates)
        return self

    def distance2d(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-slice distance of two N×1×H×W batches in [0, 1] -> N."""
        x = torch.cat([a, b])
        if self.imagenet_normalise:
            x = (x.expand(-1, 3, -1, -1) - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = self.features(x)
        layers = []
        for f in feats:
            fa, fb = f.float().chunk(2)
            layers.append((_unit(fa) - _unit(fb)).pow(2).sum(1).flatten(1).mean(1))
        return torch.stack(layers).mean(0)

    def forward(self, x: Tensor, y: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """x, y: N×1×X×Y×Z in [0, 1] (the reconstruction first); one generator per sample picks its slices."""
        if x.shape != y.shape or x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"perceptual loss needs two N×1×X×Y×Z volumes of one shape, got {x.shape}, {y.shape}")
        per_sample = []
        for i in range(x.shape[0]):
            g = generators[i] if generators is not None else None
            axes = []
            for axis in range(3):
                n = x.shape[2 + axis]
                k = max(1, round(self.fraction * n))
                idx = torch.randperm(n, generator=g)[:k].to(x.device)
                a = x[i, 0].index_select(axis, idx).movedim(axis, 0).unsqueeze(1)
                b = y[i, 0].index_select(axis, idx).movedim(axis, 0).unsqueeze(1)
                axes.append(self.distance2d(a, b).mean())
            per_sample.append(torch.stack(axes).mean())
        return torch.stack(per_sample).mean()


def weighted_l1(pred: Tensor, target: Tensor, roi: Tensor | None = None, weight: float = 100.0) -> Tensor:
    """L1 with `weight` on voxels where roi (N×1×… at latent resolution, 0/1) is set (REFERENCE §4)."""
    return _roi_weighted_mean((pred.float() - target.float()).abs(), roi, weight)


def weighted_mse(pred: Tensor, target: Tensor, roi: Tensor | None = None, weight: float = 1.0) -> Tensor:
    """Squared error with `weight` on voxels where roi (N×1×… at latent resolution, 0/1) is set, as weighted_l1."""
    return _roi_weighted_mean((pred.float() - target.float()) ** 2, roi, weight)


def _roi_weighted_mean(err: Tensor, roi: Tensor | None, weight: float) -> Tensor:
    if roi is None or weight == 1:
        return err.mean()
    return (err * (1 + (weight - 1) * roi.to(err.dtype))).mean()


def region_contrastive_loss(pred: Tensor, pred_perturbed: Tensor, roi: Tensor, delta: float = 2.0,
                            dilation: int = 1) -> Tensor:
    """MAISI-v2 region-specific contrastive loss L_roi + L_bg, averaged over the batch.

    D_roi = masked-mean |G(c) − G(c')| inside the ROI, L_roi = −min(D_roi, δ) (the prediction must
    react to the tumour, capped at δ); L_bg = masked-mean |G(c) − G(c')| outside the dilated ROI
    (it must not react elsewhere). Samples without ROI voxels contribute only L_bg."""
    diff = (pred.float() - pred_perturbed.float()).abs().mean(1, keepdim=True)  # N×1×…
    m = roi.to(diff.dtype)
    k = 2 * dilation + 1
    m_bg = 1 - F.max_pool3d(m, k, stride=1, padding=dilation)
    d_roi = (diff * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    l_roi = -torch.minimum(d_roi, torch.full_like(d_roi, delta))
    l_bg = (diff * m_bg).flatten(1).sum(1) / m_bg.flatten(1).sum(1).clamp_min(1)
    return (l_roi + l_bg).mean()
