"""2.5D FID (MAISI paper): 2D features of XY, YZ and ZX slices, a Fréchet distance per plane and their mean."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from maisi.evaluation.errors import OptionError
from maisi.evaluation.inputs import read_hu
from maisi.io.atomic import atomic_path
from maisi.labels import HU_RANGE

# Plane name → the axis sliced along (X×Y×Z volumes in RAS): XY slices index z, YZ index x, ZX index y.
PLANES: dict[str, int] = {"xy": 2, "yz": 0, "zx": 1}
CACHE_VERSION = 1


@dataclass(frozen=True)
class FIDSettings:
    """Preprocessing shared by real and synthetic volumes (both must use the same)."""

    spacing: tuple[float, float, float] | None = None  # resample to this voxel size (mm) first
    size: tuple[int, int, int] | None = None  # then centre pad (air) / crop to this shape
    center_fraction: float = 1.0  # keep this central share of the slices along each axis
    batch: int = 32  # slices per forward pass

    def __post_init__(self):
        if not 0 < self.center_fraction <= 1:
            raise OptionError(f"{{center_fraction}} must be in (0, 1], got {self.center_fraction}", "center_fraction")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise OptionError(f"{{spacing}} needs 3 positive values (mm), got {self.spacing}", "spacing")
        if self.size is not None and (len(self.size) != 3 or min(self.size) < 1):
            raise OptionError(f"{{size}} needs 3 positive voxel counts, got {self.size}", "size")
        if self.batch < 1:
            raise OptionError(f"{{batch}} must be >= 1, got {self.batch}", "batch")

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("batch")  # does not change the features
        return d


# ---------------------------------------------------------------------------------------------
# Fréchet distance (pure)
# ---------------------------------------------------------------------------------------------

def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of N×D features, in float64."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N×D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1−μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½ between two Gaussians.

    tr (Σ1 Σ2)^½ = Σ √λ of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½ (same eigenvalues as Σ1 Σ2), which stays
    real and stable for the rank-deficient covariances of few samples."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape}/{mu2.shape}, covariances {s1.shape}/{s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    lam = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(lam)))
    return max(d, 0.0)


def _as64(f: torch.Tensor | np.ndarray) -> np.ndarray:
    f = np.asarray(f.detach().cpu() if isinstance(f, torch.Tensor) else f, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N×D), got shape {f.shape}")
    return f


def fid_from_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance of two feature sets (N×D). With fewer samples than dimensions it uses the exact
    low-rank identity tr (Σ1 Σ2)^½ = ‖A1 A2ᵀ‖_* (nuclear norm; Σi = AiᵀAi, Ai the centred features / √(n−1)),
    which avoids D×D eigendecompositions."""
    a, b = _as64(a), _as64(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    n1, n2, dim = a.shape[0], b.shape[0], a.shape[1]
    if n1 * n2 * min(n1, n2) >= dim ** 3:
        return frechet_distance(*feature_stats(a), *feature_stats(b))
    mu1, mu2 = a.mean(0), b.mean(0)
    a1, a2 = (a - mu1) / np.sqrt(n1 - 1), (b - mu2) / np.sqrt(n2 - 1)
    cross = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    d = float(np.sum((mu1 - mu2) ** 2) + np.sum(a1 * a1) + np.sum(a2 * a2) - 2 * cross)
    return max(d, 0.0)


# ---------------------------------------------------------------------------------------------
# Volumes → slices → features
# ---------------------------------------------------------------------------------------------

def preprocess_volume(hu: np.ndarray | torch.Tensor, spacing: Sequence[float], settings: FIDSettings) -> torch.Tensor:
    """HU X×Y×Z → [0, 1] (clip [−1000, 1000]), resampled to settings.spacing, centre padded/cropped to size."""
    x = torch.as_tensor(np.asarray(hu, np.float32) if not isinstance(hu, torch.Tensor) else hu).float()
    if x.ndim != 3:
        raise ValueError(f"expected an X×Y×Z volume, got shape {tuple(x.shape)}")
    x = (x.clamp(*HU_RANGE) - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0])
    if settings.spacing is not None:
        shape = [max(1, round(n * s / t)) for n, s, t in zip(x.shape, spacing, settings.spacing)]
        if list(shape) != list(x.shape):
            x = F.interpolate(x[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
    if settings.size is not None:
        x = pad_or_crop(x, settings.size)
    return x


def pad_or_crop(x: torch.Tensor, size: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Centre pad (with `value`, air after scaling) or crop each axis to `size`."""
    for axis, n in enumerate(size):
        cur = x.shape[axis]
        if cur > n:
            start = (cur - n) // 2
            x = x.narrow(axis, start, n)
        elif cur < n:
            before = (n - cur) // 2
            pad = [0, 0] * x.ndim
            k = 2 * (x.ndim - 1 - axis)  # F.pad lists the last axis first
            pad[k], pad[k + 1] = before, n - cur - before
            x = F.pad(x, pad, value=value)
    return x


def plane_slices(volume: torch.Tensor, plane: str, center_fraction: float = 1.0,
                 drop_empty: bool = True) -> torch.Tensor:
    """The slices of an X×Y×Z volume in one plane as N×1×H×W: 'xy' → X×Y slices along z, 'yz' → Y×Z along x,
    'zx' → X×Z along y. Keeps the central `center_fraction` of them and drops constant (empty) slices."""
    if plane not in PLANES:
        raise ValueError(f"unknown plane {plane!r}; choose from {list(PLANES)}")
    axis = PLANES[plane]
    n = volume.shape[axis]
    keep = max(1, round(n * center_fraction))
    start = (n - keep) // 2
    s = volume.narrow(axis, start, keep).movedim(axis, 0)
    if drop_empty:
        flat = s.reshape(s.shape[0], -1)
        s = s[(flat.amax(1) - flat.amin(1)) > 1e-6]
    return s.unsqueeze(1)


@torch.no_grad()
def volume_features(volume01: torch.Tensor, extractor: torch.nn.Module, settings: FIDSettings) -> dict[str, torch.Tensor]:
    """Pooled 2D features of every kept slice of each plane: plane → N×D (N may be 0)."""
    device = next(extractor.parameters(), torch.empty(0)).device
    out = {}
    for plane in PLANES:
        slices = plane_slices(volume01, plane, settings.center_fraction)
        feats = [extractor.pooled(slices[i:i + settings.batch].to(device)).float().cpu()
                 for i in range(0, slices.shape[0], settings.batch)]
        out[plane] = torch.cat(feats) if feats else torch.zeros(0, getattr(extractor, "feature_dim", 0))
    return out


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_key(path: Path, extractor_identity: str, settings: FIDSettings) -> str:
    material = {"file": _file_digest(path), "extractor": extractor_identity, "settings": settings.key(),
                "hu_range": HU_RANGE, "planes": PLANES, "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def cached_volume_features(path: Path, extractor: torch.nn.Module, settings: FIDSettings,
                           cache_dir: Path | None) -> tuple[dict[str, torch.Tensor], bool]:
    """(features, from_cache) of one volume file, cached under cache_dir by file sha256 + extractor + settings."""
    identity = getattr(extractor, "identity", "") or type(extractor).__name__
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{cache_key(path, identity, settings)}.safetensors"
        if cache_file.is_file():
            try:
                data = load_file(str(cache_file))
                if set(data) == set(PLANES):
                    return data, True
            except Exception:  # a damaged cache entry is recomputed
                pass
    hu, spacing = read_hu(path)
    feats = volume_features(preprocess_volume(hu, spacing, settings), extractor, settings)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file, suffix=".safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp),
                      metadata={"source": str(path), "extractor": identity})
    return feats, False


def collect_features(paths: Sequence[Path], extractor: torch.nn.Module, settings: FIDSettings,
                     cache_dir: Path | None, progress: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    per_plane: dict[str, list[torch.Tensor]] = {p: [] for p in PLANES}
    for i, path in enumerate(paths):
        feats, hit = cached_volume_features(Path(path), extractor, settings, cache_dir)
        for p in PLANES:
            per_plane[p].append(feats[p])
        if progress:
            progress(f"[{i + 1}/{len(paths)}] {Path(path).name}: "
                     + ", ".join(f"{p} {feats[p].shape[0]}" for p in PLANES) + (" (cached)" if hit else ""))
    return {p: torch.cat(v) for p, v in per_plane.items()}


def fid_25d(real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-plane FID of two feature sets (plane → N×D) and their average ('mean')."""
    out = {}
    for p in PLANES:
        for name, f in (("real", real), ("synthetic", fake)):
            if f[p].shape[0] < 2:
                raise OptionError(f"{name} set has {f[p].shape[0]} non-empty {p.upper()} slices; FID needs at least 2 "
                                  "(more volumes, or a larger {center_fraction})", "center_fraction")
        out[p] = fid_from_features(real[p], fake[p])
    out["mean"] = float(np.mean([out[p] for p in PLANES]))
    return out
