"""Train the mask generation model shipped beside the demo model (mask-tiny preset, phantoms) with the project's code.

    PYTHONPATH=src python3 scripts/train_demo_mask_model.py --work /tmp/mask-train [--steps 2000 --unet-steps 4000]

Writes chest-abdomen phantoms at the mask-tiny grid (64³ at 6 mm): `--tumor-phantoms` with a hepatic tumour of
random size and `--plain-phantoms` without, so liver and tumour sizes both vary. Trains `maisi train mask` on their
label maps (re-running resumes; a finished run is not trained again), then copies the two exports into the
package's demo model as mask_autoencoder/ and mask_unet/ (with the training maps' conditions file, its label paths
reduced to file names) and records the recipe under "mask_model" in generation.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from maisi.data.phantom import make_phantom, write_phantom
from maisi.io.atomic import atomic_write_text
from maisi.maskgen.context import CONDITIONS_FILE
from maisi.networks.weights import EXPORT_DIR, demo_model_dir
from maisi.training.mask import MaskTrainOptions, run_mask_training

REGION, SIZE, SPACING = "chest-abdomen", 64, 6.0
TUMOR_SEED, PLAIN_SEED = 1000, 3000  # phantom k of each set uses seed + k
# Hepatic tumours of 20-45 mm radius (the phantom default is 8-20 mm): at 6 mm a 4x-compressing autoencoder
# (24 mm per latent voxel) dropped every tumour of the default range, 1.3-3.3 voxels in radius.
TUMOR_RADIUS_MM = (20.0, 45.0)
# Liver radii times 0.75-1.3 (about 950-2900 mL): the default phantom liver varies by 13 % (1788-3117 mL), too
# little for the UNet to learn that the liver slot of the context sets it.
LIVER_SCALE = (0.75, 1.3)


def write_phantoms(folder: Path, tumors: int, plain: int, radius: tuple[float, float],
                   liver_scale: tuple[float, float] | None) -> Path:
    """The training label maps (and images) and one datalist of both sets; kept when already written."""
    datalist = folder / "datalist.json"
    if datalist.is_file():
        return datalist
    entries = []
    for sub, n, seed, kinds in (("tum", tumors, TUMOR_SEED, ("hepatic_tumor",)), ("plain", plain, PLAIN_SEED, ())):
        for k in range(n):
            p = make_phantom(REGION, size=SIZE, spacing=SPACING, seed=seed + k, tumors=kinds, noise=False,
                             tumor_radius_mm=radius, organ_scale={"liver": liver_scale} if liver_scale else None)
            e = write_phantom(p, folder / sub, f"phantom_{REGION.replace('-', '_')}_s{seed + k}")
            entries.append({**e, "image": f"{sub}/{Path(e['image']).name}", "label": f"{sub}/{Path(e['label']).name}"})
    atomic_write_text(datalist, json.dumps({"training": entries}, indent=1) + "\n")
    return datalist


def install(run: Path, recipe: dict, guidance: float) -> Path:
    """Both exports into the package's demo model, the UNet's config with its guidance scale; the conditions file
    without the training machine's paths."""
    dst = demo_model_dir()
    for phase in ("mask_autoencoder", "mask_unet"):
        target = dst / phase
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(run / phase / EXPORT_DIR, target)
    unet_config = dst / "mask_unet" / "config.json"
    meta = json.loads(unet_config.read_text())
    meta["config"]["guidance_scale"] = guidance
    atomic_write_text(unet_config, json.dumps(meta, indent=2) + "\n")
    conditions = dst / "mask_unet" / CONDITIONS_FILE
    entries = json.loads(conditions.read_text())
    for e in entries:
        if "label" in e:
            e["label"] = Path(e["label"]).name
    atomic_write_text(conditions, json.dumps(entries, indent=1) + "\n")
    generation = dst / "generation.json"
    gen = json.loads(generation.read_text())
    gen["mask_model"] = recipe
    atomic_write_text(generation, json.dumps(gen, indent=2) + "\n")
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="working folder (maskdata/, maskrun/)")
    p.add_argument("--tumor-phantoms", type=int, default=120)
    p.add_argument("--plain-phantoms", type=int, default=60)
    p.add_argument("--tumor-radius", type=float, nargs=2, default=TUMOR_RADIUS_MM, metavar=("MIN", "MAX"),
                   help="hepatic tumour radius range in mm (default %(default)s)")
    p.add_argument("--liver-scale", type=float, nargs=2, default=LIVER_SCALE, metavar=("MIN", "MAX"),
                   help="factor range on the phantom liver's radii (default %(default)s; 1 1 for the default liver)")
    p.add_argument("--steps", type=int, default=2000, help="mask autoencoder steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dice-weight", type=float, default=1.0,
                   help="soft-Dice weight of the autoencoder (with 0, the first run drew no hepatic tumour)")
    p.add_argument("--class-balance", type=float, default=0.5,
                   help="autoencoder cross-entropy weight per class ∝ voxel share^-P (Dice alone did not bring the "
                        "tumours back)")
    p.add_argument("--init", help="a mask model (run folder) to start from: its autoencoder, and its UNet when it has "
                                  "mask-tiny's architecture")
    p.add_argument("--context-dropout", type=float, default=0.15,
                   help="P(the UNet trains on the all-don't-care context), for guidance on the sizes")
    p.add_argument("--tumor-weight", type=float, default=1.0,
                   help="UNet loss weight over the tumours' latent voxels (10 and 100 drew tumours 3-4x too large)")
    p.add_argument("--guidance", type=float, default=4.0, help="the guidance scale the installed model samples with")
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=1, help="maps per autoencoder step")
    p.add_argument("--unet-batch-size", type=int, default=4,
                   help="latents per UNet step (a 16^3 latent batch of 4 costs 1.2x a batch of 1 on the CPU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-install", action="store_true", help="leave the package's demo model untouched")
    a = p.parse_args()
    t0 = time.perf_counter()
    datalist = write_phantoms(a.work / "maskdata", a.tumor_phantoms, a.plain_phantoms,
                              tuple(a.tumor_radius), tuple(a.liver_scale))
    options = MaskTrainOptions(data=datalist, out=a.work / "maskrun", config="mask-tiny", steps=a.steps, lr=a.lr,
                               dice_weight=a.dice_weight, class_balance=a.class_balance, init=a.init,
                               context_dropout=a.context_dropout, batch_size=a.batch_size,
                               unet_batch_size=a.unet_batch_size,
                               tumor_weight=a.tumor_weight,
                               unet_steps=a.unet_steps, unet_lr=a.unet_lr,
                               ema_decay=0.999, threads=a.threads, device=a.device, log_every=50,
                               checkpoint_every=200, progress=False)
    run_mask_training(options, log=print)
    print(f"trained {a.work / 'maskrun'} in {time.perf_counter() - t0:.0f} s")
    recipe = {"script": "scripts/train_demo_mask_model.py", "config": "mask-tiny",
              "data": f"{a.tumor_phantoms} {REGION} phantoms with a hepatic tumour of "
                      f"{a.tumor_radius[0]:g}-{a.tumor_radius[1]:g} mm radius (seeds {TUMOR_SEED}..) and "
                      f"{a.plain_phantoms} without (seeds {PLAIN_SEED}..), all with the liver's radii times "
                      f"{a.liver_scale[0]:g}-{a.liver_scale[1]:g}, {SIZE}^3 at {SPACING:g} mm, no noise",
              "steps": a.steps, "lr": a.lr, "dice_weight": a.dice_weight,
              "class_balance": a.class_balance, "init": a.init, "unet_steps": a.unet_steps, "context_dropout": a.context_dropout, "tumor_weight": a.tumor_weight, "guidance_scale": a.guidance,
              "unet_lr": a.unet_lr, "batch_size": a.batch_size,
              "unet_batch_size": a.unet_batch_size, "ema_decay": 0.999, "device": a.device}
    if not a.no_install:
        print(f"installed into {install(a.work / 'maskrun', recipe, a.guidance)}")


if __name__ == "__main__":
    main()
