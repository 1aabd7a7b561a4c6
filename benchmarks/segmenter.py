"""How well does the phantom segmenter segment real held-out phantoms? Per-label and grouped Dice at the demo grid.

Trains a phantom segmenter with the given settings (or loads one with --load), segments held-out phantoms
(seeds 90000+, regions head_neck/chest/abdomen/pelvis/chest-abdomen in turn, 64³ at 4 mm, exclusive labels as
`maisi generate` masks have them) and scores it with MONAI's DiceMetric per label, and grouped (the five lung
lobes as one "lung", both kidneys as one "kidney"). Each run is one entry, under --name, in the results file
(an entry of the same name is replaced). Run by hand, one thread, e.g.

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 benchmarks/segmenter.py --name default --save /work/eval/seg.safetensors
    OMP_NUM_THREADS=1 PYTHONPATH=src python3 benchmarks/segmenter.py --name old --load /work/eval/seg32.safetensors
    OMP_NUM_THREADS=1 PYTHONPATH=src python3 benchmarks/segmenter.py --name long --steps 1500 --phantoms 96
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maisi.data.phantom import make_phantom
from maisi.evaluation.metrics import dice_per_label
from maisi.evaluation.segmenter import PhantomSegmenter, load_segmenter, train_phantom_segmenter
from maisi.io.atomic import atomic_write_text
from maisi.labels import label_name

HELDOUT_REGIONS = ("head_neck", "chest", "abdomen", "pelvis", "chest-abdomen")
HELDOUT_SEED = 90000  # training phantoms use seeds from 0 (train_phantom_segmenter's seed..)
GROUPS = {"lung": (28, 29, 30, 31, 32), "kidney": (5, 14)}


def grouped(label: np.ndarray) -> np.ndarray:
    """The label map with each group's ids replaced by the group's first id."""
    out = np.asarray(label).astype(np.int64).copy()
    for ids in GROUPS.values():
        out[np.isin(out, ids)] = ids[0]
    return out


def evaluate(seg: PhantomSegmenter, n: int, size: int, spacing: float) -> dict:
    """Per-label and grouped Dice of `seg` on n held-out phantoms (mean over the volumes that hold a label)."""
    group_name = {ids[0]: name for name, ids in GROUPS.items()}
    group_ids = sorted(set(grouped(np.array(seg.labels)).tolist()))
    per: dict[int, list[float]] = {}
    per_group: dict[int, list[float]] = {}
    for i in range(n):
        p = make_phantom(HELDOUT_REGIONS[i % len(HELDOUT_REGIONS)], size=size, spacing=spacing, seed=HELDOUT_SEED + i)
        pred = seg(torch.from_numpy(p.image), spacing=p.spacing).numpy()
        for k, v in dice_per_label(pred, p.label, [v for v in seg.labels if (p.label == v).any()]).items():
            per.setdefault(k, []).append(v)
        gp, gl = grouped(pred), grouped(p.label)
        for k, v in dice_per_label(gp, gl, [v for v in group_ids if (gl == v).any()]).items():
            per_group.setdefault(k, []).append(v)
    per_label = {label_name(k): round(float(np.mean(v)), 4) for k, v in sorted(per.items())}
    per_grouped = {group_name.get(k, label_name(k)): round(float(np.mean(v)), 4) for k, v in sorted(per_group.items())}
    return {"mean_dice": round(float(np.mean(list(per_label.values()))), 4),
            "grouped_mean_dice": round(float(np.mean(list(per_grouped.values()))), 4),
            "per_label": per_label, "grouped": per_grouped,
            "volumes_per_label": {label_name(k): len(v) for k, v in sorted(per.items())},
            "weakest": sorted(per_label, key=per_label.get)[:4]}


def main() -> None:
    defaults = {k: v.default for k, v in inspect.signature(train_phantom_segmenter).parameters.items()
                if v.default is not inspect.Parameter.empty}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="this run's entry in the results file")
    p.add_argument("--load", help="evaluate this segmenter file instead of training one")
    p.add_argument("--save", type=Path, help="where to keep the trained segmenter (default: a temporary file)")
    p.add_argument("--steps", type=int, default=defaults["steps"])
    p.add_argument("--size", type=int, nargs=3, default=list(defaults["size"]), help="training crop (voxels)")
    p.add_argument("--spacing", type=float, nargs=3, default=list(defaults["spacing"]), help="training spacing (mm)")
    p.add_argument("--phantoms", type=int, default=defaults["n_phantoms"])
    p.add_argument("--batch", type=int, default=defaults["batch"])
    p.add_argument("--lr", type=float, default=defaults["lr"])
    p.add_argument("--context", type=float, default=defaults["context"])
    p.add_argument("--seed", type=int, default=defaults["seed"])
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=defaults["augment"],
                   help="degrade training crops at random (blur, coarser grid, noise, gain, offset)")
    p.add_argument("--channels", type=int, nargs=4, default=list(defaults["channels"]), help="UNet widths")
    p.add_argument("--heldout", type=int, default=20, help="held-out phantoms (regions in turn)")
    p.add_argument("--note", default="", help="what this run tries")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/segmenter.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    if a.load:
        seg = load_segmenter(a.load)
        settings = {"loaded": a.load, **seg.info, "spacing": list(seg.spacing)}
    else:
        save = a.save or Path(tempfile.mkdtemp(prefix="maisi-seg-bench-")) / "seg.safetensors"
        settings = {"steps": a.steps, "size": a.size, "spacing": a.spacing, "n_phantoms": a.phantoms,
                    "batch": a.batch, "lr": a.lr, "context": a.context, "seed": a.seed, "augment": a.augment,
                    "channels": a.channels}
        seg = train_phantom_segmenter(save, a.steps, size=a.size, spacing=a.spacing, n_phantoms=a.phantoms,
                                      batch=a.batch, lr=a.lr, context=a.context, seed=a.seed, augment=a.augment,
                                      channels=a.channels,
                                      log=lambda m: print(m, flush=True))
        settings["saved"] = str(save)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = evaluate(seg, a.heldout, 64, 4.0)
    entry = {"name": a.name, "note": a.note, "settings": settings, "final_loss": seg.info.get("final_loss"),
             "train_s": None if a.load else round(train_s, 1), "eval_s": round(time.perf_counter() - t1, 1),
             "torch_threads": torch.get_num_threads(), **result}
    print(json.dumps({k: entry[k] for k in ("name", "mean_dice", "grouped_mean_dice", "weakest", "train_s")}))
    print(json.dumps(entry["per_label"]), flush=True)
    doc = json.loads(a.out.read_text()) if a.out.is_file() else {}
    doc.update({"heldout": {"regions": list(HELDOUT_REGIONS), "seeds": f"{HELDOUT_SEED}..{HELDOUT_SEED + a.heldout - 1}",
                            "size": [64, 64, 64], "spacing_mm": [4.0, 4.0, 4.0], "exclusive_labels": True},
                "groups": {k: [label_name(i) for i in v] for k, v in GROUPS.items()}})
    doc["runs"] = [r for r in doc.get("runs", []) if r["name"] != a.name] + [entry]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
