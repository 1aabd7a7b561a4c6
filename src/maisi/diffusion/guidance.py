"""Denoiser wrappers: ControlNet + UNet conditioning and classifier-free guidance (REFERENCE §2)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from maisi.labels import TUMOR_HOSTS


def remove_tumors(mask: torch.Tensor) -> torch.Tensor:
    """The label map with every tumour id replaced by its host organ id (a tumour-free condition)."""
    out = mask.clone()
    for tumor, host in TUMOR_HOSTS.items():
        out[mask == tumor] = host
    return out


@dataclass(frozen=True)
class ConditionedDenoiser:
    """denoiser(x, t) that runs ControlNet(mask) -> UNet with spacing / region / modality conditioning."""

    unet: nn.Module
    controlnet: nn.Module | None = None
    spacing: torch.Tensor | None = None  # N×3 mm
    top_region: torch.Tensor | None = None  # N×4 one-hot
    bottom_region: torch.Tensor | None = None
    modality: torch.Tensor | None = None  # N long codes
    mask: torch.Tensor | None = None  # N×1×X×Y×Z label map at image resolution

    def __post_init__(self) -> None:
        if self.controlnet is not None and self.mask is None:
            raise ValueError("a ControlNet needs a mask (N×1×X×Y×Z label map)")

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        down = mid = None
        if self.controlnet is not None:
            down, mid = self.controlnet(x, t, self.mask, modality=self.modality)
        return self.unet(
            x,
            t,
            spacing=self.spacing,
            top_region=self.top_region,
            bottom_region=self.bottom_region,
            modality=self.modality,
            down_residuals=down,
            mid_residual=mid,
        )

    def unconditional(self, *, tumor_free: bool = False) -> ConditionedDenoiser:
        """The same denoiser with modality 0 ("unknown"), or with tumours removed from the mask."""
        if tumor_free:
            if self.mask is None:
                raise ValueError("tumor_free needs a mask")
            return replace(self, mask=remove_tumors(self.mask))
        if self.modality is None:
            raise ValueError("modality-free guidance needs a modality tensor on the conditional branch")
        return replace(self, modality=torch.zeros_like(self.modality))

    def joined(self, other: ConditionedDenoiser) -> ConditionedDenoiser | None:
        """One denoiser for the batch [self; other] when both share the networks and conditions; else None."""
        if self.unet is not other.unet or self.controlnet is not other.controlnet:
            return None
        fields = ("spacing", "top_region", "bottom_region", "modality", "mask")
        cat = {}
        for f in fields:
            a, b = getattr(self, f), getattr(other, f)
            if (a is None) != (b is None) or (a is not None and a.shape[1:] != b.shape[1:]):
                return None
            cat[f] = None if a is None else torch.cat([a, b])
        return replace(self, **cat)


class ClassifierFreeGuidance:
    """out = u + s·(c − u). Scale 0 or None means no guidance: only the conditional branch runs."""

    def __init__(self, cond: ConditionedDenoiser, uncond: ConditionedDenoiser, scale: float | None) -> None:
        self.cond, self.uncond, self.scale = cond, uncond, scale
        self.batched = cond.joined(uncond)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.scale:
            return self.cond(x, t)
        if self.batched is not None:  # both branches in one forward
            c, u = self.batched(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        else:
            c, u = self.cond(x, t), self.uncond(x, t)
        return u + self.scale * (c - u)
