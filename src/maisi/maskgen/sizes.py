"""Measured anatomy sizes: the volume of each of the ten context structures in a label map, its size as the
percentile of that volume among a collection's, and the conditions file (`all_anatomy_size_conditions.json`).

The reference defines a size as a percentile: "[["liver", 0.5], ["hepatic tumor", 0.3]] ... a liver of median
size (around the 50th percentile) and a relatively small hepatic tumor (around the 30th percentile)"
(Project-MONAI/tutorials, generation/maisi/README.md, `controllable_anatomy_size`). NVIDIA has not published the
code that wrote its conditions file, so the rest is this project's choice: the volume is the voxel count of the
structure's own label times the voxel volume; the percentile is the mid-rank empirical CDF among the maps that
hold the structure; a structure a map lacks is −1 ("don't care")."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maisi.data.datalist import read_datalist
from maisi.io.atomic import atomic_write_text
from maisi.io.volume import read_volume, spacing_from_affine
from maisi.maskgen.context import (
    ANATOMY_SIZE_NAMES,
    CONDITIONS_KEY,
    DONT_CARE,
    TUMOR_LABELS,
    VOLUME_KEY,
)

# The label id whose voxels make each slot's volume.
STRUCTURE_IDS: dict[str, int] = {"gallbladder": 10, "liver": 1, "stomach": 12, "pancreas": 4, "colon": 62,
                                 **TUMOR_LABELS}
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


def structure_volumes(label: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The ten slots' volumes in mL (0 where the map lacks the structure), in ANATOMY_SIZE_NAMES order."""
    counts = np.bincount(np.asarray(label, dtype=np.int64).ravel(), minlength=256)
    voxel_ml = math.prod(float(s) for s in spacing) / 1000.0
    return np.array([counts[STRUCTURE_IDS[n]] * voxel_ml for n in ANATOMY_SIZE_NAMES], dtype=np.float64)


def size_against(volume: float, reference: np.ndarray) -> float:
    """The percentile of `volume` among the reference volumes of one structure (mid-rank empirical CDF, in
    (0, 1)); −1 when the volume is 0 or the reference holds no map with the structure."""
    ref = np.asarray(reference, dtype=np.float64)
    ref = ref[ref > 0]
    if volume <= 0 or ref.size == 0:
        return DONT_CARE
    return float(((ref < volume).sum() + 0.5 * (ref == volume).sum()) / ref.size)


def percentile_sizes(volumes: np.ndarray) -> np.ndarray:
    """K×10 volumes of a collection → K×10 sizes: each volume's percentile among the collection's (−1 absent)."""
    table = np.asarray(volumes, dtype=np.float64)
    return np.array([[size_against(v, table[:, j]) for j, v in enumerate(row)] for row in table])


def measure_sizes(label: np.ndarray, spacing: Sequence[float], reference: np.ndarray | None = None) -> dict[str, Any]:
    """{slot name: {"volume_ml", "size"}} of one map; the size is the percentile against `reference` (K×10
    volumes of a conditions file), None when there is no reference."""
    volumes = structure_volumes(label, spacing)
    return {name: {"volume_ml": round(float(v), 3),
                   "size": None if reference is None else size_against(v, np.asarray(reference)[:, j])}
            for j, (name, v) in enumerate(zip(ANATOMY_SIZE_NAMES, volumes))}


def label_files(source: str | Path) -> list[Path]:
    """The label maps of a collection: a datalist JSON (its "label" entries) or a folder of NIfTI/NRRD maps."""
    source = Path(source)
    if source.is_file():
        entries = read_datalist(source)
        missing = [i for i, e in enumerate(entries) if not e.get("label")]
        if missing:
            raise ValueError(f"{source}: entries {missing[:10]} have no \"label\" (a label map path)")
        return [Path(e["label"]) for e in entries]
    if not source.is_dir():
        raise FileNotFoundError(f"no datalist or folder of label maps at {source}")
    files = sorted(p for p in source.iterdir() if p.is_file() and p.name.endswith(LABEL_SUFFIXES))
    if not files:
        raise ValueError(f"{source} holds no label map ({', '.join(LABEL_SUFFIXES)})")
    return files


def conditions_entries(volumes: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
    """The conditions file's entries for K maps: {"organ_size", "organ_volume_ml", "label"} each."""
    sizes = percentile_sizes(volumes)
    return [{CONDITIONS_KEY: [round(float(s), 6) for s in row_s], VOLUME_KEY: [round(float(v), 3) for v in row_v],
             "label": str(name)} for row_s, row_v, name in zip(sizes, volumes, names)]


def compute_conditions(files: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read every label map (its own voxel size) and return the conditions entries of the collection."""
    volumes = []
    for f in files:
        vol = read_volume(f)
        volumes.append(structure_volumes(np.rint(vol.array).astype(np.int64), spacing_from_affine(vol.affine)))
    return conditions_entries(np.asarray(volumes), [Path(f).name for f in files])


def write_conditions(path: str | Path, entries: list[dict[str, Any]]) -> Path:
    """Write a conditions file (the released layout: a list of {"organ_size": [10 sizes], ...}) atomically."""
    if not entries:
        raise ValueError("a conditions file needs at least one entry")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(entries, indent=1) + "\n")
