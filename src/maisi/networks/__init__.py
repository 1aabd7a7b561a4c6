"""Networks: the VAE-GAN autoencoder, the diffusion UNet and the ControlNet; built fresh or from checkpoints.

`build` makes a network from a config; `load_pretrained` (a maisi checkpoint folder) and `load_released`
(one of NVIDIA's .pt files) build it and load its weights strictly. io.checkpoint reads and writes the files;
it builds nothing, so the arrow points one way: networks → io.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from maisi.config import ModelConfig
from maisi.io.checkpoint import (
    COMPONENTS,
    CONFIG_FILE,
    MASK_COMPONENTS,
    WEIGHTS_FILE,
    CheckpointError,
    load_state_dict_strict,
    read_checkpoint_file,
    read_pretrained_config,
    read_state_dict,
    split_released,
)
from maisi.io.digest import sha256_file
from maisi.networks.autoencoder import Autoencoder
from maisi.networks.controlnet import ControlNet
from maisi.networks.unet import DiffusionUNet


def build(component: str, config: ModelConfig) -> nn.Module:
    """A freshly initialised network for `component` ("autoencoder", "unet" or "controlnet"; "mask_autoencoder"
    and "mask_unet" from a maskgen MaskGenConfig, whose parts have the same names)."""
    if component in ("autoencoder", "mask_autoencoder"):
        return Autoencoder(config.autoencoder)
    if component in ("unet", "mask_unet"):
        return DiffusionUNet(config.unet)
    if component == "controlnet":
        return ControlNet(config.unet, config.controlnet)
    raise ValueError(f"unknown component {component!r}; choose one of {', '.join(COMPONENTS + MASK_COMPONENTS)}")


def load_pretrained(
    folder: str | Path, map_location: str | torch.device = "cpu", verify_hash: bool = True,
    saved: tuple[str, Any, dict[str, Any], dict[str, Any]] | None = None,
) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """Build the model a project checkpoint folder describes and load its weights strictly. `saved`: what
    `read_pretrained_config(folder)` returned when the caller already read it (its config.json is then not
    read again)."""
    folder = Path(folder)
    component, config, extra, meta = saved or read_pretrained_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder}: missing {WEIGHTS_FILE}")
    if verify_hash and meta.get("weights_sha256") and sha256_file(weights) != meta["weights_sha256"]:
        raise CheckpointError(
            f"{weights}: sha256 differs from the one in {CONFIG_FILE}; the weights file was changed, "
            "truncated or belongs to another checkpoint"
        )
    state = read_state_dict(weights)
    model = build(component, config)
    load_state_dict_strict(model, state, source=str(weights))
    return model.to(map_location), config, extra


def load_released(
    path: str | Path, component: str, config: ModelConfig, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Build `component` from `config` and load one of NVIDIA's released files into it strictly.

    extra holds the other entries of the file (e.g. scale_factor, epoch, num_train_timesteps)."""
    state, extra = split_released(read_checkpoint_file(path), component, source=str(path))
    model = build(component, config)
    load_state_dict_strict(model, state, source=str(path))
    return model.to(map_location), extra
