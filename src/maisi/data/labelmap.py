"""Label maps into the MAISI vocabulary: name/id mappings (e.g. TotalSegmentator), body envelope, regions."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from maisi.io.volume import affine_from_spacing, read_volume
from maisi.labels import BODY, id_to_name, label_id, name_to_id

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



def read_label_ids(path: str | Path) -> np.ndarray:
    """A label map file's voxels as int64 MAISI ids: integers (float storage allowed) of the MAISI vocabulary
    only, which is all the networks and the checks know; errors name the file."""
    arr = np.asarray(read_volume(path).array)
    if arr.dtype.kind == "f":
        if not np.allclose(arr, np.round(arr)):
            raise ValueError(f"{path}: a label map must hold integer ids, found fractional values")
        arr = np.round(arr)
    label = arr.astype(np.int64)
    unknown = sorted(set(np.unique(label).tolist()) - {0} - set(id_to_name()))
    if unknown:
        raise ValueError(f"{path}: label ids {unknown[:10]}{' …' if len(unknown) > 10 else ''} are not in the MAISI "
                         "vocabulary (see `maisi info labels`); convert the label map to MAISI ids first (e.g. "
                         "`maisi prepare --label-mapping`)")
    return label

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


def _read_json(path: Path, what: str) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def load_mapping(path: str | Path) -> dict[str, int]:
    """Read a JSON {"source name or id": "MAISI name or id"}; every target must be a MAISI label (or 0)."""
    path = Path(path)
    raw = _read_json(path, "label mapping")
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
    raw = _read_json(Path(path), "label names file")
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


# Geometry: a label map onto another grid (nearest neighbour), and a body envelope for maps without one


def centred_affine(label_affine: np.ndarray, label_shape: Sequence[int], size: Sequence[int],
                   spacing: Sequence[float]) -> np.ndarray:
    """An axis-aligned RAS affine of `size`×`spacing` whose centre is the centre of the source grid."""
    centre = np.asarray(label_affine) @ np.append((np.asarray(label_shape[:3]) - 1) / 2, 1.0)
    return affine_from_spacing(spacing, origin=centre[:3] - (np.asarray(size) - 1) / 2 * np.asarray(spacing))


def resample_label(label: np.ndarray, affine: np.ndarray, size: Sequence[int], spacing: Sequence[float],
                   out_affine: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour resampling of a label map onto a `size` grid of `spacing` mm (centred on the
    source unless `out_affine` is given); ids are kept, voxels outside the source become background."""
    size = tuple(int(s) for s in size)
    out_affine = centred_affine(affine, label.shape, size, spacing) if out_affine is None else out_affine
    # voxel of the output -> voxel of the source
    m = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(out_affine, np.float64)
    if np.allclose(m, np.eye(4)) and tuple(label.shape) == size:
        return np.asarray(label, np.uint8).copy(), out_affine
    # grid-constant: each source voxel covers ±½ voxel around its centre, so an output voxel whose centre falls in
    # the outer half of an edge voxel keeps its id ("constant" cut there, and a 2× upsampling lost its end planes)
    out = ndimage.affine_transform(np.asarray(label, np.uint8), m[:3, :3], m[:3, 3], output_shape=size,
                                   order=0, mode="grid-constant", cval=0)
    return out, out_affine


def body_envelope(label: np.ndarray, closing_voxels: int = 2) -> np.ndarray:
    """A body envelope from a label map without CT: the labelled voxels, closed and with holes filled."""
    fg = np.asarray(label) > 0
    if not fg.any():
        return fg
    st = ndimage.generate_binary_structure(3, 1)
    padded = np.pad(fg, closing_voxels)
    closed = ndimage.binary_closing(padded, st, iterations=closing_voxels)
    closed = closed[tuple(slice(closing_voxels, -closing_voxels) for _ in range(3))]
    filled = ndimage.binary_fill_holes(closed)
    for k in range(filled.shape[2]):  # also fill each axial slice (bodies are open at the ends)
        filled[:, :, k] = ndimage.binary_fill_holes(filled[:, :, k])
    return filled | fg


def ensure_body(label: np.ndarray) -> tuple[np.ndarray, bool]:
    """The label map with background inside the body envelope set to 200 when no body label is present."""
    label = np.asarray(label, np.uint8)
    if (label == BODY).any() or not label.any():
        return label, False
    out = label.copy()
    out[(out == 0) & body_envelope(label)] = BODY
    return out, True
