"""PNG charts for evaluation reports drawn with Pillow (bar charts, overlaid histograms); atomic writes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maisi.io.atomic import atomic_path

COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
_W, _H = 640, 400
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 40, 70


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _nice_max(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k that is ≥ v (axis top)."""
    if not np.isfinite(v) or v <= 0:
        return 1.0
    e = 10 ** np.floor(np.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * e >= v:
            return float(m * e)
    return float(10 * e)


def _axes(draw: ImageDraw.ImageDraw, title: str, y_label: str, y_lo: float, y_hi: float) -> None:
    f = _font()
    draw.text((_LEFT, 10), title, fill="black", font=f)
    draw.text((5, _TOP - 18), y_label, fill="black", font=f)
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _H - _BOTTOM, _TOP
    draw.line([(x0, y0), (x1, y0)], fill="black")
    draw.line([(x0, y0), (x0, y1)], fill="black")
    for k in range(5):
        v = y_lo + (y_hi - y_lo) * k / 4
        y = y0 - (y0 - y1) * k / 4
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        draw.line([(x0 + 1, y), (x1, y)], fill=(225, 225, 225))
        draw.text((5, y - 6), f"{v:.4g}", fill="black", font=f)


def _save(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return path


def bar_chart(values: Mapping[str, float], path: str | Path, title: str, y_label: str = "",
              y_max: float | None = None) -> Path:
    """One bar per key (label under it, value above it); non-finite values are drawn as 'n/a'."""
    if not values:
        raise ValueError("bar chart needs at least one value")
    vals = {k: float(v) for k, v in values.items()}
    finite = [v for v in vals.values() if np.isfinite(v)]
    if any(v < 0 for v in finite):
        raise ValueError("bar chart values must be >= 0")
    top = y_max if y_max is not None else _nice_max(max(finite, default=1.0))
    img = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(img)
    _axes(draw, title, y_label, 0.0, top)
    f = _font()
    n = len(vals)
    slot = (_W - _RIGHT - _LEFT) / n
    y0, y1 = _H - _BOTTOM, _TOP
    for i, (name, v) in enumerate(vals.items()):
        cx = _LEFT + slot * (i + 0.5)
        half = max(2.0, slot * 0.35)
        if np.isfinite(v):
            h = (y0 - y1) * min(v, top) / top
            draw.rectangle([cx - half, y0 - h, cx + half, y0], fill=COLORS[i % len(COLORS)])
            draw.text((cx - half, y0 - h - 14), f"{v:.3g}", fill="black", font=f)
        else:
            draw.text((cx - half, y0 - 14), "n/a", fill="black", font=f)
        draw.text((cx - half, y0 + 6 + 12 * (i % 2 if n > 8 else 0)), name[:14], fill="black", font=f)
    return _save(img, path)


def histogram_overlay(series: Mapping[str, Sequence[float] | np.ndarray], path: str | Path, title: str,
                      bins: int = 50, value_range: tuple[float, float] | None = None,
                      x_label: str = "HU") -> Path:
    """Normalised histograms (density) of several samples as outlined step curves in one chart."""
    data = {k: np.asarray(v, np.float64).ravel() for k, v in series.items()}
    data = {k: v[np.isfinite(v)] for k, v in data.items()}
    if not data or all(v.size == 0 for v in data.values()):
        raise ValueError("histogram needs at least one non-empty series")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if value_range is None:
        allv = np.concatenate([v for v in data.values() if v.size])
        lo, hi = float(allv.min()), float(allv.max())
        value_range = (lo, hi if hi > lo else lo + 1.0)
    edges = np.linspace(value_range[0], value_range[1], bins + 1)
    hists = {k: (np.histogram(v, edges, density=True)[0] if v.size else np.zeros(bins)) for k, v in data.items()}
    top = _nice_max(max(float(h.max()) for h in hists.values()))
    img = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(img)
    _axes(draw, title, "density", 0.0, top)
    f = _font()
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _H - _BOTTOM, _TOP
    px = x0 + (x1 - x0) * (edges - edges[0]) / (edges[-1] - edges[0])
    for i, (name, h) in enumerate(hists.items()):
        color = COLORS[i % len(COLORS)]
        ys = y0 - (y0 - y1) * np.minimum(h, top) / top
        pts = [(px[0], y0)]
        for j in range(bins):
            pts += [(px[j], ys[j]), (px[j + 1], ys[j])]
        pts.append((px[-1], y0))
        draw.line(pts, fill=color, width=2)
        draw.rectangle([x1 - 150, y1 + 4 + 16 * i, x1 - 138, y1 + 14 + 16 * i], fill=color)
        draw.text((x1 - 132, y1 + 3 + 16 * i), f"{name[:16]} (n={data[name].size})", fill="black", font=f)
    for k in range(5):
        v = edges[0] + (edges[-1] - edges[0]) * k / 4
        x = x0 + (x1 - x0) * k / 4
        draw.line([(x, y0), (x, y0 + 4)], fill="black")
        draw.text((x - 14, y0 + 8), f"{v:.4g}", fill="black", font=f)
    draw.text(((x0 + x1) / 2 - 10, y0 + 30), x_label, fill="black", font=f)
    return _save(img, path)
