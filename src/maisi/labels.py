"""The MAISI label vocabulary (132 classes + body 200), modality codes, body regions, the CT HU window and
the quality rule (median HU per organ group), shared by generation, training and evaluation."""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

BODY = 200
BACKGROUND = 0
PLACEHOLDER_IDS = (2, 16, 18, 20, 21, 129, 130, 131)  # unused ids, free for new classes

# Body regions in the reference's order (REFERENCE §1.2, §3).
REGIONS: tuple[str, ...] = ("head_neck", "chest", "abdomen", "pelvis")
REGION_ALIASES = {
    "head": "head_neck", "neck": "head_neck", "head_neck": "head_neck", "head/neck": "head_neck",
    "chest": "chest", "thorax": "chest", "abdomen": "abdomen",
    "pelvis": "pelvis", "lower_body": "pelvis", "lower body": "pelvis",
}
# Label ids that mark each region's presence in a mask (REFERENCE §3).
REGION_MARKERS: dict[str, tuple[int, ...]] = {
    "head_neck": (22, 120),
    "chest": (28, 29, 30, 31, 32),
    "abdomen": (1, 2, 3, 4, 5, 14),
    "pelvis": (93, 94),
}
TUMOR_HOSTS: dict[int, int] = {23: 28, 24: 4, 26: 1, 27: 62, 128: 33}  # tumour id -> a host organ id
TUMOR_IDS: tuple[int, ...] = tuple(TUMOR_HOSTS)  # lung, pancreatic, hepatic tumour, colon cancer primaries, bone lesion

# The CT intensity window: HU [HU_MIN, HU_MAX] <-> [0, 1] in the autoencoder's image space.
HU_MIN, HU_MAX = -1000.0, 1000.0
HU_RANGE = (HU_MIN, HU_MAX)
HU_SPAN = HU_MAX - HU_MIN


def _load(name: str) -> Any:
    return json.loads(resources.files("maisi.resources").joinpath(name).read_text())


@lru_cache(maxsize=1)
def name_to_id() -> dict[str, int]:
    """Every class name (lower case) to its MAISI id, placeholders ("dummyN") left out."""
    return {k.lower(): int(v) for k, v in _load("label_dict.json").items() if not k.startswith("dummy")}


@lru_cache(maxsize=1)
def id_to_name() -> dict[int, str]:
    return {v: k for k, v in name_to_id().items()}


MODALITIES: dict[str, int] = {k.lower(): int(v) for k, v in _load("modality_mapping.json").items()}


def label_id(name_or_id: str | int) -> int:
    """The MAISI id of a class name (case-insensitive, '_' or ' ') or a valid id; errors suggest names."""
    if isinstance(name_or_id, int) or (isinstance(name_or_id, str) and name_or_id.strip().isdigit()):
        i = int(name_or_id)
        if i not in id_to_name():
            raise ValueError(
                f"label id {i} is not in the MAISI vocabulary (ids 1..132 without placeholders "
                f"{list(PLACEHOLDER_IDS)}, and {BODY} = body); see `maisi info labels`"
            )
        return i
    key = name_or_id.strip().lower().replace("_", " ")
    table = name_to_id()
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, list(table), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see `maisi info labels`"
    raise ValueError(f"unknown anatomy name {name_or_id!r}{hint}")


def label_name(i: int) -> str:
    if i == BACKGROUND:
        return "background"
    try:
        return id_to_name()[int(i)]
    except KeyError:
        raise ValueError(f"label id {i} is not in the MAISI vocabulary; see `maisi info labels`") from None


def modality_code(name_or_code: str | int) -> int:
    """A modality code from its name ("ct", "mri_t1", ...) or a known code."""
    if isinstance(name_or_code, int) or str(name_or_code).isdigit():
        code = int(name_or_code)
        if code not in MODALITIES.values():
            raise ValueError(f"unknown modality code {code}; known: {sorted(MODALITIES.values())}")
        return code
    key = str(name_or_code).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in MODALITIES:
        close = difflib.get_close_matches(key, list(MODALITIES), n=3)
        raise ValueError(f"unknown modality {name_or_code!r}; known: {sorted(MODALITIES)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    return MODALITIES[key]


def region_index(name: str) -> int:
    """0..3 for head_neck, chest, abdomen, pelvis (aliases accepted)."""
    key = name.strip().lower()
    if key not in REGION_ALIASES:
        raise ValueError(f"unknown body region {name!r}; choose from {list(REGIONS)}")
    return REGIONS.index(REGION_ALIASES[key])


def region_one_hot(index: int) -> list[float]:
    if not 0 <= index < len(REGIONS):
        raise ValueError(f"body region index must be in 0..{len(REGIONS) - 1}, got {index}")
    return [1.0 if i == index else 0.0 for i in range(len(REGIONS))]


def regions_in_mask(present_ids: set[int] | Any) -> tuple[int, int] | None:
    """(top, bottom) region indices from the label ids present in a mask, or None if no marker is present."""
    ids = {int(i) for i in present_ids}
    found = [i for i, r in enumerate(REGIONS) if ids & set(REGION_MARKERS[r])]
    return (found[0], found[-1]) if found else None


@lru_cache(maxsize=1)
def hu_quality_ranges() -> dict[str, tuple[float, float]]:
    """Allowed median HU per organ group (REFERENCE §3): [min(6σ low, p0.5), max(6σ high, p99.5)].

    As in the reference, bone has no upper bound below the HU ceiling (HU_MAX).
    """
    stats = _load("image_median_statistics_ct.json")
    out = {}
    for k, v in stats.items():
        low = min(v["sigma_6_low"], v["percentile_0_5"])
        high = HU_MAX if k == "bone" else max(v["sigma_6_high"], v["percentile_99_5"])
        out[k] = (float(low), float(high))
    return out


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
