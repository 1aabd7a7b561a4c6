"""Loading the networks a pipeline needs: the shipped demo model, a project model folder, or NVIDIA's files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from maisi.config import ModelConfig, load_model_config, to_dict

COMPONENTS = ("autoencoder", "unet", "controlnet")
# The config parts a checkpoint of each component depends on (a ControlNet copies the UNet's encoder).
PARTS = {"autoencoder": ("autoencoder",), "unet": ("unet",), "controlnet": ("unet", "controlnet")}
DEFAULTS_FILE = "generation.json"  # optional defaults of a model folder: size, spacing, body_region
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
    sources: dict[str, dict[str, str]]  # component -> {"path", "sha256"}
    defaults: dict[str, Any] = field(default_factory=dict)
    trained_schedule: str = "rflow"


def demo_model_dir() -> Path:
    """The small model shipped in the package (trained by the project on phantoms)."""
    return Path(str(resources.files("maisi.resources").joinpath("demo_model")))


def _component_of(path: Path) -> str:
    """Which network a released file holds, from its name."""
    name = path.name.lower()
    if "autoencoder" in name or "vae" in name:
        return "autoencoder"
    if "controlnet" in name:
        return "controlnet"
    if "unet" in name or "diff" in name:
        return "unet"
    raise ValueError(f"cannot tell which network {path.name} holds; name it like the released files "
                     "(autoencoder_*.pt, diff_unet_*.pt, controlnet_*.pt) or pass a maisi checkpoint folder")


def _checkpoint_folders(folder: Path) -> dict[str, Path]:
    """component -> checkpoint folder, for a model folder (subfolders) or a single checkpoint folder."""
    from maisi.io.checkpoint import CONFIG_FILE, read_pretrained_config

    if (folder / CONFIG_FILE).is_file():
        return {read_pretrained_config(folder)[0]: folder}
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for cand in (sub, sub / "export"):
            if (cand / CONFIG_FILE).is_file():
                found.setdefault(read_pretrained_config(cand)[0], cand)
    return found


def resolve_weights(weights: str | Path | Sequence[str | Path] | None) -> tuple[dict[str, Path], dict]:
    """component -> path (checkpoint folder or .pt file), and the defaults file's content if any."""
    if weights is None:
        folder = demo_model_dir()
        if not (folder / "unet").is_dir():
            raise FileNotFoundError(f"the demo model is missing from the installation ({folder}); "
                                    "pass --weights (a model folder or the released NVIDIA files)")
        weights = [folder]
    items = [weights] if isinstance(weights, str | Path) else list(weights)
    paths: dict[str, Path] = {}
    defaults: dict = {}
    for item in items:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"weights not found: {p}")
        if p.is_dir():
            found = _checkpoint_folders(p)
            if not found:
                raise ValueError(f"{p} holds no maisi checkpoint (config.json + model.safetensors, or "
                                 "autoencoder/, unet/, controlnet/ subfolders)")
            if (p / DEFAULTS_FILE).is_file():
                defaults = json.loads((p / DEFAULTS_FILE).read_text())
        else:
            found = {_component_of(p): p}
        for comp, path in found.items():
            if comp in paths:
                raise ValueError(f"two {comp} weights given: {paths[comp]} and {path}")
            paths[comp] = path
    missing = [c for c in ("autoencoder", "unet") if c not in paths]
    if missing:
        raise ValueError(f"generation needs an autoencoder and a diffusion unet; missing: {missing} "
                         f"(given: {sorted(paths)})")
    return paths, defaults


def _released_preset(paths: dict[str, Path]) -> str:
    return "ddpm-ct" if "ddpm" in paths["unet"].name.lower() else "rflow-ct"


def load_networks(weights: str | Path | Sequence[str | Path] | None = None, config: str | Path | None = None,
                  device: str = "cpu") -> Networks:
    """Load every network; `config` (a preset or JSON) is needed only for released .pt files whose
    architecture is not the default for their name (rflow-ct, or ddpm-ct when the unet file says ddpm)."""
    from maisi.io.checkpoint import load_pretrained, load_released, read_pretrained_config, sha256_file

    paths, defaults = resolve_weights(weights)
    released = any(p.is_file() for p in paths.values())
    cfg: ModelConfig | None = load_model_config(config) if config else None
    if cfg is None and released:
        cfg = load_model_config(_released_preset(paths))
    if cfg is None:
        cfg = read_pretrained_config(paths["unet"])[1]
    models: dict[str, nn.Module] = {}
    extras: dict[str, dict] = {}
    sources: dict[str, dict[str, str]] = {}
    for comp, path in paths.items():
        if path.is_dir():
            model, ck_cfg, extra = load_pretrained(path)
            for part in PARTS[comp]:
                if to_dict(getattr(ck_cfg, part)) != to_dict(getattr(cfg, part)):
                    raise ValueError(f"{path}: its {part} config does not match the diffusion unet's "
                                     f"({paths['unet']}); give networks trained together")
            digest = json.loads((path / "config.json").read_text()).get("weights_sha256") or ""
            sources[comp] = {"path": str(path), "sha256": digest, "format": "maisi"}
        else:
            model, extra = load_released(path, comp, cfg)
            sources[comp] = {"path": str(path), "sha256": sha256_file(path), "format": "released"}
        models[comp] = model.to(device).eval()
        extras[comp] = extra
    scale = extras["unet"].get("scale_factor") or extras.get("controlnet", {}).get("scale_factor")
    if not scale:
        raise ValueError(f"{paths['unet']} records no scale_factor (the latent scale the UNet was trained with)")
    if released and not defaults:
        defaults = dict(RELEASED_DEFAULTS)
    return Networks(models["autoencoder"], models["unet"], models.get("controlnet"), cfg, float(scale), sources,
                    defaults, cfg.scheduler.kind)
