"""Train the demo model shipped in maisi/resources/demo_model/ (tiny preset, phantoms) with the project's code.

    PYTHONPATH=src python3 scripts/train_demo_model.py --work /tmp/demo-train [--vae-steps 600 ...]

Runs `maisi phantom`, `maisi train vae`, `maisi prepare`, `maisi train diffusion`, `maisi train controlnet`
(re-running resumes), then copies the three exports and generation.json into the package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from maisi.io.atomic import atomic_write_text
from maisi.pipeline.demo import DemoRecipe, train_demo
from maisi.pipeline.models import demo_model_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="working folder (phantoms, latents, runs)")
    p.add_argument("--phantoms-per-region", type=int, default=6)
    p.add_argument("--tumor-phantoms", type=int, default=0, help="phantoms per tumour kind (maisi.pipeline.demo)")
    p.add_argument("--vae-steps", type=int, default=600, help="VAE steps on 32^3 patches (0: keep --init's)")
    p.add_argument("--vae-whole-steps", type=int, default=0, help="then VAE steps on whole volumes")
    p.add_argument("--vae-decoder-steps", type=int, default=0,
                   help="then the decoder alone on whole volumes (the latents and UNet/ControlNet stay valid)")
    p.add_argument("--bright-weight", type=float, default=0.0, help="extra L1 weight on bone in the decoder steps")
    p.add_argument("--diffusion-steps", type=int, default=1500, help="0: keep --init's UNet")
    p.add_argument("--controlnet-steps", type=int, default=400, help="0: keep --init's ControlNet")
    p.add_argument("--controlnet-lr", type=float, default=1e-4)
    p.add_argument("--init", help="model folder every stage starts from (e.g. a copy of the previous demo model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--no-install", action="store_true", help="leave the package's demo model untouched")
    a = p.parse_args()
    recipe = DemoRecipe(phantoms_per_region=a.phantoms_per_region, tumor_phantoms=a.tumor_phantoms,
                        vae_steps=a.vae_steps, vae_whole_steps=a.vae_whole_steps,
                        vae_decoder_steps=a.vae_decoder_steps, bright_weight=a.bright_weight,
                        diffusion_steps=a.diffusion_steps,
                        controlnet_steps=a.controlnet_steps, controlnet_lr=a.controlnet_lr, init=a.init,
                        device=a.device, workers=a.workers)
    t0 = time.perf_counter()
    model = train_demo(a.work, recipe, log=print)
    previous = Path(a.init or "") / "generation.json"
    if previous.is_file():  # record the whole chain: the recipe of the model this one started from
        gen = json.loads((model / "generation.json").read_text())
        gen["recipe"]["init"] = {"folder": a.init, "recipe": json.loads(previous.read_text()).get("recipe")}
        atomic_write_text(model / "generation.json", json.dumps(gen, indent=2) + "\n")
    print(f"trained {model} in {time.perf_counter() - t0:.0f} s")
    if not a.no_install:
        dst = demo_model_dir()
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(model, dst)
        print(f"installed into {dst}")


if __name__ == "__main__":
    main()
