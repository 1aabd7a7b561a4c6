"""The demo recipe: phantoms → VAE → latents → diffusion UNet → ControlNet, with the project's own library."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maisi.data.phantom import make_phantom, write_datalist, write_phantom
from maisi.data.prepare import PrepareConfig, plan_cases, prepare_all
from maisi.io.atomic import atomic_write_text
from maisi.networks.weights import load_component
from maisi.training.options import ControlNetTrainOptions, DiffusionTrainOptions, VAETrainOptions
from maisi.training.run import run_stage

Log = Callable[[str], None] | None

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
    vae_decoder_steps: int = 0  # then the decoder alone on whole volumes (the latent space stays as it was)
    bright_weight: float = 0.0  # extra L1 weight on bone (> 200 HU) in the decoder-only steps
    diffusion_steps: int = 300  # 0: keep init's UNet (needs init)
    controlnet_steps: int = 100  # 0: keep init's ControlNet (needs init)
    controlnet_lr: float = 1e-4
    init: str | None = None  # a model folder (autoencoder/, unet/, controlnet/) every stage starts from
    config: str = "tiny"
    seed: int = 0
    vae_lr: float = 1e-3  # short CPU runs: a high rate and no adversarial term (blurrier, 5x cheaper)
    adv_weight: float = 0.0
    device: str = "cpu"
    workers: int = 0  # data-loading processes per training run


    def __post_init__(self) -> None:
        for name in ("vae_steps", "vae_whole_steps", "vae_decoder_steps", "diffusion_steps", "controlnet_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        kept = [n for n in ("diffusion_steps", "controlnet_steps") if getattr(self, n) == 0]
        if kept and not self.init:
            raise ValueError(f"{' and '.join(kept)} = 0 keeps init's network, but no init model folder is given")
        if not (self.vae_steps or self.vae_whole_steps) and not self.init:
            raise ValueError("vae_steps and vae_whole_steps are 0 and no init model folder gives an autoencoder")


def _say(log: Log, msg: str) -> None:
    if log:
        log(msg)


def write_demo_phantoms(out: Path, recipe: DemoRecipe, log: Log = None) -> Path:
    """The demo's phantoms (DEMO_REGIONS, then DEMO_TUMORS) and their datalist in `out`; returns the datalist."""
    r = recipe
    jobs = [(region, (), r.phantoms_per_region if "-" not in region else max(1, r.phantoms_per_region // 2),
             r.seed + 100 * i) for i, region in enumerate(DEMO_REGIONS)]
    if r.tumor_phantoms:
        jobs += [(region, (tumor,), r.tumor_phantoms, r.seed + 1000 + 100 * i)
                 for i, (region, tumor) in enumerate(DEMO_TUMORS)]
    entries: dict[str, dict] = {}
    for region, tumors, n, first_seed in jobs:
        for seed in range(first_seed, first_seed + n):
            ph = make_phantom(region, r.size, r.spacing, seed=seed, tumors=tumors)
            entry = write_phantom(ph, out, f"phantom_{ph.region.replace('-', '_')}_s{seed:04d}")
            entries[entry["image"]] = entry
            _say(log, f"{out / entry['image']}: {ph.region}, {list(ph.image.shape)} voxels at {list(ph.spacing)} mm, "
                      f"{len(set(ph.label.ravel().tolist())) - 1} labels")
    datalist = write_datalist(out / "datalist.json", list(entries.values()))
    _say(log, f"datalist: {datalist} ({len(entries)} cases)")
    return datalist


def encode_latents(datalist: Path, out: Path, vae: Path, multiple_of: int, log: Log = None) -> Path:
    """The VAE latents of the datalist's cases (`maisi prepare` without resampling); returns their datalist."""
    cases = plan_cases(datalist, out)  # bad inputs or folder refused before the VAE loads
    device = "cuda" if torch.cuda.is_available() else "cpu"  # as `maisi prepare` without --device
    encoder = load_component(vae, "autoencoder", None, device)
    report = prepare_all(cases, out, PrepareConfig(multiple_of=multiple_of), encoder.model,
                         str(Path(encoder.source["path"]).resolve()), log=log or (lambda _: None))
    _say(log, f"prepared {len(report['done'])}, skipped {len(report['skipped'])} (already done), "
              f"failed {len(report['failed'])}; datalist: {out / 'datalist.json'}")
    if report["failed"]:
        raise RuntimeError(f"preparing the demo latents failed: {report['failed']}")
    return out / "datalist.json"


def train_demo(folder: str | Path, recipe: DemoRecipe = DemoRecipe(), progress: bool = True,
               log: Log = None) -> Path:
    """Run the whole training story into `folder` and assemble a model folder `folder/model`
    (autoencoder/, unet/, controlnet/, generation.json); re-running resumes every stage. `progress`: progress
    bars of the training stages; `log`: one line per phantom and prepared case."""
    folder = Path(folder)
    r = recipe
    phantoms, latents, runs = folder / "phantoms", folder / "latents", folder / "runs"
    if not (phantoms / "datalist.json").is_file():
        write_demo_phantoms(phantoms, r, log)
    common: dict[str, Any] = dict(tensorboard=False, checkpoint_every=200, seed=r.seed, device=r.device,
                                  workers=r.workers, progress=progress)
    init = (lambda comp: str(Path(r.init) / comp)) if r.init else (lambda comp: None)
    vae: dict[str, Any] = dict(data=phantoms / "datalist.json", perceptual_weight=0, adv_weight=r.adv_weight, **common)
    vae_export = runs / "vae" / "export"
    if r.vae_steps:
        run_stage(VAETrainOptions(**vae, config=r.config, init=init("autoencoder"), out=runs / "vae",
                                  steps=r.vae_steps, patch=(min(r.size, 32),), batch_size=2, lr=r.vae_lr))
    if r.vae_whole_steps:  # whole volumes at a fifth of the rate; the KL sum grows with the patch, so weigh it less
        first = vae_export if r.vae_steps else Path(r.init or "") / "autoencoder"
        run_stage(VAETrainOptions(**vae, init=str(first), out=runs / "vae_whole", steps=r.vae_whole_steps,
                                  patch=(r.size,), batch_size=1, lr=r.vae_lr / 5, kl_weight=4e-9, lr_power=1.0))
        vae_export = runs / "vae_whole" / "export"
    if not (r.vae_steps or r.vae_whole_steps):
        vae_export = Path(init("autoencoder"))
    if r.vae_decoder_steps:  # the encoder is frozen, so the latents below and init's UNet/ControlNet stay valid
        run_stage(VAETrainOptions(**vae, init=str(vae_export), out=runs / "vae_decoder", steps=r.vae_decoder_steps,
                                  patch=(r.size,), batch_size=1, lr=r.vae_lr / 5, lr_power=1.0, freeze_encoder=True,
                                  bright_weight=r.bright_weight))
        vae_export = runs / "vae_decoder" / "export"
    unet = Path(init("unet")) if r.diffusion_steps == 0 else runs / "diffusion" / "export"
    controlnet = Path(init("controlnet")) if r.controlnet_steps == 0 else runs / "controlnet" / "export"
    if (r.diffusion_steps or r.controlnet_steps) and not (latents / "datalist.json").is_file():
        encode_latents(phantoms / "datalist.json", latents, vae_export, r.size, log)
    if r.diffusion_steps:
        run_stage(DiffusionTrainOptions(config=r.config, init=init("unet"), data=latents / "datalist.json",
                                        out=runs / "diffusion", steps=r.diffusion_steps, batch_size=2, lr=1e-3,
                                        ema_decay=0.99,  # short runs: a 0.999 average would still hold the start
                                        **common))
    if r.controlnet_steps:
        run_stage(ControlNetTrainOptions(init=init("controlnet"), data=latents / "datalist.json", unet=str(unet),
                                         out=runs / "controlnet", steps=r.controlnet_steps, batch_size=2,
                                         lr=r.controlnet_lr, **common))
    return assemble_model(folder / "model", r, {"autoencoder": vae_export, "unet": unet, "controlnet": controlnet})


def assemble_model(model: Path, recipe: DemoRecipe, exports: dict[str, Path]) -> Path:
    """Copy the three exports (component → folder) into one model folder with its generation defaults."""
    model.mkdir(parents=True, exist_ok=True)
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
