"""Image metrics on tensors via MONAI: PSNR, 3D SSIM, MAE in HU, MS-SSIM for small volumes, Dice per label."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, MAEMetric, MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

from maisi.labels import HU_SPAN

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _as5d(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if t.ndim == 3:
        t = t[None, None]
    if t.ndim != 5:
        raise ValueError(f"expected an X×Y×Z or N×C×X×Y×Z volume, got shape {tuple(t.shape)}")
    return t


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Two volumes of one shape with finite values (a NaN would come back as a NaN score, not an error)."""
    a, b = _as5d(a), _as5d(b)
    if a.shape != b.shape:
        raise ValueError(f"volumes differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("a volume holds NaN or infinite values; metrics are only defined on finite volumes")
    return a, b


def ssim_kernel(shape: Sequence[int], preferred: int = 11) -> int:
    """The largest odd SSIM window ≤ preferred that fits every axis."""
    k = min(preferred, min(shape))
    k = k if k % 2 else k - 1
    if k < 3:
        raise ValueError(f"volume {tuple(shape)} is too small for SSIM (needs ≥ 3 voxels per axis)")
    return k


def reconstruction_metrics(recon01: torch.Tensor, target01: torch.Tensor) -> dict[str, float]:
    """PSNR (dB, data range 1), 3D SSIM and MAE in HU of images in [0, 1] (HU [−1000, 1000])."""
    x, y = _pair(recon01, target01)
    k = ssim_kernel(x.shape[2:])
    psnr = PSNRMetric(max_val=1.0)(x, y)
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=k, kernel_sigma=1.5 * k / 11)(x, y)
    mae = MAEMetric()(x, y)
    return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean()), "mae_hu": float(mae.mean()) * HU_SPAN}


def ms_ssim_settings(shape: Sequence[int]) -> tuple[tuple[float, ...], int]:
    """(scale weights, kernel) valid for a small volume: as many of the 5 standard scales as fit (MONAI needs
    dim // (scales−1)² > kernel−1 and the coarsest scale at least one window wide), then the largest kernel."""
    m = min(shape)
    for n in range(5, 0, -1):
        for k in (11, 9, 7, 5, 3):
            if m // max(1, n - 1) ** 2 > k - 1 and m // 2 ** (n - 1) >= k:
                w = np.asarray(MS_SSIM_WEIGHTS[:n])
                return tuple(float(v) for v in w / w.sum()), k
    raise ValueError(f"volume {tuple(shape)} is too small for MS-SSIM (needs ≥ 3 voxels per axis)")


def ms_ssim(a01: torch.Tensor, b01: torch.Tensor) -> float:
    """MS-SSIM of two volumes in [0, 1] with ms_ssim_settings for their size."""
    x, y = _pair(a01, b01)
    weights, k = ms_ssim_settings(x.shape[2:])
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=k, kernel_sigma=1.5 * k / 11,
                                  weights=weights)
    return float(metric(x, y).mean())


def dice_per_label(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
                   labels: Sequence[int] | None = None) -> dict[int, float]:
    """Dice of each label id between two integer label maps (default: the non-zero ids of target).
    NaN for a label absent from target (MONAI's ignore_empty)."""
    p = torch.as_tensor(np.asarray(pred)).long()
    t = torch.as_tensor(np.asarray(target)).long()
    if p.shape != t.shape:
        raise ValueError(f"label maps differ in shape: {tuple(p.shape)} vs {tuple(t.shape)}")
    if labels is None:
        labels = [int(v) for v in torch.unique(t).tolist() if v != 0]
    if not labels:
        return {}
    one_hot = lambda m: torch.stack([m == v for v in labels])[None].float()  # noqa: E731
    d = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(one_hot(p), one_hot(t))
    return {int(v): float(d[0, i]) for i, v in enumerate(labels)}
