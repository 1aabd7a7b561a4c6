"""ControlNet stage: a frozen UNet steered by label masks; tumour-weighted L1 and region-contrastive loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maisi.config import ModelConfig
from maisi.diffusion.schedulers import make_scheduler
from maisi.labels import TUMOR_HOSTS
from maisi.training import distributed as D
from maisi.training.diffusion import noised, unet_kwargs
from maisi.training.loop import autocast
from maisi.training.losses import region_contrastive_loss, weighted_l1


@dataclass(frozen=True)
class ControlNetOptions:
    lr: float = 1e-5
    weight_decay: float = 1e-2  # AdamW's default
    tumor_labels: tuple[int, ...] = tuple(TUMOR_HOSTS)  # voxels weighted in the L1 loss
    tumor_weight: float = 100.0
    contrastive_weight: float = 0.0  # MAISI-v2 uses 0.01
    contrastive_delta: float = 2.0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.tumor_weight < 1:
            raise ValueError(f"tumor_weight must be >= 1, got {self.tumor_weight}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if self.contrastive_delta <= 0:
            raise ValueError(f"contrastive_delta must be > 0, got {self.contrastive_delta}")
        if self.contrastive_weight > 0:
            missing = [t for t in self.tumor_labels if t not in TUMOR_HOSTS]
            if missing:
                raise ValueError(f"tumor_labels: the contrastive loss replaces tumours by their host organ; no host is known "
                                 f"for label(s) {missing}; known tumours: {sorted(TUMOR_HOSTS)}")


def tumour_roi(label: Tensor, tumour_ids: Sequence[int], factor: int) -> Tensor:
    """N×1 latent-resolution mask of latent voxels whose factor³ image block holds a chosen tumour voxel."""
    hit = torch.zeros_like(label, dtype=torch.float32)
    for i in tumour_ids:
        hit = torch.maximum(hit, (label == i).float())
    return F.max_pool3d(hit, factor) if factor > 1 else hit


def replace_tumours(label: Tensor, tumour_ids: Sequence[int]) -> Tensor:
    """The mask with each chosen tumour relabelled as its host organ (the contrastive loss's c')."""
    out = label.clone()
    for i in tumour_ids:
        out[label == i] = TUMOR_HOSTS[i]
    return out


class ControlNetStage:
    name = "controlnet"
    component = "controlnet"

    def __init__(self, controlnet: nn.Module, unet: nn.Module, config: ModelConfig, opts: ControlNetOptions,
                 world: D.World, scale_factor: float, seed: int = 0):
        self.config, self.opts, self.world, self.seed = config, opts, world, seed
        self.scheduler = make_scheduler(config.scheduler, config.unet.spatial_dims)
        self.unet = unet.to(world.device).eval().requires_grad_(False)
        self.controlnet = controlnet.to(world.device)
        self.model = D.wrap(self.controlnet, world)
        self.opt = torch.optim.AdamW(self.controlnet.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        self.scale_factor = torch.tensor(float(scale_factor))

    def modules(self) -> dict[str, nn.Module]:
        return {"controlnet": self.controlnet}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"controlnet": self.opt}

    def extra_state(self) -> dict[str, Any]:
        return {"scale_factor": self.scale_factor}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.scale_factor = torch.as_tensor(state["scale_factor"]).cpu().float()

    def export(self) -> tuple[nn.Module, dict[str, Any]]:
        return self.controlnet, {"scale_factor": float(self.scale_factor)}

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        o = self.opts
        z = batch["latent"].float() * self.scale_factor.to(self.world.device)
        label = batch["label"]
        x_t, t, target = noised(self.scheduler, z, batch["sample"], self.seed)
        roi = tumour_roi(label, o.tumor_labels, label.shape[2] // z.shape[2])
        kw = unet_kwargs(self.config.unet, batch)
        contrast = o.contrastive_weight > 0
        n = z.shape[0]
        if contrast:  # both masks in one forward, so DDP sees a single pass
            x_t, t, label = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([label, replace_tumours(label, o.tumor_labels)])
            kw = {k: torch.cat([v, v]) for k, v in kw.items()}
        self.controlnet.train()
        with autocast(self.world.device, o.precision):
            down, mid = self.model(x_t, t, label, modality=kw.get("modality"))
            pred = self.unet(x_t, t, **kw, down_residuals=down, mid_residual=mid)
        pred = pred.float()
        loss = weighted_l1(pred[:n], target, roi, o.tumor_weight)
        out = {"loss_l1": loss.item()}
        if contrast:
            con = region_contrastive_loss(pred[:n], pred[n:], roi, o.contrastive_delta)
            loss = loss + o.contrastive_weight * con
            out["loss_contrastive"] = con.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        out["loss"] = loss.item()
        return out
