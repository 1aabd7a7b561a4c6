"""The evaluations as library functions: typed options in, every check before any work, a written Report out."""

from __future__ import annotations

from pathlib import Path

import torch

from maisi.evaluation.errors import OptionError
from maisi.evaluation.fid import PLANES, collect_features, fid_25d
from maisi.evaluation.inputs import list_volumes, pair_volumes
from maisi.evaluation.options import (
    ConsistencyOptions,
    DiversityOptions,
    FIDOptions,
    QualityOptions,
    ReconstructionOptions,
    Report,
    SegmenterOptions,
)
from maisi.evaluation.report import bar_chart, histogram_chart, markdown_table, write_report
from maisi.evaluation.runs import (
    Log,
    evaluate_consistency,
    evaluate_diversity,
    evaluate_quality,
    evaluate_reconstruction,
    organ_hu_values,
)
from maisi.evaluation.segmenter import PhantomSegmenter, load_segmenter, train_phantom_segmenter
from maisi.io.atomic import OutputLocationError, check_output_dir, check_output_file
from maisi.labels import QUALITY_GROUPS
from maisi.networks.backbones import load_extractor
from maisi.networks.weights import load_component

REPORT_FOLDER = "report folder"


def _say(log: Log, msg: str) -> None:
    if log:
        log(msg)


def fid(options: FIDOptions, log: Log = None) -> Report:
    """2.5D FID per plane (XY, YZ, ZX) and their mean between options.real and options.fake."""
    o = options
    check_output_dir(o.out, REPORT_FOLDER)  # before any work
    if o.cache_dir() is not None:
        try:
            check_output_dir(o.cache_dir(), "feature cache folder ({cache})")
        except OutputLocationError as e:
            raise OptionError(str(e), "cache") from None
    real = list_volumes(o.real, "image", o.key)
    fake = list_volumes(o.fake, "image", o.key)
    extractor = load_extractor(o.extractor).to(torch.device(o.device))
    cache = o.cache_dir()
    _say(log, f"extractor: {extractor.identity} — FIDs from different extractors are not comparable")
    _say(log, f"real: {len(real)} volumes")
    fr = collect_features(real, extractor, o.settings, cache, log)
    _say(log, f"synthetic: {len(fake)} volumes")
    ff = collect_features(fake, extractor, o.settings, cache, log)
    scores = fid_25d(fr, ff)
    settings = o.settings.key()
    data = {"metric": "fid_2.5d", "extractor": extractor.identity, "fid": scores,
            "slices": {"real": {p: int(fr[p].shape[0]) for p in PLANES}, "synthetic": {p: int(ff[p].shape[0]) for p in PLANES}},
            "settings": settings, "real": [str(p) for p in real], "synthetic": [str(p) for p in fake]}
    line = "  ".join(f"{p.upper()} {scores[p]:.4g}" for p in PLANES)
    md = (f"# 2.5D FID\n\nExtractor: **{extractor.identity}** (FIDs from different extractors are not comparable; "
          f"the paper uses RadImageNet ResNet-50).\n\nReal: {len(real)} volumes ({o.real}); synthetic: {len(fake)} "
          f"volumes ({o.fake}).\n\nSettings: {settings}\n\n"
          + markdown_table(["plane", "FID", "real slices", "synthetic slices"],
                           [[p.upper(), scores[p], data["slices"]["real"][p], data["slices"]["synthetic"][p]] for p in PLANES]
                           + [["mean", scores["mean"], "", ""]]))
    chart = bar_chart({p.upper(): scores[p] for p in PLANES} | {"mean": scores["mean"]},
                      f"2.5D FID per plane ({extractor.identity})", "FID")
    files = write_report(o.out, "fid", data, md, {"planes": chart})
    return Report("fid", data, f"FID ({extractor.identity}): {line}  mean {scores['mean']:.4g}", tuple(files))


def consistency(options: ConsistencyOptions, log: Log = None) -> Report:
    """Dice per label between each conditioning mask and the segmenter's segmentation of its image."""
    o = options
    check_output_dir(o.out, REPORT_FOLDER)  # before any work
    pairs = pair_volumes(o.images, o.masks, o.key)
    res = evaluate_consistency(pairs, load_segmenter(o.segmenter), log=log)
    res["segmenter"] = str(o.segmenter)
    md = (f"# Mask–image consistency\n\nSegmenter: `{o.segmenter}`; {len(pairs)} image/mask pairs.\n\n"
          f"Mean Dice over labels: **{res['mean_dice']:.4f}**\n\n"
          + markdown_table(["label", "name", "Dice", "volumes"],
                           [[k, v["name"], v["dice"], v["volumes"]] for k, v in res["labels"].items()]))
    chart = bar_chart({v["name"]: v["dice"] for v in res["labels"].values()}, "Dice per label", "Dice", ymax=1.0,
                      width=max(640, 70 * len(res["labels"])))
    files = write_report(o.out, "consistency", res, md, {"dice": chart})
    summary = f"mean Dice {res['mean_dice']:.4f} over {len(res['labels'])} labels, {len(pairs)} volumes"
    return Report("consistency", res, summary, tuple(files))


def reconstruction(options: ReconstructionOptions, log: Log = None) -> Report:
    """PSNR, SSIM and MAE (HU) of the VAE's encode → decode of each volume."""
    o = options
    check_output_dir(o.out, REPORT_FOLDER)  # before any work
    paths = list_volumes(o.data, "image", o.key)
    vae = load_component(o.vae, "autoencoder", o.preset)
    res = evaluate_reconstruction(paths, vae.model, o.memory_gb, o.device, log)
    res["vae"], res["weights"] = str(o.vae), vae.source
    m = res["mean"]
    md = (f"# VAE reconstruction\n\nWeights: `{o.vae}`; {len(paths)} volumes; images clipped to [−1000, 1000] HU "
          f"and scaled to [0, 1] (PSNR with data range 1).\n\n"
          + markdown_table(["volume", "PSNR (dB)", "SSIM", "MAE (HU)"],
                           [[Path(r["image"]).name, r["psnr"], r["ssim"], r["mae_hu"]] for r in res["volumes"]]
                           + [["mean", m["psnr"], m["ssim"], m["mae_hu"]]]))
    files = write_report(o.out, "reconstruction", res, md)
    summary = (f"VAE reconstruction over {len(paths)} volumes: PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}  "
               f"MAE {m['mae_hu']:.1f} HU")
    return Report("reconstruction", res, summary, tuple(files))


def diversity(options: DiversityOptions, log: Log = None) -> Report:
    """Mean MS-SSIM between pairs of volumes (lower = more diverse)."""
    o = options
    check_output_dir(o.out, REPORT_FOLDER)  # before any work
    paths = list_volumes(o.data, "image", o.key)
    res = evaluate_diversity(paths, o.size, o.max_pairs, log=log)
    md = (f"# Diversity\n\nMean MS-SSIM between pairs of {res['volumes']} volumes: **{res['ms_ssim_mean']:.4f}** "
          f"± {res['ms_ssim_std']:.4f} ({res['pairs']} pairs; lower = more diverse). Kernel {res['kernel_size']}, "
          f"{res['scales']} scales for shape {res['shape']}.")
    files = write_report(o.out, "diversity", res, md)
    summary = (f"MS-SSIM {res['ms_ssim_mean']:.4f} ± {res['ms_ssim_std']:.4f} over {res['pairs']} pairs "
               f"(lower = more diverse)")
    return Report("diversity", res, summary, tuple(files))


def quality(options: QualityOptions, log: Log = None) -> Report:
    """Median HU per organ group of each image within the reference ranges; Report.passed when all pass."""
    o = options
    check_output_dir(o.out, REPORT_FOLDER)  # before any work
    pairs = pair_volumes(o.images, o.labels, o.key)
    reference = pair_volumes(o.reference_images, o.reference_labels, o.key) if o.reference_images else []
    res = evaluate_quality(pairs, log)
    s = res["summary"]
    unchecked = (f"; {s['not_checked']} NOT CHECKED (their label maps hold no organ group of the check: "
                 f"{', '.join(QUALITY_GROUPS)})") if s["not_checked"] else ""
    rows = [[g, v["checked"], v["failed"], f"{v['median_hu_min']:.0f} … {v['median_hu_max']:.0f}",
             f"{v['range'][0]:.0f} … {v['range'][1]:.0f}"] for g, v in s["groups"].items()]
    md = (f"# Quality check\n\n{s['passed']}/{s['volumes']} volumes passed (median HU per organ group within the "
          f"reference ranges){unchecked}.\n\n" + markdown_table(["group", "checked", "failed", "medians (HU)", "allowed (HU)"], rows))
    plots = {}
    real = organ_hu_values(reference) if reference else {}
    for g, v in organ_hu_values(pairs).items():
        series = {"synthetic": v} | ({"real": real[g]} if g in real else {})
        plots[f"hist_{g}"] = histogram_chart(series, f"HU in {g}")
    files = write_report(o.out, "quality", res, md, plots)
    summary = f"quality check: {s['passed']}/{s['volumes']} volumes passed{unchecked}"
    return Report("quality", res, summary, tuple(files), passed=s["passed"] == s["volumes"])


def train_segmenter(options: SegmenterOptions, log: Log = None) -> PhantomSegmenter:
    """Train the tiny phantom segmenter of the consistency evaluation and write it to options.out_path."""
    o = options
    try:  # before any work
        check_output_file(o.out_path, "segmenter file ({out_path})")
    except OutputLocationError as e:
        raise OptionError(str(e), "out_path") from None
    return train_phantom_segmenter(o.out_path, o.steps, size=o.size, spacing=o.spacing, n_phantoms=o.phantoms,
                                   seed=o.seed, augment=o.augment, channels=o.channels, device=o.device, log=log)


EVALUATIONS = {"fid": fid, "consistency": consistency, "reconstruction": reconstruction, "diversity": diversity,
               "quality": quality}
