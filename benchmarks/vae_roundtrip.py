"""What does a VAE lose? Each held-out phantom through the VAE alone (encode → mean → decode), scored per organ.

For each VAE (an autoencoder folder or model folder, as `--weights` takes it), on the demo benchmark's held-out
phantoms (benchmarks/demo_model.py: seeds 90000+, 64³ at 4 mm): the phantom segmenter's Dice on the round trips
(the ceiling of any generator decoding through that VAE), the mean absolute error in HU, and per organ the median
and standard deviation of HU inside the organ's mask, before and after the round trip. Run by hand, one thread:

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 benchmarks/vae_roundtrip.py --vae v3=default \
        --vae wide=/work/exp/s27/wide_whole/export --segmenter seg.safetensors
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from demo_model import heldout_phantoms, vae_roundtrips

from maisi.evaluation.runs import evaluate_consistency
from maisi.evaluation.segmenter import load_segmenter
from maisi.io.atomic import atomic_write_text
from maisi.io.volume import read_volume
from maisi.labels import label_name

ORGANS = (1, 3, 4, 5, 6, 12, 14, 115)  # liver, spleen, pancreas, kidneys, aorta, stomach, heart


def organ_hu(image: Path, label: Path) -> dict[str, dict[str, float]]:
    """Median and standard deviation of HU inside each organ of ORGANS that the mask holds."""
    hu, lab = read_volume(image).array.astype(np.float32), read_volume(label).array.astype(np.int64)
    return {label_name(k): {"median": round(float(np.median(hu[lab == k])), 1), "std": round(float(hu[lab == k].std()), 1)}
            for k in ORGANS if (lab == k).any()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", action="append", required=True, help="NAME=WEIGHTS ('default': the shipped model); repeat")
    p.add_argument("--segmenter", required=True, help="phantom segmenter (.safetensors)")
    p.add_argument("--heldout", type=int, default=10)
    p.add_argument("--work", type=Path, help="folder for the phantoms and round trips (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/vae_roundtrip.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    work = a.work or Path(tempfile.mkdtemp(prefix="maisi-vae-roundtrip-"))
    held = heldout_phantoms(work / "heldout", a.heldout, 64, 4.0)
    seg = load_segmenter(a.segmenter)
    result = {"heldout_phantoms": a.heldout, "segmenter": a.segmenter,
              "real": {"dice": evaluate_consistency(held, seg)["mean_dice"],
                       "organ_hu": {img.name: organ_hu(img, lab) for img, lab in held}},
              "vaes": {}}
    for spec in a.vae:
        name, _, weights = spec.partition("=")
        trips = vae_roundtrips(None if weights in ("", "default") else weights, held, work / name)
        cons = evaluate_consistency(trips, seg)
        mae = [float(np.abs(read_volume(r).array.astype(np.float32) - read_volume(h).array.astype(np.float32)).mean())
               for (r, _), (h, _) in zip(trips, held)]
        result["vaes"][name] = {"weights": weights, "dice": cons["mean_dice"], "mae_hu": round(float(np.mean(mae)), 1),
                                "per_label": {v["name"]: v["dice"] for v in cons["labels"].values()},
                                "organ_hu": {img.name: organ_hu(img, lab) for img, lab in trips}}
        print(f"{name}: round-trip Dice {cons['mean_dice']:.3f}, MAE {np.mean(mae):.1f} HU", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
