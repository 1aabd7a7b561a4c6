"""Rasterising smooth, noise-deformed shapes (ellipsoids, tubes) into a label/tissue canvas in mm."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Clip = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def smooth_noise(
    rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], cell_mm: float
) -> np.ndarray:
    """Zero-mean, unit-std smooth noise: random values on a grid of `cell_mm` spacing, interpolated with
    cubic B-splines (separable, one small matrix product per axis)."""
    fov = np.asarray(shape) * np.asarray(spacing)
    coarse = np.maximum(np.ceil(fov / cell_mm).astype(int) + 4, 4)
    out = rng.standard_normal(tuple(coarse)).astype(np.float32)
    for axis, (n, sp) in enumerate(zip(shape, spacing)):
        t = 1.5 + (np.arange(n) + 0.5) * sp / cell_mm  # position in coarse cells, one cell of margin
        w = _bspline_weights(t, coarse[axis])
        out = np.moveaxis(np.tensordot(w, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    out = np.ascontiguousarray(out, dtype=np.float32)
    sub = out[::4, ::4, ::4]
    out -= sub.mean()
    out /= max(float(sub.std()), 1e-6)
    return out


def _bspline_weights(t: np.ndarray, n: int) -> np.ndarray:
    """len(t)×n matrix of cubic B-spline weights of the control points around each position t."""
    i = np.floor(t).astype(int)
    f = t - i
    w = np.zeros((len(t), n), np.float32)
    basis = [(1 - f) ** 3 / 6, (3 * f**3 - 6 * f**2 + 4) / 6, (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6, f**3 / 6]
    for k, b in enumerate(basis):
        np.add.at(w, (np.arange(len(t)), np.clip(i - 1 + k, 0, n - 1)), b)
    return w


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3×3 rotation about the x, y or z axis."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def chaikin(points: Sequence[Sequence[float]], iterations: int = 3) -> np.ndarray:
    """Smooth a polyline by corner cutting, keeping its end points."""
    p = np.asarray(points, dtype=np.float64)
    for _ in range(iterations):
        if len(p) < 3:
            break
        q = 0.75 * p[:-1] + 0.25 * p[1:]
        r = 0.25 * p[:-1] + 0.75 * p[1:]
        p = np.vstack([p[:1], np.column_stack([q, r]).reshape(-1, p.shape[1]), p[-1:]])
    return p


@dataclass
class Selection:
    """A boolean mask over a box of the canvas."""

    slices: tuple[slice, slice, slice]
    mask: np.ndarray


class Canvas:
    """Label and tissue volumes over a voxel grid whose voxel (i,j,k) sits at origin + (i,j,k)·spacing mm."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
                 rng: np.random.Generator, deform_cell_mm: float = 35.0):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.origin = np.asarray(origin, dtype=np.float64)
        self.label = np.zeros(self.shape, np.uint8)
        self.tissue = np.zeros(self.shape, np.uint8)
        self.deform = smooth_noise(rng, self.shape, self.spacing, deform_cell_mm)
        self.axes = [self.origin[a] + np.arange(self.shape[a]) * self.spacing[a] for a in range(3)]

    @property
    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) corners in mm of the voxel centres."""
        return self.origin, self.origin + (np.asarray(self.shape) - 1) * self.spacing

    def box(self, lo: Sequence[float], hi: Sequence[float]):
        """Slices and broadcastable x, y, z coordinates (mm) of the voxels inside [lo, hi], or None."""
        sl, coords = [], []
        for a in range(3):
            i0 = int(np.ceil((lo[a] - self.origin[a]) / self.spacing[a] - 1e-6))
            i1 = int(np.floor((hi[a] - self.origin[a]) / self.spacing[a] + 1e-6)) + 1
            i0, i1 = max(i0, 0), min(i1, self.shape[a])
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
            shp = [1, 1, 1]
            shp[a] = i1 - i0
            coords.append(self.axes[a][i0:i1].reshape(shp))
        return tuple(sl), coords

    def ellipsoid(self, center: Sequence[float], radii: Sequence[float], rot: np.ndarray | None = None,
                  deform: float = 0.12, clip: Clip | None = None, zpow: float = 2.0) -> Selection | None:
        """Voxels with Σ|u/r|^p < 1 + deform·noise, u = Rᵀ(p − c), p = 2 (p = zpow along z when not rotated:
        a large zpow gives a flat-ended cylinder); optionally intersected with clip(x, y, z)."""
        c, r = np.asarray(center, float), np.asarray(radii, float)
        reach = r.max() * np.sqrt(1 + 3 * deform) if rot is not None else r * np.sqrt(1 + 3 * deform)
        found = self.box(c - reach, c + reach)
        if found is None:
            return None
        sl, (x, y, z) = found
        d = [x - c[0], y - c[1], z - c[2]]
        if rot is None:
            q = (d[0] / r[0]) ** 2 + (d[1] / r[1]) ** 2 + np.abs(d[2] / r[2]) ** zpow
        else:
            q = sum(((rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]) / r[k]) ** 2 for k in range(3))
        mask = q < 1.0 + deform * self.deform[sl]
        if clip is not None:
            mask &= clip(x, y, z)
        return Selection(sl, mask) if mask.any() else None

    def tube(self, points: Sequence[Sequence[float]], radii: Sequence[float] | float,
             chunk: int = 6, clip: Clip | None = None) -> list[Selection]:
        """Voxels within r(t) of a polyline, r interpolated along each segment; one selection per chunk."""
        p = np.asarray(points, dtype=np.float64)
        r = np.atleast_1d(np.asarray(radii, dtype=np.float64))
        if len(r) != len(p):  # radii given at control points: spread them along the (smoothed) line
            r = np.interp(np.linspace(0, 1, len(p)), np.linspace(0, 1, len(r)), r)
        out = []
        for s0 in range(0, len(p) - 1, chunk):
            seg = range(s0, min(s0 + chunk, len(p) - 1))
            pts = p[s0: seg[-1] + 2]
            rmax = r[s0: seg[-1] + 2].max()
            found = self.box(pts.min(0) - rmax, pts.max(0) + rmax)
            if found is None:
                continue
            sl, (x, y, z) = found
            mask = np.zeros(tuple(s.stop - s.start for s in sl), bool)
            for i in seg:
                a, d = p[i], p[i + 1] - p[i]
                dd = max(float(d @ d), 1e-9)
                t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / dd, 0.0, 1.0)
                dist2 = (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2
                mask |= dist2 <= (r[i] + t * (r[i + 1] - r[i])) ** 2
            if clip is not None:
                mask &= clip(x, y, z)
            if mask.any():
                out.append(Selection(sl, mask))
        return out

    def paint(self, sel: Selection | list[Selection] | None, label: int | None, tissue: int,
              within: Sequence[int] | str | None = "body") -> int:
        """Set label (None keeps it) and tissue where selected; `within`: "body" (label ≠ 0), label ids, or None."""
        if sel is None:
            return 0
        if isinstance(sel, list):
            return sum(self.paint(s, label, tissue, within) for s in sel)
        lab = self.label[sel.slices]
        mask = sel.mask
        if within == "body":
            mask = mask & (lab != 0)
        elif within is not None:
            mask = mask & np.isin(lab, np.asarray(within, dtype=np.uint8))
        if label is not None:
            lab[mask] = label
        self.tissue[sel.slices][mask] = tissue
        return int(mask.sum())
