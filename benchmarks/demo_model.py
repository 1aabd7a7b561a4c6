"""How good is a demo model? First-attempt quality-check pass rate, mask–image consistency Dice and 2.5D FID.

For each model (e.g. the previous and the new shipped one, in one run): seeds 0..N-1 for every body-region
setting of the built-in mask database, with the quality check's retries off, so that each sample is a first
attempt; then held-out phantom masks (seeds the demo recipe never uses) given as user masks. The generated
images are scored with a phantom segmenter (`maisi evaluate train-segmenter`) against their masks, and by 2.5D
FID (EfficientNet-Lite0) against held-out phantom images. The same segmenter also scores the held-out phantoms
themselves and their round trips through each model's VAE: the two ceilings of the consistency Dice. Run by hand, e.g.

    PYTHONPATH=src python3 benchmarks/demo_model.py --model before=/work/demo2/prev_model --model after=default \
        --segmenter seg64.safetensors --out benchmarks/results/demo_model.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from maisi.data.phantom import make_phantom, write_phantom
from maisi.evaluation.fid import FIDSettings, collect_features, fid_25d
from maisi.evaluation.runs import evaluate_consistency, vae_roundtrip
from maisi.evaluation.segmenter import load_segmenter
from maisi.io.atomic import atomic_write_text
from maisi.io.volume import read_volume, write_volume
from maisi.labels import HU_RANGE, HU_SPAN
from maisi.networks.backbones import load_extractor
from maisi.networks.weights import demo_model_dir, load_component
from maisi.pipeline.pipeline import Pipeline
from maisi.pipeline.validation import GenerationRequest

SETTINGS = ("head_neck", "chest", "abdomen", "pelvis", "head_neck-chest", "chest-abdomen", "abdomen-pelvis")
HELDOUT_REGIONS = ("chest", "abdomen", "pelvis", "head_neck", "chest-abdomen")
HELDOUT_SEED = 90000  # the demo recipe's phantoms use seeds below 2000


def heldout_phantoms(folder: Path, n: int, size: int, spacing: float) -> list[tuple[Path, Path]]:
    """n held-out phantoms (regions in turn), written as image/label pairs."""
    pairs = []
    for i in range(n):
        region = HELDOUT_REGIONS[i % len(HELDOUT_REGIONS)]
        p = make_phantom(region, size=size, spacing=spacing, seed=HELDOUT_SEED + i)
        entry = write_phantom(p, folder, f"heldout_{region}_{i}")
        pairs.append((folder / Path(entry["image"]).name, folder / Path(entry["label"]).name))
    return pairs


def vae_roundtrips(weights: str | None, held: list[tuple[Path, Path]], folder: Path) -> list[tuple[Path, Path]]:
    """Each held-out phantom through the model's VAE alone (encode → mean → decode), written beside its mask.
    The segmenter's Dice on these is the ceiling of any generator decoding through this VAE."""
    vae = load_component(weights if weights is not None else demo_model_dir(), "autoencoder").model
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for image, label in held:
        vol = read_volume(image)
        x = torch.from_numpy((np.clip(vol.array.astype(np.float32), *HU_RANGE) - HU_RANGE[0]) / HU_SPAN)
        recon = vae_roundtrip(vae, x).numpy() * HU_SPAN + HU_RANGE[0]
        target = folder / image.name
        write_volume(target, recon, vol.affine, np.int16)
        pairs.append((target, label))
    return pairs


def run_model(name: str, weights: str | None, seeds: int, masks: list[Path], out: Path) -> dict:
    """Generate (or reuse what an earlier run left in `out/name`) and summarise the first-attempt QC."""
    pipe = Pipeline.from_pretrained(weights, device="cpu", progress=False)
    rows, pairs = [], []
    jobs = [(s, GenerationRequest(body_region=tuple(s.split("-")), num_samples=seeds, quality_retries=0))
            for s in SETTINGS]
    jobs += [(f"heldout:{m.name}", GenerationRequest(mask=str(m), num_samples=max(1, seeds // 10),
                                                     quality_retries=0)) for m in masks]
    for setting, request in jobs:
        folder = out / name / setting.replace(":", "_")
        records = [folder / f"sample_seed{k}_record.json" for k in range(request.num_samples)]
        if not all(r.is_file() for r in records):  # generate, unless an earlier run of this script did
            pipe.generate(request, out=folder)
        for path in records:
            rec = json.loads(path.read_text())
            q = rec["quality"]
            rows.append({"setting": setting, "seed": rec["seed"], "passed": bool(q["passed"]), "failed": q["failed"],
                         "median_hu": {k: v["median_hu"] for k, v in q["organs"].items()}})
            pairs.append((folder / rec["files"]["image"], folder / rec["files"]["label"]))
        print(f"{name} {setting}: {sum(r['passed'] for r in rows if r['setting'] == setting)}/"
              f"{sum(r['setting'] == setting for r in rows)} passed", flush=True)
    per_setting = {}
    for r in rows:
        key = "heldout" if r["setting"].startswith("heldout") else r["setting"]
        d = per_setting.setdefault(key, {"samples": 0, "passed": 0, "failed_groups": {}})
        d["samples"] += 1
        d["passed"] += r["passed"]
        for g in r["failed"]:
            d["failed_groups"][g] = d["failed_groups"].get(g, 0) + 1
    groups: dict[str, list[float]] = {}
    for r in rows:
        for g, v in r["median_hu"].items():
            groups.setdefault(g, []).append(v)
    return {"weights": weights or "shipped demo model", "samples": len(rows),
            "first_attempt_pass_rate": round(sum(r["passed"] for r in rows) / len(rows), 4),
            "per_setting": per_setting,
            "median_hu_by_group": {g: {"min": min(v), "median": float(np.median(v)), "max": max(v)}
                                   for g, v in groups.items()},
            "pairs": pairs, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True,
                   help="NAME=WEIGHTS (a model folder; 'default' = the shipped model); repeat to compare")
    p.add_argument("--seeds", type=int, default=20, help="samples per body-region setting (seeds 0..N-1)")
    p.add_argument("--heldout", type=int, default=10, help="held-out phantoms (user masks, FID reference)")
    p.add_argument("--segmenter", help="phantom segmenter (.safetensors) for the consistency Dice and FID; "
                   "without it, only generate and report the quality check")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, help="folder for the generated volumes (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_model.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    work = a.work or Path(tempfile.mkdtemp(prefix="maisi-demo-bench-"))
    held = heldout_phantoms(work / "heldout", a.heldout, 64, 4.0)
    result = {"settings": list(SETTINGS), "seeds": a.seeds, "heldout_phantoms": a.heldout,
              "heldout_seed": HELDOUT_SEED, "segmenter": a.segmenter, "models": {}}
    if a.segmenter:
        seg = load_segmenter(a.segmenter)
        extractor = load_extractor("efficientnet-lite0")
        fid_settings = FIDSettings()
        real = collect_features([img for img, _ in held], extractor, fid_settings, None)
        result["segmenter_on_real_heldout"] = evaluate_consistency(held, seg)["mean_dice"]
        print(f"segmenter Dice on the real held-out phantoms: {result['segmenter_on_real_heldout']}", flush=True)
    for spec in a.model:
        name, _, weights = spec.partition("=")
        r = run_model(name, None if weights in ("", "default") else weights, a.seeds,
                      [lab for _, lab in held], work)
        pairs = r.pop("pairs")
        result["models"][name] = r
        print(f"{name}: first-attempt QC pass {r['first_attempt_pass_rate']:.3f}", flush=True)
        if a.segmenter:
            cons = evaluate_consistency(pairs, seg)
            r["consistency_dice"] = {"mean": cons["mean_dice"],
                                     "per_label": {v["name"]: v["dice"] for v in cons["labels"].values()}}
            ceiling = evaluate_consistency(vae_roundtrips(None if weights in ("", "default") else weights, held,
                                                          work / name / "vae_roundtrip"), seg)
            r["vae_roundtrip_dice"] = {"mean": ceiling["mean_dice"],
                                       "per_label": {v["name"]: v["dice"] for v in ceiling["labels"].values()}}
            print(f"{name}: Dice on the VAE round trips of the held-out phantoms {ceiling['mean_dice']:.3f}", flush=True)
            fake = collect_features([img for img, _ in pairs], extractor, fid_settings, None)
            r["fid_vs_heldout"] = fid_25d(real, fake)
            print(f"{name}: Dice {cons['mean_dice']:.3f}, FID mean {r['fid_vs_heldout']['mean']:.1f}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
