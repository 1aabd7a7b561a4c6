"""The experiment's report: Markdown tables and PNG plots (Dice per arm with intervals, learning curves)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from maisi.evaluation.report import COLOURS, _font, markdown_table


def interval_chart(values: Mapping[str, tuple[float | None, float | None, float | None]], title: str,
                   ylabel: str = "Dice", width: int = 640, height: int = 360, ymax: float = 1.0) -> Image.Image:
    """A point and its interval (whisker) per arm: values = {arm: (mean, lo, hi)}."""
    img = Image.new("RGB", (width, height), "white")
    d, font = ImageDraw.Draw(img), _font()
    left, right, top, bottom = 60, 20, 36, 50
    h, w = height - top - bottom, width - left - right
    d.text((left, 10), title, fill="black", font=font)
    d.text((4, top - 14), ylabel, fill="black", font=font)
    d.line([(left, top), (left, top + h), (left + w, top + h)], fill="black")

    def y(v: float) -> float:
        return top + h - max(0.0, min(v / ymax, 1.0)) * h

    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.text((4, y(frac * ymax) - 6), f"{frac * ymax:.2g}", fill="black", font=font)
        d.line([(left, y(frac * ymax)), (left + w, y(frac * ymax))], fill=(225, 225, 225))
    slot = w / max(1, len(values))
    for i, (arm, (mean, lo, hi)) in enumerate(values.items()):
        x = left + (i + 0.5) * slot
        if mean is not None:
            if lo is not None and hi is not None:
                d.line([(x, y(lo)), (x, y(hi))], fill=COLOURS[1], width=2)
                d.line([(x - 8, y(lo)), (x + 8, y(lo))], fill=COLOURS[1], width=2)
                d.line([(x - 8, y(hi)), (x + 8, y(hi))], fill=COLOURS[1], width=2)
            d.ellipse([x - 4, y(mean) - 4, x + 4, y(mean) + 4], fill=COLOURS[0])
            d.text((x + 10, y(mean) - 6), f"{mean:.3f}", fill="black", font=font)
        d.text((x - 3 * len(arm), top + h + 6), arm, fill="black", font=font)
    return img


def curve_chart(curves: Mapping[str, Sequence[tuple[int, float]]], title: str, width: int = 640,
                height: int = 360) -> Image.Image:
    """Training loss against step, one line per arm (the mean over its seeds)."""
    img = Image.new("RGB", (width, height), "white")
    d, font = ImageDraw.Draw(img), _font()
    left, right, top, bottom = 60, 20, 50, 30
    h, w = height - top - bottom, width - left - right
    d.text((left, 6), title, fill="black", font=font)
    pts = [p for c in curves.values() for p in c]
    if not pts:
        return img
    smax = max(s for s, _ in pts)
    lmax = max(v for _, v in pts) * 1.05 or 1.0
    d.line([(left, top), (left, top + h), (left + w, top + h)], fill="black")
    d.text((4, top - 6), f"{lmax:.3g}", fill="black", font=font)
    d.text((4, top + h - 6), "0", fill="black", font=font)
    d.text((left + w - 60, top + h + 6), f"step {smax}", fill="black", font=font)
    for c, (arm, curve) in enumerate(curves.items()):
        colour = COLOURS[c % len(COLOURS)]
        xy = [(left + s / smax * w, top + h - v / lmax * h) for s, v in curve]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        d.text((left + 110 * c, 24), f"-- {arm}", fill=colour, font=font)
    return img


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The mean loss per step over the runs that logged that step."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for s, v in curve:
            by_step.setdefault(s, []).append(v)
    return [(s, float(np.mean(v))) for s, v in sorted(by_step.items())]


def _ci(s: dict, digits: int = 3) -> str:
    if s["mean"] is None:
        return "—"
    return f"{s['mean']:.{digits}f} [{s['ci'][0]:.{digits}f}, {s['ci'][1]:.{digits}f}]"


def markdown(result: dict) -> str:
    """The report: setup, then per metric a table of arm × class (mean [interval]) and of differences to baseline."""
    arms, classes = result["arms"], result["classes"]
    conf = int(round(result["statistics"]["confidence"] * 100))
    lines = ["# Does synthetic data help? Downstream segmentation\n",
             f"Real training cases: {result['real_cases']}; test cases: {result['test_cases']}; seeds per arm: "
             f"{result['seeds']}; synthetic pairs: {result['synthetic_source']}.",
             f"Segmenter: {result['recipe']['network']} ({result['recipe']['steps']} steps, batch "
             f"{result['recipe']['batch']}, patch {result['recipe']['patch']}).",
             f"Mean over test cases and seeds with a {conf}% bootstrap interval ({result['statistics']['resamples']} "
             f"resamples of test cases and seeds); differences are paired by test case and seed.\n"]
    header = ["arm", "train (real+synthetic)", *classes, "mean"]
    for metric, title in (("dice", "Dice (higher is better)"), ("hd95", "HD95 in mm (lower is better)")):
        rows = [[a, f"{v['n_real']}+{v['n_synthetic']}", *(_ci(v[metric][c], 3 if metric == "dice" else 1)
                                                           for c in [*classes, "mean"])] for a, v in arms.items()]
        lines += [f"## {title}\n", markdown_table(header, rows), ""]
        diff = [[a, f"{v['n_real']}+{v['n_synthetic']}", *(_ci(v[f"{metric}_vs_baseline"][c], 3 if metric == "dice" else 1)
                                                           for c in [*classes, "mean"])]
                for a, v in arms.items() if a != "baseline"]
        if diff:
            lines += [f"### {metric.upper() if metric == 'hd95' else 'Dice'}: arm − baseline\n",
                      markdown_table(header, diff), ""]
    return "\n".join(lines)
