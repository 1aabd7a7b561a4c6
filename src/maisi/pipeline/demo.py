"""The demo recipe: phantoms → VAE → latents → diffusion UNet → ControlNet, with the project's own commands."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from maisi.io.atomic import atomic_write_text

DEMO_REGIONS = ("chest", "abdomen", "pelvis", "head_neck", "chest-abdomen")


@dataclass(frozen=True)
class DemoRecipe:
    """How big and how long: the shipped model and `maisi demo` use the same recipe at other lengths."""

    size: int = 64  # phantom edge in voxels
    spacing: float = 4.0  # mm, so the field of view (256 mm) holds a whole body region
    phantoms_per_region: int = 4
    vae_steps: int = 200
    diffusion_steps: int = 300
    controlnet_steps: int = 100
    config: str = "tiny"
    seed: int = 0
    vae_lr: float = 1e-3  # short CPU runs: a high rate and no adversarial term (blurrier, 5x cheaper)
    adv_weight: float = 0.0
    device: str = "cpu"
    workers: int = 0  # data-loading processes per training run


def _cli(*argv: str) -> None:
    from maisi.cli import main

    code = main(list(argv))
    if code:
        raise RuntimeError(f"`maisi {' '.join(argv)}` failed with exit code {code}")


def train_demo(folder: str | Path, recipe: DemoRecipe = DemoRecipe(), progress: bool = True) -> Path:
    """Run the whole training story into `folder` and assemble a model folder `folder/model`
    (autoencoder/, unet/, controlnet/, generation.json); re-running resumes every stage."""
    folder = Path(folder)
    r = recipe
    quiet = [] if progress else ["--no-progress"]
    phantoms, latents, runs = folder / "phantoms", folder / "latents", folder / "runs"
    if not (phantoms / "datalist.json").is_file():
        for i, region in enumerate(DEMO_REGIONS):
            n = r.phantoms_per_region if "-" not in region else max(1, r.phantoms_per_region // 2)
            _cli("phantom", "--region", region, "--size", str(r.size), "--spacing", str(r.spacing),
                 "--num", str(n), "--seed", str(r.seed + 100 * i), "--out", str(phantoms))
    common = ["--no-tensorboard", "--checkpoint-every", "200", "--seed", str(r.seed), "--device", r.device,
              "--workers", str(r.workers), *quiet]
    _cli("train", "vae", "--config", r.config, "--data", str(phantoms / "datalist.json"), "--out", str(runs / "vae"),
         "--steps", str(r.vae_steps), "--patch", str(min(r.size, 32)), "--batch-size", "2",
         "--perceptual-weight", "0", "--lr", str(r.vae_lr), "--adv-weight", str(r.adv_weight), *common)
    if not (latents / "datalist.json").is_file():
        _cli("prepare", "--input", str(phantoms / "datalist.json"), "--out", str(latents),
             "--vae", str(runs / "vae" / "export"), "--multiple-of", str(r.size))
    _cli("train", "diffusion", "--config", r.config, "--data", str(latents / "datalist.json"),
         "--out", str(runs / "diffusion"), "--steps", str(r.diffusion_steps), "--batch-size", "2", "--lr", "1e-3",
         "--ema-decay", "0.99",  # short runs: a 0.999 average would still hold much of the random start
         *common)
    _cli("train", "controlnet", "--data", str(latents / "datalist.json"), "--unet", str(runs / "diffusion" / "export"),
         "--out", str(runs / "controlnet"), "--steps", str(r.controlnet_steps), "--batch-size", "2", "--lr", "1e-4",
         *common)
    return assemble_model(runs, folder / "model", r)


def assemble_model(runs: Path, model: Path, recipe: DemoRecipe) -> Path:
    """Copy the three exports into one model folder with its generation defaults."""
    model.mkdir(parents=True, exist_ok=True)
    for stage, comp in (("vae", "autoencoder"), ("diffusion", "unet"), ("controlnet", "controlnet")):
        src = runs / stage / "export"
        dst = model / comp
        dst.mkdir(exist_ok=True)
        for name in ("model.safetensors", "config.json"):  # weights first: config.json names their hash
            shutil.copyfile(src / name, dst / name)
    defaults = {"size": [recipe.size] * 3, "spacing": [recipe.spacing] * 3, "body_region": ["chest"],
                "trained_on": f"procedural phantoms ({', '.join(DEMO_REGIONS)}), {recipe.size}^3 at "
                              f"{recipe.spacing:g} mm; demo only, not real CT",
                "recipe": recipe.__dict__}
    atomic_write_text(model / "generation.json", json.dumps(defaults, indent=2) + "\n")
    return model
