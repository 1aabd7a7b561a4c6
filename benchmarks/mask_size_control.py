"""Does the mask generation model follow the sizes it is asked for? Spearman ρ, components and sides.

For one structure at a time (the liver, then a tumour), N samples ask for sizes spread evenly over (0, 1), each
with its own seed; the request is completed from the model's conditions file like `maisi generate --anatomy-size`
does, the map is generated, post-processed, and the structure's volume measured. Printed and written as JSON:
Spearman's ρ between requested size and measured volume, the connected components per organ before and after
post-processing, and whether paired organs lie on the correct side (RAS+: +x points to the patient's right, so
the liver, the right kidney and the right lung lobes have a larger x than the spleen, the left kidney and the left
lobes; the phantoms the model learns from follow this).
Also a PNG montage of the maps for three requested liver sizes. Run by hand, e.g.

    OMP_NUM_THREADS=2 PYTHONPATH=src python3 benchmarks/mask_size_control.py \
        --out benchmarks/results/mask_size_control.json --montage docs/mask_size_control.png
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage, stats

from maisi.data.preview import label_colours
from maisi.io.atomic import atomic_write, atomic_write_text
from maisi.maskgen import generate_mask, load_mask_model, postprocess_mask
from maisi.maskgen.checks import organ_components, sides
from maisi.maskgen.context import complete_context, load_condition_table, target_tumor
from maisi.maskgen.sizes import STRUCTURE_IDS
from maisi.networks.weights import resolve


def run_structure(model, name: str, table: np.ndarray, n: int, seed0: int, steps: int | None, sampler: str | None,
                  guidance: float | None = None) -> dict:
    spacing = (model.config.spacing_mm,) * 3
    voxel_ml = float(np.prod(spacing)) / 1000.0
    affine = np.diag([*spacing, 1.0])
    requested = np.linspace(0.5 / n, 1 - 0.5 / n, n)
    rows = []
    for k, r in enumerate(requested):
        request = {name: float(r)}
        context = complete_context(request, table)
        t0 = time.perf_counter()
        raw = generate_mask(model.autoencoder, model.unet, context, model.config, seed=seed0 + k,
                            scale_factor=model.scale_factor, steps=steps, sampler=sampler,
                            guidance=guidance)[0, 0].numpy().astype(np.uint8)
        post = postprocess_mask(raw, target_tumor(context, request))
        volume = float((post == STRUCTURE_IDS[name]).sum() * voxel_ml)
        rows.append({"requested": round(float(r), 4), "seed": seed0 + k, "context": [round(v, 4) for v in context],
                     "volume_ml": round(volume, 2), "seconds": round(time.perf_counter() - t0, 2),
                     "components_raw": organ_components(raw), "components": organ_components(post), "sides": sides(post, affine)})
        print(f"{name} {r:.3f} seed {seed0 + k}: {volume:8.1f} mL", flush=True)
    rho, p = stats.spearmanr([x["requested"] for x in rows], [x["volume_ml"] for x in rows])
    comps = [c for x in rows for c in x["components"].values()]
    raw_comps = [c for x in rows for c in x["components_raw"].values()]
    side = [v for x in rows for v in x["sides"].values()]
    return {"structure": name, "samples": n, "spearman_rho": round(float(rho), 4), "p_value": float(p),
            "organs_with_one_component": f"{sum(c == 1 for c in comps)}/{len(comps)}",
            "organs_with_one_component_before_postprocessing": f"{sum(c == 1 for c in raw_comps)}/{len(raw_comps)}",
            "pairs_on_the_correct_side": f"{sum(side)}/{len(side)}", "rows": rows}


def montage(maps: dict[float, np.ndarray], spacing: float, path: Path) -> None:
    """Coronal and axial planes through each map's liver centroid, side by side (patient's right on the image's
    left, as radiologists view), labels coloured, each pair captioned with the requested size and the volume."""
    colours = label_colours()
    tiles = []
    for r, lab in sorted(maps.items()):
        c = [int(v) for v in ndimage.center_of_mass(lab == 1)] if (lab == 1).any() else [s // 2 for s in lab.shape]
        coronal = lab[::-1, c[1], ::-1].T  # as maisi's previews: patient's right on the left, superior up
        axial = lab[::-1, ::-1, c[2]].T  # anterior up
        pair = np.concatenate([coronal, np.zeros((coronal.shape[0], 2), np.uint8), axial], axis=1)
        tile = Image.fromarray(np.kron(colours[pair], np.ones((4, 4, 1), np.uint8)))  # 4× nearest upscaling
        captioned = Image.new("RGB", (tile.width, tile.height + 18), "white")
        captioned.paste(tile, (0, 18))
        ml = float((lab == 1).sum()) * spacing ** 3 / 1000
        ImageDraw.Draw(captioned).text((4, 3), f"liver size {r:.1f}: {ml:.0f} mL", fill="black")
        tiles.append(captioned)
    out = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), tiles[0].height), "white")
    x = 0
    for tile in tiles:
        out.paste(tile, (x, 0))
        x += tile.width + 8
    atomic_write(path, lambda tmp: out.save(tmp, format="PNG"), ".png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="a weights spec holding a mask model (default: the demo model)")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--tumor", default="hepatic tumor")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    ap.add_argument("--sampler", choices=("ddpm", "ddim", "rflow"), default=None, help="sampler (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance on the sizes (default: the model's)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mask_size_control.json"))
    ap.add_argument("--montage", type=Path, default=None, help="PNG of the maps for liver sizes 0.1, 0.5, 0.9")
    a = ap.parse_args()
    model = load_mask_model(resolve(a.weights))
    if model is None:
        raise SystemExit(f"{a.weights or 'the demo model'} holds no mask generation model")
    table, _ = load_condition_table(model.conditions)
    t0 = time.perf_counter()
    result = {"weights": a.weights or "demo model", "mask_model": model.sources, "config": model.config.name,
              "sampler": a.sampler or model.config.scheduler.kind,
              "steps": a.steps or model.config.scheduler.num_inference_steps,
              "guidance": model.config.guidance_scale if a.guidance is None else a.guidance,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "structures": [run_structure(model, "liver", table, a.samples, 0, a.steps, a.sampler, a.guidance),
                             run_structure(model, a.tumor, table, a.samples, 1000, a.steps, a.sampler, a.guidance)]}
    if a.montage:
        maps: dict[float, np.ndarray] = {}
        for k, r in enumerate((0.1, 0.5, 0.9)):
            context = complete_context({"liver": r}, table)
            raw = generate_mask(model.autoencoder, model.unet, context, model.config, seed=2000 + k,
                                scale_factor=model.scale_factor, steps=a.steps, sampler=a.sampler,
                                guidance=a.guidance)[0, 0].numpy().astype(np.uint8)
            maps[r] = postprocess_mask(raw, target_tumor(context, {"liver": r}))
        montage(maps, model.config.spacing_mm, a.montage)
        result["montage"] = {"file": str(a.montage), "liver_sizes": [0.1, 0.5, 0.9], "seeds": [2000, 2001, 2002],
                             "liver_volume_ml": [round(float((m == 1).sum()) * model.config.spacing_mm ** 3 / 1000, 1)
                                                 for _, m in sorted(maps.items())]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    for s in result["structures"]:
        print(f"{s['structure']}: Spearman rho {s['spearman_rho']} (p {s['p_value']:.2g}); one component "
              f"{s['organs_with_one_component']} (raw {s['organs_with_one_component_before_postprocessing']}); "
              f"correct side {s['pairs_on_the_correct_side']}")
    atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
