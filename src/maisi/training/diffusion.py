"""Latent diffusion stage: the UNet on cached, scaled latents with the scheduler's noise and target (REFERENCE §4)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maisi.config import ModelConfig, UNetConfig
from maisi.data.datasets import LatentCases
from maisi.diffusion.schedulers import make_scheduler
from maisi.training import distributed as D
from maisi.training.loop import autocast, poly_lr, set_lr
from maisi.training.state import sample_generator


@dataclass(frozen=True)
class DiffusionOptions:
    lr: float = 1e-4
    lr_power: float = 2.0  # polynomial decay of the learning rate to 0 at the last step
    loss: str = "l1"  # or "mse"
    modality_dropout: float = 0.1  # share of samples trained unconditionally (modality 0), for guidance
    ema_decay: float = 0.999  # 0: no EMA (the export holds the raw weights)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.loss not in ("l1", "mse"):
            raise ValueError(f"loss must be 'l1' or 'mse', got {self.loss!r}")
        if not 0 <= self.modality_dropout <= 1:
            raise ValueError(f"modality_dropout must be in [0, 1], got {self.modality_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_power < 0:
            raise ValueError(f"lr_power must be >= 0, got {self.lr_power}")


class EMA(nn.Module):
    """Exponential moving average of a model's weights: θ_ema ← d·θ_ema + (1 − d)·θ."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def noised(scheduler: Any, z: Tensor, samples: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, target) with each sample's noise and timestep drawn from its own generator."""
    shape = tuple(z.shape[1:])
    noise, ts = [], []
    for s in samples.tolist():
        noise.append(torch.randn(shape, generator=sample_generator(seed, s, 4)))
        ts.append(scheduler.sample_training_timesteps(1, shape, sample_generator(seed, s, 5)).reshape(1))
    noise = torch.stack(noise).to(z.device, z.dtype)
    t = torch.cat(ts).to(z.device).float()
    return scheduler.add_noise(z, noise, t), t, scheduler.training_target(z, noise, t)


def unet_kwargs(config: UNetConfig, batch: dict[str, Any], modality: Tensor | None = None) -> dict[str, Any]:
    """The condition inputs the UNet's config asks for, from a batch; a missing one is a clear error."""
    kw: dict[str, Any] = {}
    if config.include_spacing_input:
        kw["spacing"] = batch["spacing"].float()
    if config.include_region_input:
        for k, name in (("top_region_index", "top_region"), ("bottom_region_index", "bottom_region")):
            if k not in batch:
                raise ValueError(f"this UNet is conditioned on body regions: give {k} (one-hot of 4 or a region "
                                 "name) in each case's sidecar or datalist entry")
            kw[name] = batch[k].float()
    if config.num_class_embeds is not None:
        kw["modality"] = batch["modality"] if modality is None else modality
    return kw


def drop_modality(modality: Tensor, samples: Tensor, p: float, seed: int) -> Tensor:
    """Replace each sample's modality by 0 (unconditional) with probability p, per sample."""
    if p <= 0:
        return modality
    drop = torch.tensor([bool(torch.rand(1, generator=sample_generator(seed, s, 6)) < p) for s in samples.tolist()])
    return torch.where(drop.to(modality.device), torch.zeros_like(modality), modality)


class DiffusionStage:
    """A UNet on scaled latents: the scheduler's noise and target, an EMA of the weights, polynomial lr decay.
    The conditions and the loss are the two hooks a stage changes (maisi.training.mask's UNet: the size context)."""

    name = "diffusion"
    component = "unet"

    def __init__(self, unet: nn.Module, config: ModelConfig, opts: DiffusionOptions, world: D.World,
                 steps: int, scale_factor: float, seed: int = 0):
        self.config, self.opts, self.world, self.steps, self.seed = config, opts, world, steps, seed
        self.scheduler = make_scheduler(config.scheduler, config.unet.spatial_dims)
        self.unet = unet.to(world.device)
        self.model = D.wrap(self.unet, world)
        self.ema = EMA(self.unet, opts.ema_decay) if opts.ema_decay > 0 else None
        self.opt = torch.optim.Adam(self.unet.parameters(), lr=self.base_lr)
        self.scale_factor = torch.tensor(float(scale_factor))

    @property
    def base_lr(self) -> float:
        return self.opts.lr

    def modules(self) -> dict[str, nn.Module]:
        return {self.component: self.unet, **({"ema": self.ema.model} if self.ema else {})}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {self.component: self.opt}

    def extra_state(self) -> dict[str, Any]:
        return {"scale_factor": self.scale_factor}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.scale_factor = torch.as_tensor(state["scale_factor"]).cpu().float()

    def export(self) -> tuple[nn.Module, dict[str, Any]]:
        extra = {"scale_factor": float(self.scale_factor),
                 "num_train_timesteps": self.config.scheduler.num_train_timesteps}
        return (self.ema.model if self.ema else self.unet), extra

    def conditions(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The UNet's keyword inputs: spacing, regions and the modality (dropped for guidance)."""
        modality = drop_modality(batch["modality"], batch["sample"], self.opts.modality_dropout, self.seed)
        return unet_kwargs(self.config.unet, batch, modality)

    def loss(self, pred: Tensor, target: Tensor, batch: dict[str, Any]) -> Tensor:
        return F.l1_loss(pred, target) if self.opts.loss == "l1" else F.mse_loss(pred, target)

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        set_lr(self.opt, poly_lr(self.base_lr, step, self.steps, self.opts.lr_power))
        z = batch["latent"].float() * self.scale_factor.to(self.world.device)
        x_t, t, target = noised(self.scheduler, z, batch["sample"], self.seed)
        kwargs = self.conditions(batch)
        self.model.train()
        with autocast(self.world.device, self.opts.precision):
            pred = self.model(x_t, t, **kwargs)
        loss = self.loss(pred.float(), target, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.unet)
        return {"loss": loss.item(), "lr": self.opt.param_groups[0]["lr"]}


def latent_std(cases: LatentCases, seed: int = 0) -> float:
    """Standard deviation over all training latents (scale_factor = 1 / std, REFERENCE §3)."""
    total, total2, n = 0.0, 0.0, 0
    for i in range(len(cases)):
        z = cases.latent(i, sample_generator(seed, i, stream=7)).double()
        total, total2, n = total + float(z.sum()), total2 + float(z.pow(2).sum()), n + z.numel()
    var = total2 / n - (total / n) ** 2
    if var <= 0:
        raise ValueError("the training latents are constant, so their scale 1/std is undefined; give scale_factor")
    return var**0.5
