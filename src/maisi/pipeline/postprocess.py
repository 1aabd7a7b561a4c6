"""From decoder output to a CT volume in HU: clip, rescale, air outside the body, quality check."""

from __future__ import annotations

from typing import Any

import numpy as np

from maisi.io.jsondata import jsonable
from maisi.labels import HU_MAX, HU_MIN, quality_check


def to_hu(image01: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Decoder output in [0, 1] (clipped) → HU [−1000, 1000]; voxels where the mask is 0 become air."""
    hu = np.clip(np.asarray(image01, np.float32), 0.0, 1.0) * (HU_MAX - HU_MIN) + HU_MIN
    if mask is not None:
        if np.shape(mask) != hu.shape:
            raise ValueError(f"mask shape {np.shape(mask)} differs from the image shape {hu.shape}")
        hu[np.asarray(mask) == 0] = HU_MIN
    return hu


def to_int16(hu: np.ndarray) -> np.ndarray:
    return np.round(np.clip(hu, HU_MIN, HU_MAX)).astype(np.int16)


def check_quality(hu: np.ndarray, label: np.ndarray | None) -> dict[str, Any]:
    """Median HU per organ within the reference ranges (REFERENCE §3), via maisi.labels.quality_check.

    Returns {"passed": bool | None, "organs": {...}}; passed is None when there is no mask to check.
    """
    if label is None:
        return {"passed": None, "reason": "no mask: the per-organ check needs labels", "organs": {}}
    return jsonable(quality_check(np.asarray(hu), np.asarray(label)))
