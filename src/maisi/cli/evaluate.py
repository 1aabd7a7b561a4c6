"""`maisi evaluate`: 2.5D FID, mask–image consistency, VAE reconstruction, diversity and quality reports."""

from __future__ import annotations

import argparse
from typing import Any

DATA_HELP = "a folder of NIfTI files (images/labels told apart by _label/_mask/_seg), a datalist .json or one file"


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help=f"report folder (default {default_out})")
    p.add_argument("--key", default=None, help="datalist list to read (default: testing, validation or training)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def flag(field: str) -> str:
    """The flag of an option field: every field of the evaluation options is its flag's dest (out_path: --out-path)."""
    return "--" + field.replace("_", "-")


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
    t.add_argument("--steps", type=int, default=1000, help="Adam steps of 2 crops (default 1000: ~20 min on 1 core)")
    t.add_argument("--phantoms", type=int, default=96, help="training phantoms (regions and spans in turn)")
    t.add_argument("--size", type=int, nargs=3, default=[48, 48, 48], help="training crop (multiples of 16)")
    t.add_argument("--spacing", type=float, nargs=3, default=[4.0, 4.0, 4.0], help="phantom spacing (mm)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")

    r = s.add_parser("reconstruction", help="VAE PSNR / SSIM / MAE (HU) through the memory-aware path")
    r.add_argument("--vae", required=True, help="autoencoder weights: a released set (rflow-ct, ...), a maisi "
                                                "checkpoint, model or training run folder, or a released .pt file")
    r.add_argument("--config", "--preset", dest="config",
                   help="preset or config JSON whose autoencoder a bare released .pt file has (default: from its name, "
                        "else rflow-ct); --preset is the old name")
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


def _triple(values: list | None) -> tuple | None:
    return tuple(values) if values else None


def options_from_args(args: argparse.Namespace) -> Any:
    """The typed options of `args.metric`: each field from the flag of its name; --cache none → cache=False."""
    from maisi.evaluation.fid import FIDSettings
    from maisi.evaluation.options import (
        ConsistencyOptions,
        DiversityOptions,
        FIDOptions,
        QualityOptions,
        ReconstructionOptions,
        SegmenterOptions,
    )

    a = args
    if a.metric == "fid":
        cache = True if not a.cache else False if a.cache.lower() == "none" else a.cache
        settings = FIDSettings(spacing=_triple(a.spacing), size=_triple(a.size), center_fraction=a.center_fraction,
                               batch=a.batch)
        return FIDOptions(real=a.real, fake=a.fake, out=a.out, extractor=a.extractor, settings=settings, cache=cache,
                          device=a.device, key=a.key)
    if a.metric == "consistency":
        return ConsistencyOptions(images=a.images, masks=a.masks, segmenter=a.segmenter, out=a.out, key=a.key)
    if a.metric == "reconstruction":
        return ReconstructionOptions(vae=a.vae, data=a.data, preset=a.config, memory_gb=a.memory_gb, device=a.device,
                                     out=a.out, key=a.key)
    if a.metric == "diversity":
        return DiversityOptions(data=a.data, size=_triple(a.size), max_pairs=a.max_pairs, out=a.out, key=a.key)
    if a.metric == "quality":
        return QualityOptions(images=a.images, labels=a.labels, reference_images=a.reference_images,
                              reference_labels=a.reference_labels, out=a.out, key=a.key)
    return SegmenterOptions(out_path=a.out_path, steps=a.steps, phantoms=a.phantoms, size=tuple(a.size),
                            spacing=tuple(a.spacing), seed=a.seed, device=a.device)


def run(args: argparse.Namespace) -> int:
    from maisi.evaluation import evaluate
    from maisi.evaluation.errors import OptionError

    log = None if getattr(args, "quiet", False) else (lambda m: print(m, flush=True))
    try:
        options = options_from_args(args)
        if args.metric == "train-segmenter":
            seg = evaluate.train_segmenter(options, log)
            print(f"wrote {args.out_path} (labels {list(seg.labels)}, final loss {seg.info['final_loss']})")
            return 0
        report = evaluate.EVALUATIONS[args.metric](options, log)
    except OptionError as e:  # the library names option fields; the command line shows its flags
        raise ValueError(e.worded({f: flag(f) for f in e.fields})) from None
    print(report.summary)
    if log:
        log("report: " + ", ".join(str(p) for p in report.files))
    return 0 if report.passed else 1
