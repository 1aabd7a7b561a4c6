"""The two mask-generation networks, built from maisi's own autoencoder and UNet, and their loading from NVIDIA's
released files (REFERENCE §7, §8) or maisi checkpoints, through maisi.io.checkpoint (nothing pickled runs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from maisi.config import MaskGenConfig, mask_preset, to_dict
from maisi.io.checkpoint import (
    MASK_COMPONENTS,
    load_state_dict_strict,
    read_checkpoint_file,
    split_released,
)
from maisi.io.digest import sha256_file
from maisi.maskgen.context import CONDITIONS_FILE
from maisi.networks import load_pretrained
from maisi.networks.autoencoder import Autoencoder
from maisi.networks.unet import DiffusionUNet
from maisi.networks.weights import WeightSources

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


@dataclass
class MaskModel:
    """The loaded mask model: both networks (eval mode), their config, the latent scale, where each came from
    and the conditions file found beside the weights (None: give one)."""

    autoencoder: Autoencoder
    unet: DiffusionUNet
    config: MaskGenConfig
    scale_factor: float
    sources: dict[str, dict[str, str]]
    conditions: Path | None = None


def find_conditions(path: str | Path) -> Path | None:
    """The conditions file that goes with the mask UNet at `path`: beside it (a checkpoint folder or a .pt file),
    in the model folder above it, or in the released layout's `datasets/` beside `models/`."""
    path = Path(path)
    here = path if path.is_dir() else path.parent
    for cand in (here / CONDITIONS_FILE, here.parent / CONDITIONS_FILE, here.parent / "datasets" / CONDITIONS_FILE):
        if cand.is_file():
            return cand
    return None


def load_mask_model(sources: WeightSources, preset: str | None = None,
                    device: str | torch.device = "cpu") -> MaskModel | None:
    """The mask model a weights spec holds (maisi `mask_autoencoder/` + `mask_unet/` checkpoints, or NVIDIA's
    two `mask_generation_*.pt` files, whose architecture is `preset`, mask-ct by default); None when it holds
    neither network, an error when it holds one only or two that were not trained together."""
    present = [c for c in MASK_COMPONENTS if c in sources.components]
    if not present:
        return None
    if len(present) == 1:
        other = next(c for c in MASK_COMPONENTS if c not in present)
        raise ValueError(f"{sources.spec}: the mask model needs both networks; {present[0]} is there but not {other} "
                         "(give a model folder with mask_autoencoder/ and mask_unet/, or both mask_generation_*.pt)")
    nets, configs, extras, where = {}, {}, {}, {}
    for comp in MASK_COMPONENTS:
        src = sources.components[comp]
        if src.format == "maisi":
            nets[comp], configs[comp], extras[comp] = load_pretrained(src.path, map_location=device, saved=src.saved)
            digest = src.sha256
        else:
            configs[comp] = mask_preset(preset or "mask-ct")
            if comp == "mask_autoencoder":
                nets[comp], extras[comp] = load_mask_autoencoder(src.path, configs[comp], device), {}
            else:
                nets[comp], scale = load_mask_unet(src.path, configs[comp], device)
                extras[comp] = {"scale_factor": scale}
            digest = sha256_file(src.path)
        where[comp] = {"path": str(src.path), "sha256": digest, "format": src.format}
    ae_cfg, unet_cfg = configs["mask_autoencoder"], configs["mask_unet"]
    if to_dict(ae_cfg.autoencoder) != to_dict(unet_cfg.autoencoder) or ae_cfg.latent_shape != unet_cfg.latent_shape:
        raise ValueError(f"{sources.components['mask_autoencoder'].path} and {sources.components['mask_unet'].path}: "
                         "the mask autoencoder and UNet were not trained together (their configs differ)")
    scale = float(extras["mask_unet"].get("scale_factor") or unet_cfg.scale_factor)
    return MaskModel(nets["mask_autoencoder"].eval(), nets["mask_unet"].eval(), unet_cfg, scale, where,
                     find_conditions(sources.components["mask_unet"].path))
