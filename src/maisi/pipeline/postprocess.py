"""From decoder output to a CT volume in HU: clip, rescale, air outside the body, quality check."""

from __future__ import annotations

from typing import Any

import numpy as np

from maisi.evaluation.report import jsonable

HU_MIN, HU_MAX = -1000.0, 1000.0


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
    """Median HU per organ within the reference ranges (REFERENCE §3), via maisi.evaluation.quality.

    Returns {"passed": bool | None, "organs": {...}}; passed is None when there is no mask to check.
    """
    if label is None:
        return {"passed": None, "reason": "no mask: the per-organ check needs labels", "organs": {}}
    from maisi.evaluation.quality import quality_check

    result = quality_check(np.asarray(hu), np.asarray(label))
    return _as_dict(result)


def _as_dict(result: Any) -> dict[str, Any]:
    """The evaluation helper's result as plain JSON data (a dataclass, a dict, or a (passed, details) pair)."""
    import dataclasses

    if dataclasses.is_dataclass(result):
        result = dataclasses.asdict(result)
    if isinstance(result, tuple) and len(result) == 2:
        result = {"passed": bool(result[0]), "organs": result[1]}
    if not isinstance(result, dict) or "passed" not in result:
        raise TypeError(f"unexpected quality_check result {type(result).__name__}")
    return jsonable(result)
