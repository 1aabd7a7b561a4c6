"""The work behind each `maisi evaluate` subcommand: run an evaluation, print it, write its report."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from maisi.evaluation.report import bar_chart, histogram_chart, markdown_table, write_report
from maisi.io.atomic import check_output_dir, check_output_file

Log = Callable[[str], None] | None


def _say(log: Log, msg: str) -> None:
    if log:
        log(msg)


def _done(log: Log, paths: list[Path]) -> None:
    _say(log, "report: " + ", ".join(str(p) for p in paths))


def fid(args: argparse.Namespace, log: Log) -> int:
    import torch

    from maisi.evaluation.fid import PLANES, FIDSettings, collect_features, fid_25d
    from maisi.evaluation.inputs import list_volumes
    from maisi.networks.backbones import load_extractor

    check_output_dir(args.out, "report folder")  # before any work
    settings = FIDSettings(spacing=tuple(args.spacing) if args.spacing else None,
                           size=tuple(args.size) if args.size else None,
                           center_fraction=args.center_fraction, batch=args.batch)
    real = list_volumes(args.real, "image", args.key)
    fake = list_volumes(args.fake, "image", args.key)
    extractor = load_extractor(args.extractor).to(torch.device(args.device))
    if args.cache and args.cache.lower() == "none":
        cache = None
    else:
        cache = Path(args.cache) if args.cache else Path(args.out) / "feature_cache"
    _say(log, f"extractor: {extractor.identity} — FIDs from different extractors are not comparable")
    _say(log, f"real: {len(real)} volumes")
    fr = collect_features(real, extractor, settings, cache, log)
    _say(log, f"synthetic: {len(fake)} volumes")
    ff = collect_features(fake, extractor, settings, cache, log)
    scores = fid_25d(fr, ff)
    data = {"metric": "fid_2.5d", "extractor": extractor.identity, "fid": scores,
            "slices": {"real": {p: int(fr[p].shape[0]) for p in PLANES}, "synthetic": {p: int(ff[p].shape[0]) for p in PLANES}},
            "settings": settings.key(), "real": [str(p) for p in real], "synthetic": [str(p) for p in fake]}
    line = "  ".join(f"{p.upper()} {scores[p]:.4g}" for p in PLANES)
    print(f"FID ({extractor.identity}): {line}  mean {scores['mean']:.4g}")
    md = (f"# 2.5D FID\n\nExtractor: **{extractor.identity}** (FIDs from different extractors are not comparable; "
          f"the paper uses RadImageNet ResNet-50).\n\nReal: {len(real)} volumes ({args.real}); synthetic: {len(fake)} "
          f"volumes ({args.fake}).\n\nSettings: {settings.key()}\n\n"
          + markdown_table(["plane", "FID", "real slices", "synthetic slices"],
                           [[p.upper(), scores[p], data["slices"]["real"][p], data["slices"]["synthetic"][p]] for p in PLANES]
                           + [["mean", scores["mean"], "", ""]]))
    chart = bar_chart({p.upper(): scores[p] for p in PLANES} | {"mean": scores["mean"]},
                      f"2.5D FID per plane ({extractor.identity})", "FID")
    _done(log, write_report(args.out, "fid", data, md, {"planes": chart}))
    return 0


def consistency(args: argparse.Namespace, log: Log) -> int:
    from maisi.evaluation.inputs import pair_volumes
    from maisi.evaluation.runs import evaluate_consistency
    from maisi.evaluation.segmenter import load_segmenter

    check_output_dir(args.out, "report folder")  # before any work
    pairs = pair_volumes(args.images, args.masks, args.key)
    seg = load_segmenter(args.segmenter)
    res = evaluate_consistency(pairs, seg, log=log)
    res["segmenter"] = str(args.segmenter)
    print(f"mean Dice {res['mean_dice']:.4f} over {len(res['labels'])} labels, {len(pairs)} volumes")
    md = (f"# Mask–image consistency\n\nSegmenter: `{args.segmenter}`; {len(pairs)} image/mask pairs.\n\n"
          f"Mean Dice over labels: **{res['mean_dice']:.4f}**\n\n"
          + markdown_table(["label", "name", "Dice", "volumes"],
                           [[k, v["name"], v["dice"], v["volumes"]] for k, v in res["labels"].items()]))
    chart = bar_chart({v["name"]: v["dice"] for v in res["labels"].values()}, "Dice per label", "Dice", ymax=1.0,
                      width=max(640, 70 * len(res["labels"])))
    _done(log, write_report(args.out, "consistency", res, md, {"dice": chart}))
    return 0


def train_segmenter(args: argparse.Namespace, log: Log) -> int:
    from maisi.evaluation.segmenter import train_phantom_segmenter

    check_output_file(args.out_path, "segmenter file (--out-path)")  # before any work
    seg = train_phantom_segmenter(args.out_path, args.steps, size=args.size, spacing=args.spacing,
                                  n_phantoms=args.phantoms, seed=args.seed, device=args.device, log=log or print)
    print(f"wrote {args.out_path} (labels {list(seg.labels)}, final loss {seg.info['final_loss']})")
    return 0


def reconstruction(args: argparse.Namespace, log: Log) -> int:
    from maisi.evaluation.inputs import list_volumes
    from maisi.evaluation.runs import evaluate_reconstruction
    from maisi.networks.weights import load_component

    check_output_dir(args.out, "report folder")  # before any work
    paths = list_volumes(args.data, "image", args.key)
    vae = load_component(args.vae, "autoencoder", args.preset)
    res = evaluate_reconstruction(paths, vae.model, args.memory_gb, args.device, log)
    res["vae"], res["weights"] = str(args.vae), vae.source
    m = res["mean"]
    print(f"VAE reconstruction over {len(paths)} volumes: PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}  "
          f"MAE {m['mae_hu']:.1f} HU")
    md = (f"# VAE reconstruction\n\nWeights: `{args.vae}`; {len(paths)} volumes; images clipped to [−1000, 1000] HU "
          f"and scaled to [0, 1] (PSNR with data range 1).\n\n"
          + markdown_table(["volume", "PSNR (dB)", "SSIM", "MAE (HU)"],
                           [[Path(r["image"]).name, r["psnr"], r["ssim"], r["mae_hu"]] for r in res["volumes"]]
                           + [["mean", m["psnr"], m["ssim"], m["mae_hu"]]]))
    _done(log, write_report(args.out, "reconstruction", res, md))
    return 0


def diversity(args: argparse.Namespace, log: Log) -> int:
    from maisi.evaluation.inputs import list_volumes
    from maisi.evaluation.runs import evaluate_diversity

    check_output_dir(args.out, "report folder")  # before any work
    paths = list_volumes(args.data, "image", args.key)
    res = evaluate_diversity(paths, args.size, args.max_pairs, log=log)
    print(f"MS-SSIM {res['ms_ssim_mean']:.4f} ± {res['ms_ssim_std']:.4f} over {res['pairs']} pairs "
          f"(lower = more diverse)")
    md = (f"# Diversity\n\nMean MS-SSIM between pairs of {res['volumes']} volumes: **{res['ms_ssim_mean']:.4f}** "
          f"± {res['ms_ssim_std']:.4f} ({res['pairs']} pairs; lower = more diverse). Kernel {res['kernel_size']}, "
          f"{res['scales']} scales for shape {res['shape']}.")
    _done(log, write_report(args.out, "diversity", res, md))
    return 0


def quality(args: argparse.Namespace, log: Log) -> int:
    from maisi.evaluation.inputs import pair_volumes
    from maisi.evaluation.quality import QUALITY_GROUPS
    from maisi.evaluation.runs import evaluate_quality, organ_hu_values

    check_output_dir(args.out, "report folder")  # before any work
    if bool(args.reference_images) != bool(args.reference_labels):
        raise ValueError("give both --reference-images and --reference-labels, or neither")
    pairs = pair_volumes(args.images, args.labels, args.key)
    reference = pair_volumes(args.reference_images, args.reference_labels, args.key) if args.reference_images else []
    res = evaluate_quality(pairs, log)
    s = res["summary"]
    unchecked = (f"; {s['not_checked']} NOT CHECKED (their label maps hold no organ group of the check: "
                 f"{', '.join(QUALITY_GROUPS)})") if s["not_checked"] else ""
    print(f"quality check: {s['passed']}/{s['volumes']} volumes passed{unchecked}")
    rows = [[g, v["checked"], v["failed"], f"{v['median_hu_min']:.0f} … {v['median_hu_max']:.0f}",
             f"{v['range'][0]:.0f} … {v['range'][1]:.0f}"] for g, v in s["groups"].items()]
    md = (f"# Quality check\n\n{s['passed']}/{s['volumes']} volumes passed (median HU per organ group within the "
          f"reference ranges){unchecked}.\n\n" + markdown_table(["group", "checked", "failed", "medians (HU)", "allowed (HU)"], rows))
    plots = {}
    synth = organ_hu_values(pairs)
    real = organ_hu_values(reference) if reference else {}
    for g, v in synth.items():
        series = {"synthetic": v} | ({"real": real[g]} if g in real else {})
        plots[f"hist_{g}"] = histogram_chart(series, f"HU in {g}")
    _done(log, write_report(args.out, "quality", res, md, plots))
    return 0 if s["passed"] == s["volumes"] else 1


COMMANDS: dict[str, Callable[[argparse.Namespace, Log], int]] = {
    "fid": fid, "consistency": consistency, "train-segmenter": train_segmenter,
    "reconstruction": reconstruction, "diversity": diversity, "quality": quality,
}
