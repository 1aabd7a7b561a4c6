"""`maisi evaluate`: 2.5D FID, mask–image consistency, VAE reconstruction, diversity and quality reports."""

from __future__ import annotations

import argparse

DATA_HELP = "a folder of NIfTI files (images/labels told apart by _label/_mask/_seg), a datalist .json or one file"


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help=f"report folder (default {default_out})")
    p.add_argument("--key", default=None, help="datalist list to read (default: testing, validation or training)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate generated CT: FID, consistency, reconstruction, diversity, quality")
    s = p.add_subparsers(dest="metric", metavar="METRIC", required=True)

    f = s.add_parser("fid", help="2.5D FID (XY/YZ/ZX slices through a 2D network) between two sets")
    f.add_argument("--real", required=True, help=DATA_HELP)
    f.add_argument("--fake", required=True, help=DATA_HELP)
    f.add_argument("--extractor", default="efficientnet-lite0",
                   help="efficientnet-lite0 (bundled ImageNet weights), radimagenet:PATH (the paper's RadImageNet "
                        "ResNet-50) or torchscript:PATH; FIDs from different extractors are not comparable")
    f.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="resample both sets to this (mm)")
    f.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="then centre pad/crop to this shape")
    f.add_argument("--center-fraction", type=float, default=1.0, help="central share of slices per axis (default 1)")
    f.add_argument("--batch", type=int, default=32, help="slices per forward pass")
    f.add_argument("--cache", default=None, help="feature cache folder (default <out>/feature_cache; 'none' = off)")
    f.add_argument("--device", default="cpu", help="torch device for the 2D network (default cpu)")
    _common(f, "evaluation")

    c = s.add_parser("consistency", help="Dice between conditioning masks and a segmentation of the images")
    c.add_argument("--images", required=True, help=DATA_HELP)
    c.add_argument("--masks", required=True, help=DATA_HELP)
    c.add_argument("--segmenter", required=True,
                   help="a phantom segmenter from `maisi evaluate train-segmenter` or a TorchScript model")
    _common(c, "evaluation")

    t = s.add_parser("train-segmenter", help="train the tiny phantom segmenter used by `evaluate consistency`")
    t.add_argument("--out-path", required=True, help="where to write the segmenter (.safetensors)")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--phantoms", type=int, default=16, help="training phantoms (regions in turn)")
    t.add_argument("--size", type=int, nargs=3, default=[48, 48, 48], help="phantom size (multiples of 16)")
    t.add_argument("--spacing", type=float, nargs=3, default=[4.0, 4.0, 4.0], help="phantom spacing (mm)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")

    r = s.add_parser("reconstruction", help="VAE PSNR / SSIM / MAE (HU) through the memory-aware path")
    r.add_argument("--vae", required=True, help="autoencoder weights: a released set (rflow-ct, ...), a maisi "
                                                "checkpoint, model or training run folder, or a released .pt file")
    r.add_argument("--preset", help="preset whose autoencoder a bare released .pt file has (default: from its name, "
                                    "else rflow-ct)")
    r.add_argument("--data", required=True, help=DATA_HELP)
    r.add_argument("--memory-gb", type=float, default=None, help="memory budget for encode/decode splitting")
    r.add_argument("--device", default="cpu")
    _common(r, "evaluation")

    d = s.add_parser("diversity", help="mean MS-SSIM between pairs of samples (lower = more diverse)")
    d.add_argument("--data", required=True, help=DATA_HELP)
    d.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="centre pad/crop all to this shape")
    d.add_argument("--max-pairs", type=int, default=200)
    _common(d, "evaluation")

    q = s.add_parser("quality", help="per-organ median-HU quality check with a summary")
    q.add_argument("--images", required=True, help=DATA_HELP)
    q.add_argument("--labels", required=True, help=DATA_HELP)
    q.add_argument("--reference-images", help="real images for HU histograms per organ (real vs synthetic)")
    q.add_argument("--reference-labels", help="label maps of the reference images")
    _common(q, "evaluation")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from maisi.evaluation.commands import COMMANDS

    log = None if getattr(args, "quiet", False) else (lambda m: print(m, flush=True))
    return COMMANDS[args.metric](args, log)
