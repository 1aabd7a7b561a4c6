"""`maisi evaluate`: 2.5D FID, mask–image consistency, VAE reconstruction, diversity and quality reports."""

from __future__ import annotations

import argparse
from typing import Any

DATA_HELP = "a folder of NIfTI files (images/labels told apart by _label/_mask/_seg), a datalist .json or one file"


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help=f"report folder (default {default_out})")
    p.add_argument("--key", default=None, help="datalist list to read (default: testing, validation or training)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


FLAGS = {"tumors": "--tumor"}  # option fields whose flag is not their name


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
    t.add_argument("--steps", type=int, default=2000, help="Adam steps of 2 crops (default 2000: ~25 min on 1 core)")
    t.add_argument("--phantoms", type=int, default=128, help="training phantoms (regions and spans in turn)")
    t.add_argument("--size", type=int, nargs=3, default=[48, 48, 48], help="training crop (multiples of 16)")
    t.add_argument("--spacing", type=float, nargs=3, default=[4.0, 4.0, 4.0], help="phantom spacing (mm)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="degrade training crops at random (coarser grid, blur, noise, gain, offset) so that smooth "
                        "generated images are judged by their anatomy (default: on)")
    t.add_argument("--channels", type=int, nargs=4, default=[32, 64, 128, 256], help="the UNet's four widths")

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
    _add_augment(s)
    p.set_defaults(run=run)


def _add_augment(s: argparse._SubParsersAction) -> None:
    a = s.add_parser("augment", help="does synthetic data help? train a segmenter on real vs real + synthetic pairs",
                     description="Train the same MONAI segmenter on real data only (baseline), real + N synthetic "
                                 "pairs for each --counts N and optionally synthetic only, --seeds times each; "
                                 "report per-class Dice and HD95 on the held-out test set with bootstrap intervals "
                                 "and the paired difference to the baseline. Re-running resumes. Runs under torchrun.")
    a.add_argument("--train", help="real training pairs: a datalist .json (image + label) or a folder")
    a.add_argument("--test", help="held-out test pairs: a datalist .json or a folder")
    a.add_argument("--phantoms", action="store_true",
                   help="benchmark without data: phantom train/test sets in <out>/phantoms, pairs from the demo model")
    a.add_argument("--phantoms-train", type=int, default=4, help="--phantoms: real training phantoms (default 4)")
    a.add_argument("--phantoms-test", type=int, default=8, help="--phantoms: held-out phantoms (default 8)")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--model", help="weights to generate pairs with ('demo': the shipped demo model)")
    g.add_argument("--synthetic", help="a folder of already generated pairs (sample_*_image/_label/_record files)")
    a.add_argument("--source", default="masks", choices=("masks", "database", "tumor"),
                   help="how --model makes pairs: from each real training mask (ControlNet), from the mask "
                        "database, or training masks with --tumor inpainted (default masks)")
    a.add_argument("--tumor", nargs="+", default=[], help="--source tumor: tumours to inpaint (e.g. hepatic_tumor)")
    a.add_argument("--counts", type=int, nargs="*", default=[4, 8], help="N of the real + N arms (default 4 8)")
    a.add_argument("--synthetic-only", action="store_true", help="add an arm trained on max(counts) pairs alone")
    a.add_argument("--seeds", type=int, default=3, help="training seeds per arm (default 3)")
    a.add_argument("--labels", type=int, nargs="+", help="MAISI ids to segment (default: those of the training masks)")
    a.add_argument("--network", default="segresnet", choices=("segresnet", "basicunet"), help="MONAI segmenter")
    a.add_argument("--features", type=int, default=8, help="SegResNet init filters / BasicUNet base features")
    a.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32], help="training crop (multiples of 16)")
    a.add_argument("--batch", type=int, default=2, help="crops per step")
    a.add_argument("--steps", type=int, default=200, help="Adam steps per run (default 200)")
    a.add_argument("--lr", type=float, default=2e-3)
    a.add_argument("--generation-seed", type=int, default=1000, help="pair k uses seed generation_seed + k")
    a.add_argument("--generation-steps", type=int, default=None, help="sampler steps (default: the model's)")
    a.add_argument("--train-key", default="training", help="datalist list of --train")
    a.add_argument("--test-key", default=None, help="datalist list of --test (default testing, validation, training)")
    a.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    a.add_argument("--device", default="cpu")
    a.add_argument("--out", default="evaluation/augment", help="report folder (default evaluation/augment)")
    a.add_argument("--quiet", action="store_true", help="no progress lines")


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
    if a.metric == "augment":
        return _augment_options(a)
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
                            spacing=tuple(a.spacing), seed=a.seed, device=a.device, augment=a.augment,
                            channels=tuple(a.channels))


def _augment_options(a: argparse.Namespace) -> Any:
    from pathlib import Path

    from maisi.evaluation.augment.options import DEMO_MODEL, AugmentOptions, SegmenterRecipe
    from maisi.evaluation.augment.phantoms import LABELS

    train, test, labels, model = a.train, a.test, a.labels, a.model
    if a.phantoms:  # the sets make_phantom_sets writes into <out>/phantoms
        if a.train or a.test:
            raise ValueError("--phantoms builds its own train and test sets: leave out --train and --test")
        train, test = str(Path(a.out) / "phantoms" / "train.json"), str(Path(a.out) / "phantoms" / "test.json")
        labels = labels or list(LABELS)
        model = model or (None if a.synthetic else DEMO_MODEL)
    elif not (a.train and a.test):
        raise ValueError("give --train and --test (datalists or folders of image/label pairs), or --phantoms")
    recipe = SegmenterRecipe(network=a.network, features=a.features, patch=tuple(a.patch), batch=a.batch,
                             steps=a.steps, lr=a.lr)
    return AugmentOptions(train=train, test=test, out=a.out, model=model, synthetic=a.synthetic,
                          source=a.source, tumors=tuple(a.tumor), counts=tuple(a.counts),
                          synthetic_only=a.synthetic_only, seeds=a.seeds,
                          labels=tuple(labels) if labels else None, recipe=recipe,
                          generation_seed=a.generation_seed, generation_steps=a.generation_steps,
                          train_key=a.train_key, test_key=a.test_key, device=a.device, bootstrap=a.bootstrap)


def _run_augment(args: argparse.Namespace, log: Any) -> int:
    import os
    from pathlib import Path

    from maisi.evaluation.augment.phantoms import make_phantom_sets
    from maisi.evaluation.augment.run import evaluate_augment

    options = _augment_options(args)  # every option checked before the phantoms are made
    if args.phantoms:
        make_phantom_sets(Path(options.train).parent, args.phantoms_train, args.phantoms_test, log=log)
    report = evaluate_augment(options, log)
    if os.environ.get("RANK", "0") == "0":
        print(report.summary)
        if log:
            log("report: " + ", ".join(str(p) for p in report.files))
    return 0


def run(args: argparse.Namespace) -> int:
    from maisi.evaluation import evaluate
    from maisi.evaluation.errors import OptionError

    log = None if getattr(args, "quiet", False) else (lambda m: print(m, flush=True))
    try:
        if args.metric == "augment":
            return _run_augment(args, log)
        options = options_from_args(args)
        if args.metric == "train-segmenter":
            seg = evaluate.train_segmenter(options, log)
            print(f"wrote {args.out_path} (labels {list(seg.labels)}, final loss {seg.info['final_loss']})")
            return 0
        report = evaluate.EVALUATIONS[args.metric](options, log)
    except OptionError as e:  # the library names option fields; the command line shows its flags
        raise ValueError(e.worded({f: FLAGS.get(f, flag(f.split(".")[-1])) for f in e.fields})) from None
    print(report.summary)
    if log:
        log("report: " + ", ".join(str(p) for p in report.files))
    return 0 if report.passed else 1
