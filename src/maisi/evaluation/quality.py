"""Quality across volumes; the per-volume rule (REFERENCE §3) is maisi.labels.quality_check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def summarise_quality(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Across volumes: how many passed and how many could not be checked, and per group the number
    checked/failed and the median-HU spread."""
    per_group: dict[str, dict[str, Any]] = {}
    for r in reports:
        for name, o in r["organs"].items():
            g = per_group.setdefault(name, {"checked": 0, "failed": 0, "medians": [], "range": o["range"]})
            g["checked"] += 1
            g["failed"] += int(not o["passed"])
            g["medians"].append(o["median_hu"])
    for g in per_group.values():
        m = np.asarray(g.pop("medians"))
        g["median_hu_min"], g["median_hu_max"] = float(m.min()), float(m.max())
    return {"volumes": len(reports), "passed": sum(r["passed"] is True for r in reports),
            "not_checked": sum(r["passed"] is None for r in reports), "groups": per_group}
