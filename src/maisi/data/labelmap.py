"""Label maps into the MAISI vocabulary: name/id mappings (e.g. TotalSegmentator), body envelope, regions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from maisi.labels import BODY, label_id, name_to_id

ALIASES = {"urinary bladder": "bladder", "kidney left": "left kidney", "kidney right": "right kidney"}
AIR_HU = -800.0


@dataclass
class Conversion:
    """The converted map and what happened to each source label."""

    label: np.ndarray
    mapped: dict[int, int] = field(default_factory=dict)  # source id -> MAISI id
    unmapped: dict[int, int] = field(default_factory=dict)  # source id -> voxel count (set to background)

    def summary(self, names: Mapping[int, str] | None = None) -> str:
        if not self.unmapped:
            return f"all {len(self.mapped)} source labels mapped"
        parts = [f"{i}" + (f" ({names[i]})" if names and i in names else "") + f": {n} voxels"
                 for i, n in sorted(self.unmapped.items())]
        return f"{len(self.unmapped)} unmapped source labels set to background: " + "; ".join(parts)


def match_name(name: str) -> int | None:
    """The MAISI id of a TotalSegmentator-style name ("kidney_right", "rib_left_3", "vertebrae_L1"), or None."""
    words = name.strip().lower().replace("-", " ").replace("_", " ").split()
    key = " ".join(words)
    key = ALIASES.get(key, key)
    table = name_to_id()
    if key in table:
        return table[key]
    sides = [w for w in words if w in ("left", "right")]
    if len(sides) == 1:  # "lung_upper_lobe_left" -> "left lung upper lobe"
        moved = " ".join([sides[0]] + [w for w in words if w != sides[0]])
        return table.get(ALIASES.get(moved, moved))
    return None


def load_mapping(path: str | Path) -> dict[str, int]:
    """Read a JSON {"source name or id": "MAISI name or id"}; every target must be a MAISI label (or 0)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON object {{source: MAISI name or id}}")
    out = {}
    for src, dst in raw.items():
        try:
            out[str(src).strip().lower()] = target_id(dst)
        except ValueError as e:
            raise ValueError(f"{path}: entry {src!r}: {e}") from e
    return out


def target_id(value: str | int) -> int:
    """A mapping target: a MAISI name or id, or 0 / "background"."""
    if value in (0, "0") or str(value).strip().lower() == "background":
        return 0
    if not isinstance(value, int | str):
        raise ValueError(f"target {value!r} must be a MAISI name or id")
    return label_id(value)


def load_names(path: str | Path) -> dict[int, str]:
    """Read a source class table: JSON {id: name} or {name: id} (either direction is accepted)."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of id -> class name")
    out = {}
    for k, v in raw.items():
        if str(k).strip().isdigit():
            out[int(k)] = str(v)
        elif str(v).strip().isdigit():
            out[int(v)] = str(k)
        else:
            raise ValueError(f"{path}: entry {k!r}: {v!r} has no integer id")
    return out


def convert_labels(
    label: np.ndarray,
    mapping: Mapping[str, int] | None = None,
    names: Mapping[int, str] | None = None,
    auto_names: bool = True,
    unmapped: str = "background",
) -> Conversion:
    """Map source ids to MAISI ids: by id in `mapping`, else by name (`names[id]`) in `mapping`, else
    (auto_names) by matching the source name to the MAISI vocabulary. Unmapped ids become background,
    or raise ValueError when unmapped="error"."""
    if unmapped not in ("background", "error"):
        raise ValueError(f"unmapped must be 'background' or 'error', got {unmapped!r}")
    mapping = {str(k).strip().lower(): target_id(v) for k, v in (mapping or {}).items()}
    label = np.asarray(label)
    if label.dtype.kind not in "iu" or (label.size and label.min() < 0):
        raise ValueError(f"label map must hold non-negative integers, got dtype {label.dtype}")
    ids, counts = np.unique(label, return_counts=True)
    lut = np.zeros(int(ids.max()) + 1 if ids.size else 1, np.uint8)
    conv = Conversion(label=label)
    for i, n in zip(ids.tolist(), counts.tolist()):
        if i == 0:
            continue
        name = names.get(i) if names else None
        target = mapping.get(str(i))
        if target is None and name is not None:
            target = mapping.get(name.strip().lower())
            if target is None and auto_names:
                target = match_name(name)
        if target is None:
            conv.unmapped[i] = n
        else:
            lut[i] = target
            conv.mapped[i] = target
    if conv.unmapped and unmapped == "error":
        raise ValueError(conv.summary(names).replace("set to background", "(use a mapping entry for each)"))
    conv.label = lut[label]
    return conv


def body_mask(hu: np.ndarray, air_hu: float = AIR_HU) -> np.ndarray:
    """Body envelope from CT: everything except outside air (HU < air_hu connected to the volume's border)."""
    air = np.asarray(hu) < air_hu
    comps, n = ndimage.label(air)
    if n == 0:
        return np.ones(air.shape, bool)
    border = np.unique(np.concatenate([comps[[0, -1]].ravel(), comps[:, [0, -1]].ravel(),
                                       comps[:, :, [0, -1]].ravel()]))
    outside = np.isin(comps, border[border > 0])
    return ~outside


def add_body(label: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """Give background voxels inside the body envelope the body id (200), as the released ControlNet needs."""
    out = np.asarray(label).astype(np.uint8, copy=True)
    out[(out == 0) & body_mask(hu)] = BODY
    return out
