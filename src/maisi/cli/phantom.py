"""`maisi phantom`: write procedural CT phantoms (NIfTI image + MAISI label map) and a datalist."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PHRASES = {"tumor_radius_mm": "--tumor-radius", "organ_scale": "--organ-scale"}  # the library's words -> the flag (maisi.cli.flags)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write synthetic CT phantoms with MAISI label maps and a datalist")
    p.add_argument("--region", default="chest",
                   help="head_neck, chest, abdomen, pelvis or a span such as chest-abdomen (default chest)")
    p.add_argument("--size", type=int, nargs="+", default=[128, 128, 128], help="voxels per axis (1 or 3 values)")
    p.add_argument("--spacing", type=float, nargs="+", default=[1.5], help="voxel size in mm (1 or 3 values)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first phantom; phantom k uses seed+k")
    p.add_argument("--num", type=int, default=1, help="number of phantoms")
    p.add_argument("--tumor", nargs="*", default=[], metavar="NAME",
                   help="tumours to add: lung_tumor, hepatic_tumor, pancreatic_tumor, bone_lesion, "
                        "colon_cancer_primaries")
    p.add_argument("--tumor-radius", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="draw each tumour's radius from MIN..MAX mm instead of its type's own range "
                        "(still capped by the host organ's depth)")
    p.add_argument("--organ-scale", nargs="+", default=[], metavar="ORGAN=MIN:MAX",
                   help="scale each named organ's radii by a factor drawn from MIN..MAX (0.5..2), e.g. liver=0.75:1.3; "
                        "organs: liver, spleen, pancreas, right_kidney, left_kidney, gallbladder, stomach, bladder, colon")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preview", action="store_true", help="also write <name>_preview.png (mid-planes, labels)")
    p.add_argument("--window", type=float, nargs=2, default=[-400.0, 600.0], metavar=("LO", "HI"),
                   help="HU window of the preview (default -400 600)")
    p.add_argument("--no-noise", action="store_true", help="leave out the scanner noise")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from maisi.data.phantom import make_phantom, write_datalist, write_phantom
    from maisi.data.preview import save_preview
    from maisi.io.atomic import OutputLocationError, check_output_dir

    if args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    organ_scale = parse_organ_scale(args.organ_scale)
    out = Path(args.out)
    try:
        check_output_dir(out)  # a file, a folder under a file, or one that cannot be written: before any phantom
    except OutputLocationError as e:
        raise ValueError(str(e).replace("output folder", "output folder (--out)", 1)) from None
    datalist = out / "datalist.json"
    entries: dict[str, dict] = {}
    if datalist.exists():  # keep the entries of earlier runs into the same folder
        try:
            entries = {e["image"]: e for e in json.loads(datalist.read_text()).get("training", [])}
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{datalist} exists but is not a datalist ({e}); remove it or pick another --out") from e
    for k in range(args.num):
        seed = args.seed + k
        ph = make_phantom(args.region, args.size, args.spacing, seed=seed, tumors=args.tumor, noise=not args.no_noise,
                          tumor_radius_mm=tuple(args.tumor_radius) if args.tumor_radius else None,
                          organ_scale=organ_scale)
        name = f"phantom_{ph.region.replace('-', '_')}_s{seed:04d}"
        entry = write_phantom(ph, out, name)
        entries[entry["image"]] = entry
        if args.preview:
            save_preview(out / f"{name}_preview.png", ph.image, ph.label, ph.spacing, window=tuple(args.window),
                         with_plain=True)
        print(f"{out / entry['image']}: {ph.region}, {list(ph.image.shape)} voxels at {list(ph.spacing)} mm, "
              f"{len(set(ph.label.ravel().tolist())) - 1} labels")
    write_datalist(datalist, list(entries.values()))
    print(f"datalist: {datalist} ({len(entries)} cases)")
    return 0


def parse_organ_scale(items: list[str]) -> dict[str, tuple[float, float]]:
    """["liver=0.75:1.3", ...] -> {"liver": (0.75, 1.3)}; the library checks names and ranges."""
    out = {}
    for item in items:
        name, _, span = item.partition("=")
        lo, _, hi = span.partition(":")
        try:
            out[name.strip()] = (float(lo), float(hi or lo))
        except ValueError:
            raise ValueError(f"--organ-scale {item!r}: write ORGAN=MIN:MAX, e.g. liver=0.75:1.3") from None
    return out
