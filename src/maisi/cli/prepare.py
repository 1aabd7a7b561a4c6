"""`maisi prepare`: CT scans (+ label maps) -> resampled label maps, VAE latents (μ, σ), sidecars, datalist."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="prepare CT scans for diffusion/ControlNet training (latents + sidecars)")
    p.add_argument("--input", required=True,
                   help="folder of NIfTI files / DICOM series folders (labels as <name>_label.nii.gz or in "
                        "labels/), or a datalist JSON")
    p.add_argument("--out", required=True, help="output folder (re-running skips finished cases)")
    p.add_argument("--vae", help="autoencoder weights: a released set (rflow-ct, ...), a maisi checkpoint, model or "
                                 "training run folder, or a released .pt file; without it the resampled images "
                                 "are written instead")
    p.add_argument("--config", "--vae-preset", dest="config",
                   help="preset or config JSON whose autoencoder a bare released .pt file has (default: from its "
                        "name, else rflow-ct); --vae-preset is the old name")
    p.add_argument("--spacing", type=float, nargs="+", help="resample to this voxel size in mm (1 or 3 values), "
                                                           "then pad each axis to --multiple-of")
    p.add_argument("--multiple-of", type=int, default=128,
                   help="without --spacing: resize each axis to the nearest multiple of this (default 128)")
    p.add_argument("--region", help="body region or span (e.g. chest-abdomen) instead of deriving it from labels")
    p.add_argument("--modality", default="ct", help="modality name stored in the sidecars (default ct)")
    p.add_argument("--device", help="device for the VAE (default: cuda when available, else cpu)")
    p.add_argument("--memory-gb", type=float, help="memory budget for the VAE encoder (tensor splitting)")
    p.add_argument("--label-mapping", help="JSON {source name or id: MAISI name or id} for non-MAISI label maps")
    p.add_argument("--label-names", help="JSON {id: class name} of the source label maps (e.g. TotalSegmentator); "
                                         "names are matched to the MAISI vocabulary")
    p.add_argument("--unmapped", choices=["background", "error"], default="background",
                   help="what happens to source labels the mapping does not cover (default: background)")
    p.add_argument("--anatomy-conditions", action="store_true",
                   help="only measure the ten size-controlled structures of the label maps in --input (a datalist "
                        "with 'label' entries, or a folder of label maps) and write <out>/all_anatomy_size_conditions"
                        ".json, the conditions file of the mask generation model (sizes: volume percentiles)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.anatomy_conditions:
        return run_conditions(args)
    from maisi.cli.flags import in_flags
    from maisi.data.labelmap import load_mapping, load_names
    from maisi.data.prepare import LabelIdsWarning, PrepareConfig, plan_cases, prepare_all

    spacing = None
    if args.spacing:
        if len(args.spacing) not in (1, 3):
            raise ValueError(f"--spacing needs 1 or 3 values, got {len(args.spacing)}")
        spacing = tuple(args.spacing * 3 if len(args.spacing) == 1 else args.spacing)
    cfg = PrepareConfig(spacing=spacing, multiple_of=args.multiple_of, region=args.region, modality=args.modality,
                        memory_gb=args.memory_gb, unmapped=args.unmapped)
    mapping = load_mapping(args.label_mapping) if args.label_mapping else None
    names = load_names(args.label_names) if args.label_names else None
    cases = plan_cases(args.input, args.out)  # bad inputs or --out refused before the VAE loads
    encoder, encoder_id, encoder_sha256 = None, None, None
    if args.vae:
        from maisi.device import pick_device
        from maisi.networks.weights import load_component

        device = pick_device(args.device)
        vae = load_component(args.vae, "autoencoder", args.config, device)
        encoder, encoder_id = vae.model, str(Path(vae.source["path"]).resolve())
        encoder_sha256 = vae.source.get("sha256")  # new weights at the same path make the old latents stale
    with warnings.catch_warnings():  # the library warns about foreign-looking label ids: one line each
        warnings.simplefilter("always", LabelIdsWarning)
        warnings.showwarning = lambda message, *_, **__: print(f"maisi prepare: warning: {in_flags(str(message), PHRASES)}",
                                                               file=sys.stderr)
        report = prepare_all(cases, args.out, cfg, encoder, encoder_id, mapping, names, encoder_sha256=encoder_sha256,
                             log=lambda line: print(in_flags(line, PHRASES)))
    print(f"prepared {len(report['done'])}, skipped {len(report['skipped'])} (already done), "
          f"failed {len(report['failed'])}; datalist: {Path(args.out) / 'datalist.json'}")
    for name, err in report["failed"].items():
        print(f"  FAILED {name}: {in_flags(str(err), PHRASES)}")
    return 1 if report["failed"] else 0


def run_conditions(args: argparse.Namespace) -> int:
    from maisi.maskgen.context import CONDITIONS_FILE
    from maisi.maskgen.sizes import compute_conditions, label_files, write_conditions

    files = label_files(args.input)
    path = write_conditions(Path(args.out) / CONDITIONS_FILE, compute_conditions(files))
    print(f"anatomy size conditions of {len(files)} label map(s): {path}")
    return 0


# How the library names PrepareConfig fields -> the flags (maisi.cli.flags); errors and warnings pass through them
PHRASES = {"label_mapping": "--label-mapping", "label_names": "--label-names", "give region": "give --region",
           "memory_gb": "--memory-gb", "output folder (out)": "output folder (--out)"}
