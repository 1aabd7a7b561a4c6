"""Procedural CT phantoms with MAISI labels: `make_phantom(region=..., size=..., spacing=..., seed=...)`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from maisi.data.phantom_organs import LUNG_IDS, TISSUES, Anatomy, T
from maisi.data.regions import (
    foreign_markers,
    parse_span,
    region_from_label,
    span_centre,
    span_name,
    span_window,
)
from maisi.data.shapes import Canvas, smooth_noise
from maisi.io.atomic import atomic_write_text
from maisi.io.volume import affine_from_spacing, write_volume
from maisi.labels import BODY, label_id, label_name

# Tumour label -> (host label ids, tissue, radius range mm).
TUMORS: dict[int, tuple[tuple[int, ...], str, tuple[float, float]]] = {
    23: (LUNG_IDS, "tumor_lung", (7.0, 16.0)),
    24: ((4,), "tumor_pancreas", (6.0, 11.0)),
    26: ((1,), "tumor_liver", (8.0, 20.0)),
    27: ((62,), "soft", (8.0, 14.0)),
    128: (tuple(range(33, 57)) + (127,), "lesion", (5.0, 10.0)),
}
NOISE_HU = 14.0  # scanner noise standard deviation
# Organs whose size `organ_scale` can set: liver, spleen, pancreas, kidneys, gallbladder, stomach, bladder, colon.
SCALABLE_ORGANS = (1, 3, 4, 5, 10, 12, 14, 15, 62)
ORGAN_SCALE_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class Phantom:
    """A synthetic CT: HU image and MAISI label map (X×Y×Z, RAS), with its affine and region span."""

    image: np.ndarray  # float32 HU
    label: np.ndarray  # uint8 MAISI ids, 200 = body
    affine: np.ndarray  # 4×4 voxel -> RAS mm
    spacing: tuple[float, float, float]
    region: str  # "chest" or a span "chest-abdomen"
    top_region_index: int
    bottom_region_index: int
    seed: int


def _triple(v: Sequence[float] | float, name: str, cast=float) -> tuple:
    vals = (v,) * 3 if np.isscalar(v) else tuple(v)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ValueError(f"{name} needs 1 or 3 values, got {len(vals)}")
    return tuple(cast(x) for x in vals)


def make_phantom(
    region: str = "chest",
    size: Sequence[int] | int = (128, 128, 128),
    spacing: Sequence[float] | float = (1.5, 1.5, 1.5),
    seed: int = 0,
    tumors: Sequence[str | int] = (),
    noise: bool = True,
    exclusive: bool = True,
    tumor_radius_mm: tuple[float, float] | None = None,
    organ_scale: Mapping[str | int, tuple[float, float]] | None = None,
) -> Phantom:
    """A random CT phantom of a body region (or span "top-bottom") in RAS with voxel size `spacing` mm.

    The field of view is size·spacing mm, centred on the region. With `exclusive` (default) the labels'
    body region (REFERENCE §3 markers) equals the requested one: marker organs of other regions that
    reach into a large field of view keep their look but are labelled body (200). Without it they keep
    their labels and `region` is the span the labels show. Each tumour's radius is drawn from
    `tumor_radius_mm` (min, max), or from its type's own range in TUMORS, and is capped by the depth of
    the host organ at the tumour's centre. `organ_scale` {organ name or id: (min, max)} multiplies each named
    organ's radii by a factor drawn from (min, max), and keeps the organ inside the trunk's muscle wall: its
    volume grows about as the cube until the diaphragm and the wall stop it. The factors come from their own
    stream (seed, organ id), so the rest of the phantom is that of the same seed without them. Deterministic per
    seed.
    """
    size = _triple(size, "size", int)
    spacing = _triple(spacing, "spacing")
    if min(size) < 8 or max(size) > 1024:
        raise ValueError(f"size must be 8..1024 voxels per axis, got {list(size)}")
    if min(spacing) <= 0 or max(spacing) > 20:
        raise ValueError(f"spacing must be in (0, 20] mm, got {list(spacing)}")
    top, bottom = parse_span(region)
    tumor_ids = [label_id(t.replace("_", " ") if isinstance(t, str) else t) for t in tumors]
    for t in tumor_ids:
        if t not in TUMORS:
            raise ValueError(f"tumour {label_name(t)!r} is not supported; choose from "
                             f"{[label_name(i).replace(' ', '_') for i in TUMORS]}")
    if tumor_radius_mm is not None and not (len(tumor_radius_mm) == 2
                                            and 0 < tumor_radius_mm[0] <= tumor_radius_mm[1] <= 100):
        raise ValueError(f"tumor_radius_mm must be (min, max) with 0 < min <= max <= 100 mm, got {tumor_radius_mm}")
    scale = {i: float(np.random.default_rng([seed, i]).uniform(lo, hi))
             for i, (lo, hi) in _organ_scale(organ_scale).items()}
    rng = np.random.default_rng(seed)
    anatomy = Anatomy(rng, scale)

    # Field of view: centred on the span, shifted to stay inside its exclusive window when it fits.
    fov = np.asarray(size) * np.asarray(spacing)
    lo_w, hi_w = span_window(top, bottom)
    zc, need = span_centre(top, bottom)
    if fov[2] < need:
        raise ValueError(f"a {span_name(top, bottom)} phantom needs at least {need:.0f} mm along z to show both "
                         f"regions' marker organs; size·spacing gives {fov[2]:.0f} mm")
    zc += rng.normal(0, 6)
    if fov[2] <= hi_w - lo_w:
        zc = float(np.clip(zc, lo_w + fov[2] / 2, hi_w - fov[2] / 2))
    centre = np.array([rng.normal(0, 5), rng.normal(-5, 5), zc])
    origin = centre - (fov - np.asarray(spacing)) / 2
    canvas = Canvas(size, spacing, origin, rng)
    anatomy.draw(canvas)

    if exclusive:  # keep the derived region equal to the request (see docstring)
        canvas.label[np.isin(canvas.label, foreign_markers(top, bottom))] = BODY
    else:
        top, bottom = region_from_label(canvas.label) or (top, bottom)
    for t in tumor_ids:
        _add_tumor(canvas, t, rng, tumor_radius_mm)
    if region_from_label(canvas.label) != (top, bottom):
        got = region_from_label(canvas.label)
        raise ValueError(
            f"a {span_name(top, bottom)} phantom of {[float(f) for f in fov.round(1)]} mm shows "
            f"{'no region markers' if got is None else span_name(*got)}; use a larger size or spacing"
        )
    image = _render(canvas, rng, noise)
    return Phantom(image, canvas.label, affine_from_spacing(spacing, origin=origin), spacing,
                   span_name(top, bottom), top, bottom, int(seed))


def _organ_scale(organ_scale: Mapping[str | int, tuple[float, float]] | None) -> dict[int, tuple[float, float]]:
    """{label id: (min, max)} of a make_phantom organ_scale, checked."""
    out = {}
    lo_ok, hi_ok = ORGAN_SCALE_RANGE
    names = [label_name(i) for i in SCALABLE_ORGANS]
    for organ, span in (organ_scale or {}).items():
        try:
            i, hint = label_id(organ), ""
        except ValueError as e:  # not a MAISI name: keep its "did you mean"
            i, hint = None, f" ({e})"
        if i not in SCALABLE_ORGANS:
            raise ValueError(f"organ_scale: {organ!r} cannot be scaled; choose from {names}{hint}")
        if not (len(span) == 2 and lo_ok <= span[0] <= span[1] <= hi_ok):
            raise ValueError(f"organ_scale[{organ!r}] must be (min, max) with {lo_ok} <= min <= max <= {hi_ok}, "
                             f"got {tuple(span)}")
        out[i] = (float(span[0]), float(span[1]))
    return out


def _add_tumor(c: Canvas, tumor: int, rng: np.random.Generator,
               radius_mm: tuple[float, float] | None = None) -> None:
    hosts, tissue, own = TUMORS[tumor]
    rmin, rmax = radius_mm or own
    inside = np.isin(c.label, hosts)
    # Candidate centres: host voxels at least a few mm from the host's edge.
    depth = ndimage.distance_transform_edt(inside, sampling=c.spacing)
    cand = np.argwhere(depth >= min(rmin, depth.max() * 0.6)) if inside.any() else np.empty((0, 3))
    if len(cand) == 0:
        raise ValueError(f"cannot place a {label_name(tumor)}: its host organ "
                         f"({', '.join(label_name(h) for h in hosts[:3])}...) is not in this field of view")
    ijk = cand[rng.integers(len(cand))]
    radius = min(rng.uniform(rmin, rmax), max(float(depth[tuple(ijk)]) * 1.2, 2 * float(c.spacing.max())))
    centre = c.origin + ijk * c.spacing
    sel = c.ellipsoid(centre, radius * rng.uniform(0.85, 1.15, 3), deform=0.25)
    host = int(c.label[tuple(ijk)])
    if c.paint(sel, tumor, T[tissue], within=(host,)) == 0:
        c.label[tuple(ijk)], c.tissue[tuple(ijk)] = tumor, T[tissue]


def _render(c: Canvas, rng: np.random.Generator, noise: bool) -> np.ndarray:
    """HU = tissue mean + amplitude·smooth texture, blurred by the scanner PSF, plus scanner noise."""
    means = np.array([v[0] for v in TISSUES.values()], np.float32)
    amps = np.array([v[1] for v in TISSUES.values()], np.float32)
    texture = 0.75 * smooth_noise(rng, c.shape, c.spacing, 30.0) + 0.66 * smooth_noise(rng, c.shape, c.spacing, 8.0)
    image = means[c.tissue] + amps[c.tissue] * texture
    sigma = np.clip(0.6 / c.spacing, 0.2, 1.0)  # ~0.6 mm point spread, at least a fraction of a voxel
    image = ndimage.gaussian_filter(image, sigma, mode="nearest")
    if noise:
        image += rng.normal(0.0, NOISE_HU, c.shape).astype(np.float32)
    return np.clip(image, -1024, 3071).astype(np.float32)


def write_phantom(phantom: Phantom, folder: str | Path, name: str) -> dict:
    """Write `<name>_image.nii.gz` (int16 HU) and `<name>_label.nii.gz` (uint8); return its datalist entry."""
    folder = Path(folder)
    image, label = folder / f"{name}_image.nii.gz", folder / f"{name}_label.nii.gz"
    write_volume(image, phantom.image, phantom.affine, np.int16)
    write_volume(label, phantom.label, phantom.affine, np.uint8)
    return {
        "image": image.name, "label": label.name, "dim": list(phantom.image.shape),
        "spacing": [float(s) for s in phantom.spacing],
        "top_region_index": _one_hot(phantom.top_region_index),
        "bottom_region_index": _one_hot(phantom.bottom_region_index),
        "region": phantom.region, "seed": phantom.seed, "modality": "ct",
    }


def _one_hot(i: int) -> list[int]:
    return [int(k == i) for k in range(4)]


def write_datalist(path: str | Path, entries: list[dict], key: str = "training") -> Path:
    """Write {key: entries} as JSON atomically (paths relative to the datalist's folder)."""
    return atomic_write_text(path, json.dumps({key: entries}, indent=2) + "\n")
