"""Sampling a label map: the mask UNet denoises a latent under the size context (DDPM 1000 steps as
released, or DDIM), the mask autoencoder decodes latent / scale_factor, argmax and remap (REFERENCE §8)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from maisi.config import CONTEXT_SIZE, MaskGenConfig
from maisi.diffusion.guidance import ClassifierFreeGuidance, ContextDenoiser
from maisi.diffusion.sampling import make_generators, make_noise, sample
from maisi.diffusion.schedulers import COMPATIBLE_SAMPLERS, make_scheduler
from maisi.maskgen.context import DONT_CARE
from maisi.maskgen.encoding import index_to_labels
from maisi.networks.autoencoder import Autoencoder
from maisi.networks.unet import DiffusionUNet


def context_tensor(context: Sequence[float], device: str | torch.device = "cpu") -> torch.Tensor:
    """A completed size vector as the UNet's 1×1×10 cross-attention context."""
    values = torch.as_tensor(list(context), dtype=torch.float32, device=device)
    if values.shape != (CONTEXT_SIZE,):
        raise ValueError(f"context must hold {CONTEXT_SIZE} sizes (maskgen.context.complete_context), "
                         f"got {tuple(values.shape)}")
    return values.view(1, 1, CONTEXT_SIZE)


def check_mask_sampler(config: MaskGenConfig, sampler: str | None, field: str = "sampler") -> str:
    """The sampler to run (None: the config's), refused when the UNet was not trained for it: DDPM and DDIM for
    noise prediction, rectified flow for itself. `field` names the option in the message."""
    kind = sampler or config.scheduler.kind
    allowed = COMPATIBLE_SAMPLERS[config.scheduler.kind]
    if kind not in allowed:
        raise ValueError(f"{field} must be {' or '.join(repr(k) for k in allowed)} for a mask UNet trained with "
                         f"{config.scheduler.kind}, got {kind!r}")
    return kind


@torch.no_grad()
def sample_mask_latent(unet: DiffusionUNet, context: Sequence[float], config: MaskGenConfig, seed: int, *,
                       sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                       device: str | torch.device = "cpu", progress: bool = False,
                       callback: Callable[[int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
    """1×C×x×y×z latent (still multiplied by the scale factor) from noise drawn from `seed`.

    `sampler` and `steps` override the config's scheduler: "ddpm" or "ddim" for a UNet trained to predict noise
    (the released model: DDPM with all 1000 steps; DDIM with fewer is the faster approximation), "rflow" for one
    trained with rectified flow (maisi's mask-tiny). `guidance`
    (default: config.guidance_scale) > 0 runs classifier-free guidance against the all-"don't care" context,
    both branches as one batch of 2 a step; it only helps a UNet trained with context dropout.
    """
    cfg = replace(config.scheduler, kind=check_mask_sampler(config, sampler),
                  num_inference_steps=steps or config.scheduler.num_inference_steps)
    scheduler = make_scheduler(cfg, spatial_dims=len(config.latent_shape) - 1)
    scale = config.guidance_scale if guidance is None else float(guidance)
    ctx = context_tensor(context, device)
    null = torch.full_like(ctx, DONT_CARE)
    denoise = ClassifierFreeGuidance(ContextDenoiser(unet, ctx), ContextDenoiser(unet, null), scale)
    gens = make_generators([seed])
    noise = make_noise(config.latent_shape, [seed], device=device, generators=gens)
    return sample(denoise, scheduler, noise, generator=gens, callback=callback, progress=progress)


@torch.no_grad()
def decode_mask(autoencoder: Autoencoder, latent: torch.Tensor, scale_factor: float, *,
                memory_gb: float | None = None, num_splits: int | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """1×1×X×Y×Z uint8 map of MAISI ids: decode latent / scale_factor, argmax over the classes, remap.

    The argmax is taken segment by segment (tile by tile when streaming), so the 125 class logits are never held
    whole: 8.4 GB in fp32 for the released model's 256³. `memory_gb` picks the fastest exact plan within that
    budget (networks.memory); without it, `num_splits` segments (the config's by default).
    """
    z = latent / scale_factor
    if memory_gb is not None:
        index = autoencoder.decode_within(z, memory_gb, argmax=True, dtype=dtype)
    else:
        index = autoencoder.decode(z, num_splits=num_splits, dtype=dtype, argmax=True)
    return index_to_labels(index)


def generate_mask(autoencoder: Autoencoder, unet: DiffusionUNet, context: Sequence[float], config: MaskGenConfig,
                  seed: int, *, sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                  scale_factor: float | None = None, memory_gb: float | None = None, num_splits: int | None = None,
                  dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  progress: bool = False) -> torch.Tensor:
    """A raw generated label map (1×1×X×Y×Z, MAISI ids) for a completed size vector; post-process it with
    maskgen.postprocess.postprocess_mask(labels, target_tumor(context))."""
    latent = sample_mask_latent(unet, context, config, seed, sampler=sampler, steps=steps, guidance=guidance,
                                device=device, progress=progress)
    return decode_mask(autoencoder, latent, config.scale_factor if scale_factor is None else scale_factor,
                       memory_gb=memory_gb, num_splits=num_splits, dtype=dtype)
