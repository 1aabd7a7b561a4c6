"""Evaluations over sets of volume files: mask–image consistency, VAE reconstruction, diversity, quality."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maisi.evaluation.errors import OptionError
from maisi.evaluation.fid import FIDSettings, pad_or_crop, preprocess_volume
from maisi.evaluation.inputs import read_hu, read_label
from maisi.evaluation.metrics import dice_per_label, ms_ssim, ms_ssim_settings, reconstruction_metrics
from maisi.evaluation.quality import summarise_quality
from maisi.labels import BODY, HU_MAX, HU_MIN, HU_SPAN, QUALITY_GROUPS, label_name, quality_check

Log = Callable[[str], None] | None


def _mean(values: Sequence[float]) -> float | None:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def evaluate_consistency(pairs: Sequence[tuple[Path, Path]], segmenter: Callable[..., Any],
                         labels: Sequence[int] | None = None, exclude: Sequence[int] = (BODY,),
                         log: Log = None) -> dict[str, Any]:
    """Dice per label between each conditioning mask and the segmenter's labels of its image.

    Labels: `labels`, else the segmenter's own (`.labels`), else every id of the mask; minus `exclude`."""
    known = labels if labels is not None else getattr(segmenter, "labels", None)
    per_volume, per_label = [], {}
    for image_path, mask_path in pairs:
        hu, spacing = read_hu(image_path)
        mask = read_label(mask_path, hu.shape)
        try:
            pred = segmenter(torch.from_numpy(hu), spacing=spacing)
        except TypeError:  # a plain callable without the spacing keyword
            pred = segmenter(torch.from_numpy(hu))
        ids = [int(v) for v in np.unique(mask) if v != 0 and v not in exclude and (known is None or v in known)]
        dice = dice_per_label(np.asarray(pred), mask, ids)
        per_volume.append({"image": str(image_path), "mask": str(mask_path),
                           "dice": {str(k): round(v, 4) for k, v in dice.items()}})
        for k, v in dice.items():
            per_label.setdefault(k, []).append(v)
        if log:
            mean = _mean(list(dice.values()))
            log(f"{Path(image_path).name}: mean Dice {'n/a' if mean is None else f'{mean:.3f}'} over {len(dice)} labels")
    if not per_label:
        raise ValueError("no label of the masks is one the segmenter predicts; nothing to compare")
    summary = {str(k): {"name": label_name(k), "dice": round(_mean(v), 4), "volumes": len(v)}
               for k, v in sorted(per_label.items())}
    return {"labels": summary, "mean_dice": round(_mean([s["dice"] for s in summary.values()]), 4),
            "volumes": per_volume}


def _to01(hu: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(hu, np.float32)).clamp(HU_MIN, HU_MAX) - HU_MIN) / HU_SPAN


@torch.no_grad()
def vae_roundtrip(model: torch.nn.Module, x: torch.Tensor, memory_gb: float | None = None,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """An X×Y×Z volume on the [0, 1] scale through the VAE (encode_within → μ → decode_within), clamped to [0, 1];
    padded with air to a multiple of the downsample factor and cropped back."""
    factor = int(getattr(getattr(model, "config", None), "downsample_factor", 4))
    shape = tuple(x.shape)
    padded = pad_or_crop(x, [n + (-n) % factor for n in shape])
    mu, _ = model.encode_within(padded[None, None].to(device), memory_gb=memory_gb)
    recon = model.decode_within(mu, memory_gb=memory_gb).clamp(0, 1).cpu()[0, 0]
    starts = [(p - n) // 2 for p, n in zip(padded.shape, shape)]
    return recon[tuple(slice(s, s + n) for s, n in zip(starts, shape))]


@torch.no_grad()
def evaluate_reconstruction(paths: Sequence[Path], model: torch.nn.Module, memory_gb: float | None = None,
                            device: str | torch.device = "cpu", log: Log = None) -> dict[str, Any]:
    """VAE round trip (encode_within → μ → decode_within) of each volume; PSNR, SSIM, MAE (HU) vs the input.
    Volumes are padded with air to a multiple of the downsample factor and cropped back."""
    model = model.eval().to(device)
    rows = []
    for path in paths:
        hu, _ = read_hu(path)
        x = _to01(hu)
        recon = vae_roundtrip(model, x, memory_gb, device)
        m = reconstruction_metrics(recon, x)
        rows.append({"image": str(path), **{k: round(v, 4) for k, v in m.items()}})
        if log:
            log(f"{Path(path).name}: PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}  MAE {m['mae_hu']:.1f} HU")
    return {"mean": {k: round(_mean([r[k] for r in rows]), 4) for k in ("psnr", "ssim", "mae_hu")},
            "volumes": rows}


def evaluate_diversity(paths: Sequence[Path], size: Sequence[int] | None = None, max_pairs: int = 200,
                       seed: int = 0, log: Log = None) -> dict[str, Any]:
    """Mean MS-SSIM over pairs of volumes (lower = more diverse). All must share one shape unless `size`
    (centre pad/crop) is given."""
    if len(paths) < 2:
        raise ValueError(f"diversity needs at least 2 volumes, got {len(paths)}")
    settings = FIDSettings(size=tuple(size) if size else None)
    vols = [preprocess_volume(*read_hu(p), settings) for p in paths]
    shapes = {tuple(v.shape) for v in vols}
    if len(shapes) > 1:
        raise OptionError(f"volumes differ in shape {sorted(shapes)}; pass {{size}} X Y Z to pad/crop them to one",
                          "size")
    pairs = list(itertools.combinations(range(len(vols)), 2))
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
    weights, kernel = ms_ssim_settings(vols[0].shape)
    values = []
    for i, j in pairs:
        values.append(ms_ssim(vols[i], vols[j]))
        if log:
            log(f"{Path(paths[i]).name} vs {Path(paths[j]).name}: MS-SSIM {values[-1]:.4f}")
    return {"ms_ssim_mean": round(float(np.mean(values)), 4), "ms_ssim_std": round(float(np.std(values)), 4),
            "pairs": len(values), "volumes": len(paths), "kernel_size": kernel, "scales": len(weights),
            "shape": list(vols[0].shape)}


def evaluate_quality(pairs: Sequence[tuple[Path, Path]], log: Log = None) -> dict[str, Any]:
    reports = []
    for image_path, label_path in pairs:
        hu, _ = read_hu(image_path)
        r = quality_check(hu, read_label(label_path, hu.shape))
        reports.append({"image": str(image_path), "label": str(label_path), **r})
        if log:
            if r["passed"] is None:  # nothing was measured: neither a pass nor a FAIL
                verdict = "NOT CHECKED (" + r["reason"].removeprefix("not checked: ") + ")"
            else:
                verdict = "pass" if r["passed"] else "FAIL " + ", ".join(r["failed"])
            log(f"{Path(image_path).name}: {verdict}")
    return {"summary": summarise_quality(reports), "volumes": reports}


def organ_hu_values(pairs: Sequence[tuple[Path, Path]], max_per_group: int = 200_000,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """HU values inside each quality organ group over a set of (image, label) files (subsampled)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {g: [] for g in QUALITY_GROUPS}
    for image_path, label_path in pairs:
        hu, _ = read_hu(image_path)
        label = read_label(label_path, hu.shape)
        for g, ids in QUALITY_GROUPS.items():
            v = hu[np.isin(label, ids)]
            if v.size:
                out[g].append(v)
    res = {}
    for g, parts in out.items():
        if parts:
            v = np.concatenate(parts)
            res[g] = v if v.size <= max_per_group else rng.choice(v, max_per_group, replace=False)
    return res
