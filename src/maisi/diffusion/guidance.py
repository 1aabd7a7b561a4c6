"""Denoiser wrappers: conditioning (ControlNet → UNet) and classifier-free guidance (REFERENCE §2)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from maisi.diffusion.sampling import Denoiser
from maisi.labels import TUMOR_IDS


class ConditionedDenoiser:
    """denoiser(x, t) for a UNet with fixed conditions, plus a ControlNet's residuals when a mask is given."""

    def __init__(
        self,
        unet: nn.Module,
        controlnet: nn.Module | None = None,
        *,
        spacing: torch.Tensor | None = None,
        top_region: torch.Tensor | None = None,
        bottom_region: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        controlnet_scale: float = 1.0,
    ):
        if controlnet is not None and mask is None:
            raise ValueError("a ControlNet needs a label mask to condition on")
        self.unet, self.controlnet, self.mask, self.scale = unet, controlnet, mask, controlnet_scale
        self.conditions = dict(spacing=spacing, top_region=top_region, bottom_region=bottom_region, modality=modality)

    def with_modality(self, modality: torch.Tensor | None) -> ConditionedDenoiser:
        """The same denoiser with another modality code (0 = the unconditional branch)."""
        return self._replace(modality=modality)

    def with_mask(self, mask: torch.Tensor) -> ConditionedDenoiser:
        return self._replace(mask=mask)

    def _replace(self, **changes: torch.Tensor | None) -> ConditionedDenoiser:
        kw = {**self.conditions, "mask": self.mask, **changes}
        return ConditionedDenoiser(self.unet, self.controlnet, controlnet_scale=self.scale, **kw)

    def joined(self, other: ConditionedDenoiser) -> ConditionedDenoiser | None:
        """One denoiser for the batch [self; other] (same networks, matching condition shapes), else None."""
        if self.unet is not other.unet or self.controlnet is not other.controlnet or self.scale != other.scale:
            return None
        mine, theirs = {**self.conditions, "mask": self.mask}, {**other.conditions, "mask": other.mask}
        cat: dict[str, torch.Tensor | None] = {}
        for k, a in mine.items():
            b = theirs[k]
            if (a is None) != (b is None) or (a is not None and a.shape[1:] != b.shape[1:]):
                return None
            cat[k] = None if a is None else torch.cat([a, b])
        return self._replace(**cat)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        down = mid = None
        if self.controlnet is not None:
            down, mid = self.controlnet(x, t, self.mask, modality=self.conditions["modality"])
            if self.scale != 1.0:
                down, mid = [d * self.scale for d in down], mid * self.scale
        return self.unet(x, t, **self.conditions, down_residuals=down, mid_residual=mid)


class ContextDenoiser:
    """denoiser(x, t) for a UNet conditioned by a cross-attention context alone (the mask UNet's size vector)."""

    def __init__(self, unet: nn.Module, context: torch.Tensor):
        self.unet, self.context = unet, context

    def joined(self, other: ContextDenoiser) -> ContextDenoiser | None:
        """One denoiser for the batch [self; other] (the same UNet, contexts of one shape), else None."""
        if self.unet is not other.unet or self.context.shape[1:] != other.context.shape[1:]:
            return None
        return ContextDenoiser(self.unet, torch.cat([self.context, other.context]))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context=self.context)


class ClassifierFreeGuidance:
    """out = u + s·(c − u). As in the reference, s = 0 means no guidance: only the conditional branch runs.

    When both branches are ConditionedDenoisers (or both ContextDenoisers) over the same networks they run as one
    batch of 2N (one forward per step instead of two); pass `batched=False` to save memory instead.
    """

    def __init__(self, cond: Denoiser, uncond: Denoiser, scale: float, *, batched: bool = True):
        if scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}")
        self.cond, self.uncond, self.scale = cond, uncond, float(scale)
        both = type(cond) is type(uncond) and isinstance(cond, (ConditionedDenoiser, ContextDenoiser))
        self.joint = cond.joined(uncond) if batched and both else None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.scale == 0.0:
            return self.cond(x, t)
        if self.joint is not None:
            c, u = self.joint(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        else:
            c, u = self.cond(x, t), self.uncond(x, t)
        return u + self.scale * (c - u)


def tumor_free_mask(mask: torch.Tensor | np.ndarray, tumor_ids: tuple[int, ...] = TUMOR_IDS):
    """The mask with every tumour voxel given the label of the nearest non-tumour voxel (its host organ):
    the unconditional branch for paired-CT guidance."""
    is_tensor = isinstance(mask, torch.Tensor)
    arr = mask.detach().cpu().numpy() if is_tensor else np.asarray(mask)
    tumor = np.isin(arr, tumor_ids)
    if not tumor.any():
        return mask.clone() if is_tensor else arr.copy()
    out = arr.copy()
    flat = out.reshape((-1,) + arr.shape[-3:])
    for k, vol in enumerate(tumor.reshape((-1,) + arr.shape[-3:])):
        if vol.any() and not vol.all():
            idx = ndimage.distance_transform_edt(vol, return_distances=False, return_indices=True)
            flat[k] = flat[k][tuple(idx)]
    return torch.from_numpy(out).to(mask.device) if is_tensor else out
