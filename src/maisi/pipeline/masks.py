"""Mask sources for generation: a user label map, a mask database (built-in: phantoms), tumour inpainting."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from maisi.io.atomic import atomic_write_text
from maisi.io.volume import affine_from_spacing
from maisi.labels import BODY, REGIONS, TUMOR_HOSTS, label_name

INDEX_FILE = "index.json"
# Host organs where a tumour may be placed (wider than labels.TUMOR_HOSTS: every lung lobe, every vertebra).
TUMOR_HOST_SETS: dict[int, tuple[int, ...]] = {
    23: (28, 29, 30, 31, 32), 24: (4,), 26: (1,), 27: (62,), 128: tuple(range(33, 57)),
}
TUMOR_RADIUS_MM: dict[int, float] = {23: 10.0, 24: 8.0, 26: 12.0, 27: 9.0, 128: 7.0}


@dataclass(frozen=True)
class Mask:
    """A label map in the MAISI vocabulary on the output grid, and where it came from."""

    label: np.ndarray  # uint8 X×Y×Z
    affine: np.ndarray
    source: dict  # JSON-ready description (file, database entry, phantom seed, ...)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


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
    out = ndimage.affine_transform(np.asarray(label, np.uint8), m[:3, :3], m[:3, 3], output_shape=size,
                                   order=0, mode="constant", cval=0)
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


# ---------------------------------------------------------------------------------------------
# A user mask
# ---------------------------------------------------------------------------------------------


def load_user_mask(path: str | Path, mapping: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(label, affine, info) of a user label map, converted to the MAISI vocabulary when `mapping`
    (JSON {source: MAISI}) is given, with the body envelope (200) added when missing."""
    from maisi.data.labelmap import convert_labels, load_mapping
    from maisi.io.volume import read_volume

    vol = read_volume(path)
    arr = np.asarray(vol.array)
    if arr.dtype.kind == "f":
        if not np.allclose(arr, np.round(arr)):
            raise ValueError(f"{path}: a label map must hold integer ids, found fractional values")
        arr = np.round(arr).astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"{path}: label ids must be in 0..255, found {arr.min()}..{arr.max()}; give a "
                         "mapping to convert them to the MAISI vocabulary")
    info: dict = {"kind": "user", "file": str(path)}
    if mapping is not None:
        conv = convert_labels(arr.astype(np.int64), load_mapping(mapping))
        arr = conv.label
        info.update(mapping=str(mapping), conversion=conv.summary())
    else:
        from maisi.labels import id_to_name

        unknown = sorted(set(np.unique(arr).tolist()) - set(id_to_name()) - {0, BODY})
        if unknown:
            raise ValueError(f"{path}: ids {unknown} are not in the MAISI vocabulary; give a mapping "
                             "(--mask-mapping JSON {{source: MAISI name}}) to convert them")
    label, added = ensure_body(arr.astype(np.uint8))
    info["body_added"] = added
    return label, np.asarray(vol.affine), info


# ---------------------------------------------------------------------------------------------
# Mask databases: a folder of label maps + index.json
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    file: str
    dim: tuple[int, int, int]
    spacing: tuple[float, float, float]
    top_region_index: int
    bottom_region_index: int
    labels: frozenset[int]

    def to_json(self) -> dict:
        return {"file": self.file, "dim": list(self.dim), "spacing": list(self.spacing),
                "top_region_index": self.top_region_index, "bottom_region_index": self.bottom_region_index,
                "labels": sorted(self.labels)}


def read_index(folder: str | Path) -> list[Entry]:
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no mask database at {folder} (expected {INDEX_FILE}: "
                                '{"masks": [{"file", "dim", "spacing", "top_region_index", '
                                '"bottom_region_index", "labels"}]})')
    try:
        raw = json.loads(path.read_text())["masks"]
        return [Entry(e["file"], tuple(int(v) for v in e["dim"]), tuple(float(v) for v in e["spacing"]),
                      int(e["top_region_index"]), int(e["bottom_region_index"]), frozenset(int(i) for i in e["labels"]))
                for e in raw]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a mask index ({e!r}); each mask needs file, dim, spacing, "
                         "top_region_index, bottom_region_index, labels") from e


def write_index(folder: str | Path, entries: Sequence[Entry]) -> Path:
    return atomic_write_text(Path(folder) / INDEX_FILE,
                             json.dumps({"masks": [e.to_json() for e in entries]}, indent=1) + "\n")


def rank_entries(entries: Sequence[Entry], size: Sequence[int], spacing: Sequence[float],
                 regions: tuple[int, int] | None, anatomy: Sequence[int]) -> list[Entry]:
    """Entries with the requested regions and anatomy, closest field of view (then size, spacing) first."""
    want = set(anatomy)
    fits = [e for e in entries if want <= e.labels
            and (regions is None or (e.top_region_index, e.bottom_region_index) == tuple(regions))]
    fov = np.asarray(size) * np.asarray(spacing)

    def score(e: Entry) -> tuple[float, float, str]:
        efov = np.asarray(e.dim) * np.asarray(e.spacing)
        return (float(np.abs(np.log(efov / fov)).sum()),
                float(np.abs(np.log(np.asarray(e.spacing) / np.asarray(spacing))).sum()), e.file)

    return sorted(fits, key=score)


def describe_missing(entries: Sequence[Entry], regions: tuple[int, int] | None, anatomy: Sequence[int]) -> str:
    spans = sorted({(e.top_region_index, e.bottom_region_index) for e in entries})
    names = ", ".join(REGIONS[a] if a == b else f"{REGIONS[a]}-{REGIONS[b]}" for a, b in spans)
    want = ", ".join(label_name(i) for i in anatomy) or "no particular anatomy"
    region = "any region" if regions is None else "-".join(dict.fromkeys(REGIONS[i] for i in regions))
    return f"no mask in the database shows {region} with {want}; the database has regions: {names}"


def default_cache_dir() -> Path:
    base = os.environ.get("MAISI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "maisi")
    return Path(base) / "masks"


PHANTOM_SPANS = ((0, 0), (1, 1), (2, 2), (3, 3), (1, 2), (2, 3), (0, 1))


def phantom_database(folder: str | Path | None = None, spans: Sequence[tuple[int, int]] | None = None,
                     variants: int = 3, size: int = 96, spacing: float = 4.0) -> Path:
    """The built-in mask database: phantom label maps (`variants` seeds of each region span, `size`³ voxels of
    `spacing` mm, twice as long in z for spans), generated on first use into `folder` (default: the user cache
    dir). Only the `spans` asked for (default: all) are generated; later calls add missing ones."""
    from maisi.data.phantom import make_phantom
    from maisi.data.regions import span_name
    from maisi.io.volume import write_volume

    folder = Path(folder) if folder is not None else default_cache_dir() / f"phantoms-{size}-{spacing:g}mm-v{variants}"
    entries = read_index(folder) if (folder / INDEX_FILE).is_file() else []
    have = {(e.top_region_index, e.bottom_region_index) for e in entries}
    todo = [s for s in (PHANTOM_SPANS if spans is None else spans) if tuple(s) not in have]
    if not todo and entries:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for top, bottom in todo:
        for seed in range(variants):
            z = size * (2 if top != bottom else 1)
            p = make_phantom(span_name(top, bottom), size=(size, size, z), spacing=spacing, seed=1000 + seed)
            name = f"{span_name(top, bottom)}_{seed}_label.nii.gz"
            write_volume(folder / name, p.label, p.affine, np.uint8)
            entries.append(Entry(name, tuple(p.label.shape), tuple(p.spacing), p.top_region_index,
                                 p.bottom_region_index, frozenset(np.unique(p.label).tolist()) - {0}))
    write_index(folder, entries)
    return folder


def database_mask(folder: str | Path, size: Sequence[int], spacing: Sequence[float],
                  regions: tuple[int, int] | None, anatomy: Sequence[int], attempt: int = 0) -> Mask:
    """The `attempt`-th best matching mask of a database, resampled (nearest) to the output grid."""
    from maisi.io.volume import read_volume

    entries = read_index(folder)
    ranked = rank_entries(entries, size, spacing, regions, anatomy)
    if not ranked:
        raise ValueError(describe_missing(entries, regions, anatomy))
    entry = ranked[attempt % len(ranked)]
    vol = read_volume(Path(folder) / entry.file)
    label, affine = resample_label(np.asarray(vol.array).astype(np.uint8), vol.affine, size, spacing)
    return Mask(label, affine, {"kind": "database", "database": str(folder), "file": entry.file,
                                "rank": attempt % len(ranked), "candidates": len(ranked)})


# ---------------------------------------------------------------------------------------------
# Tumour inpainting into a healthy mask
# ---------------------------------------------------------------------------------------------


def insert_tumor(label: np.ndarray, tumor: int, spacing: Sequence[float], rng: np.random.Generator,
                 radius_mm: float | None = None) -> np.ndarray:
    """A copy of `label` with an ellipsoidal tumour blob (id `tumor`) inside its host organ."""
    if tumor not in TUMOR_HOSTS:
        raise ValueError(f"{label_name(tumor)!r} cannot be inpainted; choose from {[label_name(i) for i in TUMOR_HOSTS]}")
    hosts = TUMOR_HOST_SETS.get(tumor, (TUMOR_HOSTS[tumor],))
    host = np.isin(label, hosts)
    if not host.any():
        raise ValueError(f"the mask has no {' / '.join(label_name(h) for h in hosts[:3])} to hold a "
                         f"{label_name(tumor)}; choose a mask or body region that contains it")
    r = radius_mm or TUMOR_RADIUS_MM[tumor]
    depth = ndimage.distance_transform_edt(host, sampling=spacing)
    r = min(r, float(depth.max()))  # small organs get a tumour that fits
    centres = np.argwhere(depth >= 0.7 * r)
    c = centres[rng.integers(len(centres))]
    radii = r * rng.uniform(0.8, 1.2, 3)
    grid = np.ogrid[tuple(slice(0, n) for n in label.shape)]
    d2 = sum(((g - ci) * s / ri) ** 2 for g, ci, s, ri in zip(grid, c, spacing, radii))
    blob = (d2 <= 1.0) & host
    if not blob.any():
        blob = np.zeros_like(host)
        blob[tuple(c)] = True
    out = np.asarray(label, np.uint8).copy()
    out[blob] = tumor
    return out
