"""The two mask-generation networks, built from maisi's own autoencoder and UNet, and the loading of
NVIDIA's released files (REFERENCE §7, §8) through maisi.io.checkpoint (nothing pickled runs)."""

from __future__ import annotations

from pathlib import Path

import torch

from maisi.io.checkpoint import load_state_dict_strict, read_checkpoint_file, split_released
from maisi.maskgen.config import MaskGenConfig
from maisi.networks.autoencoder import Autoencoder
from maisi.networks.unet import DiffusionUNet

RELEASED_AUTOENCODER = "mask_generation_autoencoder.pt"  # a raw state dict
RELEASED_UNET = "mask_generation_diffusion_unet.pt"  # {"unet_state_dict", "scale_factor", ...}


def build_mask_autoencoder(config: MaskGenConfig) -> Autoencoder:
    """The mask autoencoder: 8 bit planes in, 125 class logits out (state dict of MONAI's AutoencoderKlMaisi)."""
    return Autoencoder(config.autoencoder)


def build_mask_unet(config: MaskGenConfig) -> DiffusionUNet:
    """The mask diffusion UNet (state dict of MONAI's DiffusionModelUNet with cross-attention)."""
    return DiffusionUNet(config.unet)


def load_mask_autoencoder(path: str | Path, config: MaskGenConfig,
                          map_location: str | torch.device = "cpu") -> Autoencoder:
    """`mask_generation_autoencoder.pt` (or a file of that layout), loaded strictly, in eval mode."""
    state, _ = split_released(read_checkpoint_file(path), "autoencoder", source=str(path))
    model = build_mask_autoencoder(config)
    load_state_dict_strict(model, state, source=str(path))
    return model.to(map_location).eval()


def load_mask_unet(path: str | Path, config: MaskGenConfig,
                   map_location: str | torch.device = "cpu") -> tuple[DiffusionUNet, float]:
    """`mask_generation_diffusion_unet.pt` (or a file of that layout), loaded strictly, in eval mode, and the
    scale factor it records (the config's when the file has none). Old MONAI Generative key names are
    renamed by `DiffusionUNet.upgrade_state_dict`, with a warning per key."""
    state, extra = split_released(read_checkpoint_file(path), "unet", source=str(path))
    model = build_mask_unet(config)
    load_state_dict_strict(model, state, source=str(path))
    return model.to(map_location).eval(), float(extra.get("scale_factor", config.scale_factor))
