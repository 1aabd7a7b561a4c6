"""Evaluation reports: JSON + Markdown and simple PNG charts drawn with PIL (bars, paired histograms)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maisi.io.atomic import atomic_path, atomic_write_text
from maisi.io.jsondata import jsonable
from maisi.labels import HU_MAX, HU_MIN

COLOURS = ((66, 133, 244), (234, 67, 53), (52, 168, 83), (251, 188, 5))


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def bar_chart(values: Mapping[str, float], title: str, ylabel: str = "", width: int = 640, height: int = 360,
              ymax: float | None = None) -> Image.Image:
    """Vertical bars with their values printed above; NaN/None bars are left empty."""
    img = Image.new("RGB", (width, height), "white")
    d, font = ImageDraw.Draw(img), _font()
    left, right, top, bottom = 60, 20, 36, 70
    d.text((left, 10), title, fill="black", font=font)
    if ylabel:
        d.text((4, top - 14), ylabel, fill="black", font=font)
    vals = [(k, None if v is None or not np.isfinite(v) else float(v)) for k, v in values.items()]
    finite = [v for _, v in vals if v is not None]
    top_val = ymax if ymax is not None else (max(finite) * 1.1 if finite and max(finite) > 0 else 1.0)
    h = height - top - bottom
    d.line([(left, top), (left, top + h), (width - right, top + h)], fill="black")
    for frac in (0.0, 0.5, 1.0):
        y = top + h - frac * h
        d.text((4, y - 6), f"{frac * top_val:.3g}", fill="black", font=font)
    n = max(1, len(vals))
    slot = (width - left - right) / n
    for i, (k, v) in enumerate(vals):
        x0 = left + i * slot + slot * 0.15
        x1 = left + (i + 1) * slot - slot * 0.15
        if v is not None:
            y0 = top + h - max(0.0, min(v / top_val, 1.0)) * h
            d.rectangle([x0, y0, x1, top + h], fill=COLOURS[0])
            d.text((x0, y0 - 12), f"{v:.3g}", fill="black", font=font)
        d.text((x0, top + h + 4 + (i % 3) * 12), str(k)[:14], fill="black", font=font)
    return img


def histogram_chart(series: Mapping[str, np.ndarray], title: str, lo: float = HU_MIN, hi: float = HU_MAX,
                    bins: int = 50, width: int = 480, height: int = 260) -> Image.Image:
    """Normalised histograms of several value sets as overlaid step lines (one colour each, legend on top)."""
    img = Image.new("RGB", (width, height), "white")
    d, font = ImageDraw.Draw(img), _font()
    left, right, top, bottom = 40, 16, 40, 30
    d.text((left, 6), title, fill="black", font=font)
    edges = np.linspace(lo, hi, bins + 1)
    hists = {k: np.histogram(np.clip(v, lo, hi), edges)[0] / max(1, len(v)) for k, v in series.items() if len(v)}
    peak = max((h.max() for h in hists.values()), default=1.0) or 1.0
    w, h = width - left - right, height - top - bottom
    d.line([(left, top), (left, top + h), (left + w, top + h)], fill="black")
    d.text((left, top + h + 4), f"{lo:g}", fill="black", font=font)
    d.text((left + w - 30, top + h + 4), f"{hi:g} HU", fill="black", font=font)
    for c, (name, hist) in enumerate(hists.items()):
        colour = COLOURS[c % len(COLOURS)]
        pts = []
        for b, v in enumerate(hist):
            y = top + h - v / peak * h
            pts += [(left + b * w / bins, y), (left + (b + 1) * w / bins, y)]
        d.line(pts, fill=colour, width=2)
        d.text((left + 120 * c, 20), f"-- {name}", fill=colour, font=font)
    return img


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out_dir: str | Path, name: str, data: dict[str, Any], markdown: str,
                 plots: Mapping[str, Image.Image] | None = None) -> list[Path]:
    """Write <name>.json, <name>.md and <name>_<plot>.png atomically into out_dir; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, img in (plots or {}).items():
        p = out / f"{name}_{key}.png"
        with atomic_path(p, suffix=".png") as tmp:
            img.save(tmp, format="PNG")
        paths.append(p)
        markdown += f"\n\n![{key}]({p.name})"
    paths.append(atomic_write_text(out / f"{name}.json", json.dumps(jsonable(data), indent=2) + "\n"))
    paths.append(atomic_write_text(out / f"{name}.md", markdown.rstrip() + "\n"))
    return paths
