"""Body regions and spans ("chest-abdomen") for phantoms and scans: parsing, atlas extents, mask derivation."""

from __future__ import annotations

import numpy as np

from maisi.labels import REGION_MARKERS, REGIONS, region_index, regions_in_mask

# Phantom atlas (mm, z = inferior→superior, 0 = top of L5). The "window" of a region is the z-range in
# which only its own markers (REFERENCE §3) appear: lungs 200–460, liver dome ≤ 285, kidneys ≥ 85,
# femoral heads ≤ −55, skull base ≥ 545. "centre" is where the field of view is centred by default.
REGION_WINDOW: dict[str, tuple[float, float]] = {
    "head_neck": (470.0, 760.0),
    "chest": (295.0, 540.0),
    "abdomen": (-45.0, 190.0),
    "pelvis": (-480.0, 75.0),
}
REGION_CENTRE: dict[str, float] = {"head_neck": 615.0, "chest": 385.0, "abdomen": 125.0, "pelvis": -70.0}
# Atlas z-range (mm) where each region's marker organs are reliably present, whatever the seed.
REGION_MARKER_Z: dict[str, tuple[float, float]] = {
    "head_neck": (580.0, 700.0), "chest": (250.0, 440.0), "abdomen": (110.0, 245.0), "pelvis": (-300.0, -75.0),
}


def parse_span(region: str) -> tuple[int, int]:
    """(top, bottom) region indices of "chest", "chest-abdomen", "head_neck-pelvis", ... (top first)."""
    if not isinstance(region, str) or not region.strip():
        raise ValueError(f"body region must be a name or a span like 'chest-abdomen'; choose from {list(REGIONS)}")
    parts = [p for p in region.strip().lower().replace(" ", "_").split("-") if p]
    if len(parts) not in (1, 2):
        raise ValueError(f"body region {region!r}: expected one region or 'top-bottom', e.g. 'chest-abdomen'")
    idx = [region_index(p) for p in parts]
    top, bottom = idx[0], idx[-1]
    if top > bottom:
        raise ValueError(
            f"body region span {region!r} goes upwards; write the top region first "
            f"({REGIONS[bottom]}-{REGIONS[top]})"
        )
    return top, bottom


def span_name(top: int, bottom: int) -> str:
    return REGIONS[top] if top == bottom else f"{REGIONS[top]}-{REGIONS[bottom]}"


def span_window(top: int, bottom: int) -> tuple[float, float]:
    """Atlas z-range (mm) in which only markers of regions top..bottom appear."""
    return REGION_WINDOW[REGIONS[bottom]][0], REGION_WINDOW[REGIONS[top]][1]


def span_centre(top: int, bottom: int) -> tuple[float, float]:
    """(centre z, shortest field of view in mm along z) that shows the markers of both ends of a span."""
    if top == bottom:
        return REGION_CENTRE[REGIONS[top]], 0.0
    low, high = REGION_MARKER_Z[REGIONS[bottom]][1], REGION_MARKER_Z[REGIONS[top]][0]
    return 0.5 * (low + high), max(high - low, 0.0) + 30.0


def foreign_markers(top: int, bottom: int) -> tuple[int, ...]:
    """Marker label ids of the regions outside top..bottom."""
    return tuple(i for k, r in enumerate(REGIONS) if not top <= k <= bottom for i in REGION_MARKERS[r])


def region_from_label(label: np.ndarray) -> tuple[int, int] | None:
    """(top, bottom) region indices from the labels present in a mask (REFERENCE §3), or None."""
    return regions_in_mask(np.unique(np.asarray(label)).tolist())
