"""`maisi demo`: the whole story end to end on phantoms — data, short training, generation, preview."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="phantoms -> short training of all three networks -> generation, in minutes")
    p.add_argument("--out", type=Path, default=Path("maisi-demo"), help="output folder (default ./maisi-demo)")
    p.add_argument("--steps", type=int, default=60,
                   help="diffusion training steps (default 60); the VAE gets half, the ControlNet a third")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from maisi.pipeline.demo import DemoRecipe, train_demo
    from maisi.pipeline.pipeline import Pipeline
    from maisi.pipeline.validation import GenerationRequest

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    t0 = time.perf_counter()
    recipe = DemoRecipe(phantoms_per_region=2, vae_steps=max(1, args.steps // 2), diffusion_steps=args.steps,
                        controlnet_steps=max(1, args.steps // 3), seed=args.seed)
    model = train_demo(args.out, recipe, progress=not args.no_progress, log=lambda m: print(m, flush=True))
    print(f"trained model: {model} ({time.perf_counter() - t0:.0f} s)")
    pipe = Pipeline.from_pretrained(model, device="cpu", progress=not args.no_progress)
    request = GenerationRequest(body_region=("chest",), num_samples=args.num_samples, seed=args.seed)
    for s in pipe.generate(request, out=args.out / "generated"):
        print(f"generated: {s.files['image']}  preview: {s.files['preview']}")
    print(f"demo done in {time.perf_counter() - t0:.0f} s; a demo trained for {args.steps} steps gives blurry "
          "phantom-like images: the shipped model (maisi generate) is trained longer")
    return 0
