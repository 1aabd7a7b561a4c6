"""Quality check (REFERENCE §3): the median HU of each organ group must fall in the reference range."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from maisi.labels import hu_quality_ranges

# Organ group → MAISI label ids (lungs: the five lobes; bone: vertebrae incl. S1, ribs, shoulder girdle and
# humeri, femurs, hips, sacrum, skull, sternum; costal cartilage and bone lesions are not bone here).
QUALITY_GROUPS: dict[str, tuple[int, ...]] = {
    "liver": (1,),
    "spleen": (3,),
    "pancreas": (4,),
    "kidney": (5, 14),
    "lung": tuple(range(28, 33)),
    "bone": (*range(33, 57), 127, *range(63, 87), *range(87, 98), 120, 122),
    "brain": (22,),
}


def quality_check(image_hu: np.ndarray, label: np.ndarray, min_voxels: int = 1,
                  groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-group median HU of `image_hu` inside `label` against hu_quality_ranges().

    Returns {"passed": bool | None, "failed": [groups], "organs": {group: {labels, voxels, median_hu, range,
    passed}}}; groups absent from the label map (fewer than min_voxels voxels) are not judged. passed is True
    when at least one group was judged and none is out of range, and None ("not checked", with a "reason")
    when the label map holds none of the groups: nothing measured is never reported as a pass."""
    image_hu, label = np.asarray(image_hu), np.asarray(label)
    if image_hu.shape != label.shape:
        raise ValueError(f"image shape {image_hu.shape} differs from the label map's {label.shape}")
    ranges = hu_quality_ranges()
    organs: dict[str, Any] = {}
    for name in groups or QUALITY_GROUPS:
        if name not in QUALITY_GROUPS:
            raise ValueError(f"unknown organ group {name!r}; choose from {list(QUALITY_GROUPS)}")
        inside = np.isin(label, QUALITY_GROUPS[name])
        n = int(inside.sum())
        if n < min_voxels:
            continue
        median = float(np.median(image_hu[inside]))
        lo, hi = ranges[name]
        organs[name] = {"labels": sorted({int(v) for v in np.unique(label[inside])}), "voxels": n,
                        "median_hu": round(median, 2), "range": [round(lo, 2), round(hi, 2)],
                        "passed": bool(lo <= median <= hi)}
    if not organs:
        return {"passed": None, "failed": [], "organs": {},
                "reason": f"not checked: the label map holds none of the organ groups {list(groups or QUALITY_GROUPS)}"}
    failed = [k for k, v in organs.items() if not v["passed"]]
    return {"passed": not failed, "failed": failed, "organs": organs}


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
