"""The demo recipe: phantoms → VAE → latents → diffusion UNet → ControlNet, with the project's own commands."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from maisi.io.atomic import atomic_write_text

DEMO_REGIONS = ("chest", "abdomen", "pelvis", "head_neck", "chest-abdomen")
# Phantoms with one tumour each (region, tumour), so the ControlNet learns to draw what `--tumor` inpaints.
DEMO_TUMORS = (("abdomen", "hepatic_tumor"), ("abdomen", "pancreatic_tumor"), ("chest", "lung_tumor"),
               ("abdomen", "colon_cancer_primaries"), ("chest", "bone_lesion"))


@dataclass(frozen=True)
class DemoRecipe:
    """How big and how long: the shipped model and `maisi demo` use the same recipe at other lengths."""

    size: int = 64  # phantom edge in voxels
    spacing: float = 4.0  # mm, so the field of view (256 mm) holds a whole body region
    phantoms_per_region: int = 4
    tumor_phantoms: int = 0  # phantoms per DEMO_TUMORS entry
    vae_steps: int = 200  # on 32^3 patches
    vae_whole_steps: int = 0  # then on whole volumes (GroupNorm sees the extent it will decode)
    diffusion_steps: int = 300
    controlnet_steps: int = 100
    controlnet_lr: float = 1e-4
    init: str | None = None  # a model folder (autoencoder/, unet/, controlnet/) every stage starts from
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
        geometry = ["--size", str(r.size), "--spacing", str(r.spacing), "--out", str(phantoms)]
        for i, region in enumerate(DEMO_REGIONS):
            n = r.phantoms_per_region if "-" not in region else max(1, r.phantoms_per_region // 2)
            _cli("phantom", "--region", region, "--num", str(n), "--seed", str(r.seed + 100 * i), *geometry)
        for i, (region, tumor) in enumerate(DEMO_TUMORS):
            if r.tumor_phantoms:
                _cli("phantom", "--region", region, "--tumor", tumor, "--num", str(r.tumor_phantoms),
                     "--seed", str(r.seed + 1000 + 100 * i), *geometry)
    common = ["--no-tensorboard", "--checkpoint-every", "200", "--seed", str(r.seed), "--device", r.device,
              "--workers", str(r.workers), *quiet]
    init = (lambda comp: ["--init", str(Path(r.init) / comp)]) if r.init else (lambda comp: [])
    vae = ["train", "vae", "--data", str(phantoms / "datalist.json"), "--perceptual-weight", "0",
           "--adv-weight", str(r.adv_weight), *common]
    vae_export = runs / "vae" / "export"
    if r.vae_steps:
        _cli(*vae, "--config", r.config, *init("autoencoder"), "--out", str(runs / "vae"), "--steps", str(r.vae_steps),
             "--patch", str(min(r.size, 32)), "--batch-size", "2", "--lr", str(r.vae_lr))
    if r.vae_whole_steps:  # whole volumes at a fifth of the rate; the KL sum grows with the patch, so weigh it less
        first = vae_export if r.vae_steps else Path(r.init or "") / "autoencoder"
        _cli(*vae, "--init", str(first), "--out", str(runs / "vae_whole"), "--steps", str(r.vae_whole_steps),
             "--patch", str(r.size), "--batch-size", "1", "--lr", str(r.vae_lr / 5), "--kl-weight", "4e-9",
             "--lr-power", "1")
        vae_export = runs / "vae_whole" / "export"
    if not (latents / "datalist.json").is_file():
        _cli("prepare", "--input", str(phantoms / "datalist.json"), "--out", str(latents),
             "--vae", str(vae_export), "--multiple-of", str(r.size))
    _cli("train", "diffusion", "--config", r.config, *init("unet"), "--data", str(latents / "datalist.json"),
         "--out", str(runs / "diffusion"), "--steps", str(r.diffusion_steps), "--batch-size", "2", "--lr", "1e-3",
         "--ema-decay", "0.99",  # short runs: a 0.999 average would still hold much of the random start
         *common)
    _cli("train", "controlnet", *init("controlnet"), "--data", str(latents / "datalist.json"),
         "--unet", str(runs / "diffusion" / "export"), "--out", str(runs / "controlnet"),
         "--steps", str(r.controlnet_steps), "--batch-size", "2", "--lr", str(r.controlnet_lr), *common)
    return assemble_model(runs, folder / "model", r, vae_export)


def assemble_model(runs: Path, model: Path, recipe: DemoRecipe, vae_export: Path | None = None) -> Path:
    """Copy the three exports into one model folder with its generation defaults."""
    model.mkdir(parents=True, exist_ok=True)
    exports = {"autoencoder": vae_export or runs / "vae" / "export", "unet": runs / "diffusion" / "export",
               "controlnet": runs / "controlnet" / "export"}
    for comp, src in exports.items():
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
