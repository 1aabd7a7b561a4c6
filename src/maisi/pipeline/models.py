"""The networks a pipeline needs, loaded together from one weights spec (see maisi.networks.weights)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from maisi.config import ModelConfig
from maisi.io.checkpoint import COMPONENTS
from maisi.maskgen.networks import MaskModel, load_mask_model
from maisi.networks.weights import WeightSources, demo_model_dir, load_component, resolve

__all__ = ["RELEASED_DEFAULTS", "Networks", "demo_model_dir", "load_networks"]

# Defaults of the released CT models (reference-data/config_infer.json).
RELEASED_DEFAULTS = {"size": [256, 256, 256], "spacing": [1.5, 1.5, 2.0], "body_region": ["chest"]}


@dataclass
class Networks:
    """The loaded networks, their config, the latent scale and where every weight came from."""

    autoencoder: nn.Module
    unet: nn.Module
    controlnet: nn.Module | None
    config: ModelConfig
    scale_factor: float
    sources: dict[str, dict[str, str]]  # component -> {"path", "sha256", "format"}
    defaults: dict[str, Any] = field(default_factory=dict)
    trained_schedule: str = "rflow"
    mask: MaskModel | None = None  # the mask generation model, when the weights hold one (--anatomy-size)


def load_networks(weights: str | Path | Sequence[str | Path] | WeightSources | None = None,
                  config: str | Path | ModelConfig | None = None, device: str = "cpu") -> Networks:
    """Load every network `weights` names (None: the demo model; see `maisi.networks.weights.resolve`).
    `config` (a preset or JSON) overrides the architecture of released .pt files, which is otherwise their
    set's or the one their names give; maisi checkpoints must fit it. Every config is checked before any
    weight loads. The mask generation model loads too when the weights hold one (NVIDIA's files: mask-ct)."""
    sources = resolve(weights)
    missing = [c for c in ("autoencoder", "unet") if c not in sources.components]
    if missing:
        raise ValueError(f"generation needs an autoencoder and a diffusion unet; missing: {missing} "
                         f"(given: {sorted(sources.components)})")
    cfg = sources.config(config)
    loaded = {c: load_component(sources, c, cfg, device) for c in COMPONENTS if c in sources.components}
    scale = next((x.extra["scale_factor"] for c, x in loaded.items()
                  if c != "autoencoder" and x.extra.get("scale_factor")), None)
    if not scale:
        raise ValueError(f"{sources.paths['unet']} records no scale_factor (the latent scale the UNet was "
                         "trained with)")
    defaults = dict(sources.defaults) or (dict(RELEASED_DEFAULTS) if sources.released else {})
    return Networks(loaded["autoencoder"].model, loaded["unet"].model,
                    loaded["controlnet"].model if "controlnet" in loaded else None, cfg, float(scale),
                    {c: x.source for c, x in loaded.items()}, defaults, cfg.scheduler.kind,
                    load_mask_model(sources, device=device))
