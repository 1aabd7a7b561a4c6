"""Evaluation reports: one JSON + one Markdown file (tables of metrics) and PNG charts, written atomically."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maisi.evaluation import plots
from maisi.io.atomic import atomic_write_text


def _clean(x: Any) -> Any:
    """JSON-safe copy: numpy/torch scalars → float/int, NaN/inf → None, paths → str."""
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of dict rows (columns: given order, else the union in first-seen order)."""
    if not rows:
        return "_(no rows)_\n"
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


class Report:
    """Collects sections (text, tables, charts) and writes `<out>/<name>.json`, `<name>.md` and PNGs."""

    def __init__(self, out_dir: str | Path, name: str, title: str):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise NotADirectoryError(f"report folder {self.out_dir} is a file")
        self.name, self.title = name, title
        self.data: dict[str, Any] = {"title": title}
        self._md: list[str] = [f"# {title}\n"]

    def text(self, line: str) -> None:
        self._md.append(line.rstrip() + "\n")

    def table(self, heading: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
        self._md.append(f"## {heading}\n\n" + markdown_table(rows, columns))

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value

    def bar_chart(self, stem: str, values: Mapping[str, float], title: str, y_label: str = "",
                  y_max: float | None = None) -> Path:
        path = plots.bar_chart(values, self.out_dir / f"{self.name}_{stem}.png", title, y_label, y_max)
        self._image(title, path)
        return path

    def histogram(self, stem: str, series: Mapping[str, np.ndarray], title: str,
                  value_range: tuple[float, float] | None = None) -> Path:
        path = plots.histogram_overlay(series, self.out_dir / f"{self.name}_{stem}.png", title,
                                       value_range=value_range)
        self._image(title, path)
        return path

    def _image(self, title: str, path: Path) -> None:
        self._md.append(f"![{title}]({path.name})\n")
        self.data.setdefault("plots", []).append(path.name)

    def write(self) -> tuple[Path, Path]:
        """Write JSON then Markdown (each atomically); returns their paths."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        js = atomic_write_text(self.out_dir / f"{self.name}.json",
                               json.dumps(_clean(self.data), indent=2, sort_keys=False) + "\n")
        md = atomic_write_text(self.out_dir / f"{self.name}.md", "\n".join(self._md))
        return js, md
