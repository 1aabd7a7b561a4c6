"""Networks: the VAE-GAN autoencoder, the diffusion UNet and the ControlNet."""

from __future__ import annotations

from torch import nn

from maisi.config import ModelConfig
from maisi.io.checkpoint import COMPONENTS


def build(component: str, config: ModelConfig) -> nn.Module:
    """A freshly initialised network for `component` ("autoencoder", "unet" or "controlnet")."""
    if component == "autoencoder":
        from maisi.networks.autoencoder import Autoencoder

        return Autoencoder(config.autoencoder)
    if component == "unet":
        from maisi.networks.unet import DiffusionUNet

        return DiffusionUNet(config.unet)
    if component == "controlnet":
        from maisi.networks.controlnet import ControlNet

        return ControlNet(config.unet, config.controlnet)
    raise ValueError(f"unknown component {component!r}; choose one of {', '.join(COMPONENTS)}")
