"""PNG montage of a CT volume: three orthogonal mid-planes in a HU window, with an optional label overlay."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from maisi.io.atomic import atomic_write
from maisi.labels import BODY, HU_RANGE


def label_colours() -> np.ndarray:
    """256×3 uint8 palette: distinct hues per id (golden-ratio steps), 0 and 200 (body) transparent black."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(1, 256):
        h = (i * 0.618034) % 1.0
        pal[i] = [int(255 * v) for v in colorsys.hsv_to_rgb(h, 0.85, 1.0)]
    pal[BODY] = 0
    return pal


def _planes(vol: np.ndarray, index: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices of an RAS X×Y×Z array in radiological display orientation."""
    i, j, k = index
    axial = vol[::-1, ::-1, k].T  # rows: anterior at top; columns: patient right on the left
    coronal = vol[::-1, j, ::-1].T  # rows: superior at top
    sagittal = vol[i, ::-1, ::-1].T  # columns: anterior on the left
    return [axial, coronal, sagittal]


def _panel_sizes(shape: Sequence[int], spacing: Sequence[float], height: int) -> list[tuple[int, int]]:
    """(width, height) in pixels of each panel so that one pixel covers equal mm in both directions."""
    mm = np.asarray(shape) * np.asarray(spacing)
    scale = height / max(mm[1], mm[2])
    dims = [(mm[0], mm[1]), (mm[0], mm[2]), (mm[1], mm[2])]
    return [(max(1, round(w * scale)), max(1, round(h * scale))) for w, h in dims]


def render_preview(
    image_hu: np.ndarray,
    label: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    window: tuple[float, float] = HU_RANGE,
    alpha: float = 0.35,
    height: int = 256,
    index: Sequence[int] | None = None,
    with_plain: bool = False,
) -> Image.Image:
    """An RGB montage (axial | coronal | sagittal) of X×Y×Z RAS arrays, honouring the voxel aspect ratio.

    Radiological display: patient right on the left, anterior at the top (axial), superior at the top.
    With a label and `with_plain`, the plain image row is stacked above the overlay row.
    """
    image_hu = np.asarray(image_hu)
    if image_hu.ndim != 3:
        raise ValueError(f"preview needs a 3D X×Y×Z image, got shape {image_hu.shape}")
    if label is not None and np.shape(label) != image_hu.shape:
        raise ValueError(f"label shape {np.shape(label)} differs from image shape {image_hu.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive values, got {list(spacing)}")
    lo, hi = window
    index = [s // 2 for s in image_hu.shape] if index is None else list(index)
    gray = _planes(np.clip((image_hu.astype(np.float32) - lo) / (hi - lo), 0, 1), index)
    labs = _planes(np.asarray(label).astype(np.uint8), index) if label is not None else [None] * 3
    row = _row(gray, labs, _panel_sizes(image_hu.shape, spacing, height), alpha)
    if label is None or not with_plain:
        return row
    plain = _row(gray, [None] * 3, _panel_sizes(image_hu.shape, spacing, height), alpha)
    out = Image.new("RGB", (row.width, 2 * row.height + 4))
    out.paste(plain, (0, 0))
    out.paste(row, (0, row.height + 4))
    return out


def _row(gray, labs, sizes, alpha: float) -> Image.Image:
    pal = label_colours()
    panels = []
    for g, lab, size in zip(gray, labs, sizes):
        rgb = np.repeat((g * 255)[..., None], 3, axis=2)
        if lab is not None:
            on = (lab != 0) & (lab != BODY)
            rgb[on] = (1 - alpha) * rgb[on] + alpha * pal[lab[on]]
        panel = Image.fromarray(rgb.astype(np.uint8), "RGB")
        panels.append(panel.resize(size, Image.NEAREST if lab is not None else Image.BILINEAR))
    gap = 4
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), max(p.height for p in panels)))
    x = 0
    for p in panels:
        out.paste(p, (x, (out.height - p.height) // 2))
        x += p.width + gap
    return out


def save_preview(path: str | Path, image_hu: np.ndarray, label: np.ndarray | None = None,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), **kwargs) -> Path:
    """Write `render_preview(...)` as a PNG atomically (see `render_preview` for the options)."""
    img = render_preview(image_hu, label, spacing, **kwargs)
    return atomic_write(path, lambda p: img.save(p, format="PNG", optimize=True), suffix=".png")
