"""Mask sources for generation: a user label map, a mask database (built-in: phantoms; NVIDIA's), tumours."""

from __future__ import annotations

import functools
import json
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from maisi.data.labelmap import convert_labels, ensure_body, load_mapping, resample_label
from maisi.data.phantom import make_phantom
from maisi.data.regions import span_name
from maisi.io.atomic import atomic_path, atomic_write_text
from maisi.io.hub import MissingFilesError, local_set, maisi_cache_dir, released_set
from maisi.io.volume import read_volume, write_volume
from maisi.labels import BODY, REGIONS, TUMOR_HOSTS, id_to_name, label_name

INDEX_FILE = "index.json"
# NVIDIA's database (NV-Generate-CT datasets/): candidate_masks_<name>.json indexes all_masks_<name>/ (or its .zip).
RELEASED_INDEX_PREFIX, RELEASED_FOLDER_PREFIX = "candidate_masks_", "all_masks_"
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
# A user mask
# ---------------------------------------------------------------------------------------------


def load_user_mask(path: str | Path, mapping: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(label, affine, info) of a user label map, converted to the MAISI vocabulary when `mapping`
    (JSON {source: MAISI}) is given, with the body envelope (200) added when missing."""
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
        unknown = sorted(set(np.unique(arr).tolist()) - set(id_to_name()) - {0, BODY})
        if unknown:
            raise ValueError(f"{path}: ids {unknown} are not in the MAISI vocabulary; give a mapping "
                             "(mask_mapping: a JSON {source: MAISI name}) to convert them")
    if not arr.any():
        how = (f" after the mapping {mapping} (it mapped none of its ids; see `maisi info labels` for the MAISI "
               "names)") if mapping is not None else ""
        raise ValueError(f"{path}: the label map is empty (background only){how}; a mask needs organs to follow")
    label, added = ensure_body(arr.astype(np.uint8))
    info["body_added"] = added
    return label, np.asarray(vol.affine), info


def tumor_hosts(tumor: int) -> tuple[int, ...]:
    """The organ ids that can hold tumour `tumor` (the lung lobes for a lung tumour, the liver for a hepatic one)."""
    return TUMOR_HOST_SETS.get(tumor, (TUMOR_HOSTS[tumor],))


# ---------------------------------------------------------------------------------------------
# Mask databases: a folder of label maps + index.json
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    file: str
    dim: tuple[int, int, int]
    spacing: tuple[float, float, float]
    top_region_index: int | None  # None: the entry names no body region (NVIDIA's format allows it)
    bottom_region_index: int | None
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
    spans = sorted({(e.top_region_index, e.bottom_region_index) for e in entries if e.top_region_index is not None})
    names = ", ".join(REGIONS[a] if a == b else f"{REGIONS[a]}-{REGIONS[b]}" for a, b in spans)
    want = ", ".join(label_name(i) for i in anatomy) or "no particular anatomy"
    region = "any region" if regions is None else "-".join(dict.fromkeys(REGIONS[i] for i in regions))
    return f"no mask in the database shows {region} with {want}; the database has regions: {names}"


def default_cache_dir() -> Path:
    """Where built-in mask databases are generated: maisi's cache folder (io.hub.maisi_cache_dir) / masks."""
    return maisi_cache_dir() / "masks"


PHANTOM_SPANS = ((0, 0), (1, 1), (2, 2), (3, 3), (1, 2), (2, 3), (0, 1))


def phantom_database(folder: str | Path | None = None, spans: Sequence[tuple[int, int]] | None = None,
                     variants: int = 3, size: int = 96, spacing: float = 4.0) -> Path:
    """The built-in mask database: phantom label maps (`variants` seeds of each region span, `size`³ voxels of
    `spacing` mm, twice as long in z for spans), generated on first use into `folder` (default: the user cache
    dir). Only the `spans` asked for (default: all) are generated; later calls add missing ones."""
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


# ---------------------------------------------------------------------------------------------
# NVIDIA's released mask database (datasets/candidate_masks_*.json + all_masks_*.zip)
# ---------------------------------------------------------------------------------------------


def _region_of(one_hot: Sequence[float] | None) -> int | None:
    """The region index of NVIDIA's one-hot region vector (its first non-zero entry)."""
    hot = [i for i, v in enumerate(one_hot or ()) if v != 0]
    return hot[0] if hot else None


@functools.lru_cache(maxsize=4)
def _read_released(path: Path, stamp: tuple[int, int]) -> tuple[Entry, ...]:
    """NVIDIA's candidate JSON: [{"pseudo_label_filename", "label_list", "dim", "spacing", "top_region_index"
    (one-hot over head, chest, abdomen, pelvis), "bottom_region_index", optional "label_filename"}, ...]."""
    try:
        return tuple(Entry(e["pseudo_label_filename"], tuple(int(v) for v in e["dim"]),
                           tuple(float(v) for v in e["spacing"]), _region_of(e.get("top_region_index")),
                           _region_of(e.get("bottom_region_index")), frozenset(int(i) for i in e["label_list"]))
                     for e in json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not NVIDIA's candidate mask list ({e!r}); each entry needs "
                         "pseudo_label_filename, label_list, dim, spacing") from e


def rank_released(entries: Sequence[Entry], size: Sequence[int], spacing: Sequence[float],
                  regions: tuple[int, int] | None, anatomy: Sequence[int]) -> list[Entry]:
    """NVIDIA's choice (NV-Generate-CT scripts/find_masks.py `find_masks`, then `LDMSampler.find_closest_masks`
    in scripts/sample.py): masks holding every requested organ, spanning every requested region, without a tumour
    that was not asked for, and not 128 voxels or more smaller than the output on any axis; ranked by
    Σ_axis |fov − FOV|/10 + |dim − size|/100 + |spacing − s| (mm, voxels), ties in file order. Exact matches
    (score 0) come first, as the reference prefers them."""
    want = set(anatomy)
    span = set() if regions is None else set(range(regions[0], regions[1] + 1))
    size, spacing = np.asarray(size, float), np.asarray(spacing, float)

    def keep(e: Entry) -> bool:
        covers = e.top_region_index is None or all(e.top_region_index <= r <= e.bottom_region_index for r in span)
        tumour_free = not (e.labels & set(TUMOR_HOSTS)) - want
        return want <= e.labels and covers and tumour_free and all(np.asarray(e.dim) > size - 128)

    def score(e: Entry) -> float:
        dim, sp = np.asarray(e.dim, float), np.asarray(e.spacing, float)
        return float((np.abs(dim * sp - size * spacing) / 10 + np.abs(dim - size) / 100 + np.abs(sp - spacing)).sum())

    return sorted((e for e in entries if keep(e)), key=score)  # stable: ties keep the JSON's order


def _released_pair(index: Path) -> tuple[Path, Path]:
    """(masks folder, zip) that belong to a candidate JSON: all_masks_<name>/ and all_masks_<name>.zip beside it."""
    name = index.stem.removeprefix(RELEASED_INDEX_PREFIX)
    folder = index.parent / f"{RELEASED_FOLDER_PREFIX}{name}"
    return folder, folder.with_name(folder.name + ".zip")


def _released_index(path: Path) -> Path | None:
    """The candidate JSON that `path` names: the JSON itself, a folder holding it (NVIDIA's datasets/, or a
    downloaded set with datasets/ inside), or the extracted all_masks_* folder beside it."""
    if path.is_file() and path.suffix == ".json":
        return path
    if path.name.startswith(RELEASED_FOLDER_PREFIX):
        cand = path.with_name(RELEASED_INDEX_PREFIX + path.name.removeprefix(RELEASED_FOLDER_PREFIX)).with_suffix(".json")
        return cand if cand.is_file() else None
    for folder in (path, path / "datasets"):
        found = sorted(folder.glob(f"{RELEASED_INDEX_PREFIX}*.json")) if folder.is_dir() else []
        if found:
            return found[-1]  # the largest database when several are present (…_3000, …_4000)
    return None


@dataclass(frozen=True)
class Database:
    """A mask database: its entries, and where their label maps are (a folder, or NVIDIA's zip)."""

    path: Path  # what was named: a folder with index.json, or NVIDIA's candidate JSON
    kind: str  # "maisi" (index.json) or "released" (NVIDIA's candidate JSON)
    entries: tuple[Entry, ...]
    folder: Path | None  # the label maps; None: read from `zip`, each extracted once into the cache
    zip: Path | None = None

    def rank(self, size: Sequence[int], spacing: Sequence[float], regions: tuple[int, int] | None,
             anatomy: Sequence[int]) -> list[Entry]:
        ranker = rank_released if self.kind == "released" else rank_entries
        return ranker(self.entries, size, spacing, regions, anatomy)

    def file(self, entry: Entry) -> Path:
        return self.folder / entry.file if self.folder is not None else extract_member(self.zip, entry.file)


def open_database(path: str | Path) -> Database:
    """A project database (folder + index.json) or NVIDIA's (candidate JSON + all_masks_* folder or zip)."""
    path = Path(path)
    path = path.parent if path.name == INDEX_FILE else path
    if (path / INDEX_FILE).is_file():
        return Database(path, "maisi", tuple(read_index(path)), path)
    index = _released_index(path)
    if index is None:
        raise FileNotFoundError(
            f"no mask database at {path}: expected a folder with {INDEX_FILE} "
            '({"masks": [{"file", "dim", "spacing", "top_region_index", "bottom_region_index", "labels"}]}) or '
            f"NVIDIA's {RELEASED_INDEX_PREFIX}*.json with its {RELEASED_FOLDER_PREFIX}* folder or zip beside it")
    folder, zip_path = _released_pair(index)
    if not folder.is_dir() and not zip_path.is_file():
        raise FileNotFoundError(f"the label maps of {index} are missing: expected {folder}/ or {zip_path}")
    st = index.stat()
    entries = _read_released(index.resolve(), (st.st_mtime_ns, st.st_size))
    return Database(index, "released", entries, folder if folder.is_dir() else None,
                    None if folder.is_dir() else zip_path)


def hub_database(names: Sequence[str] = ("rflow-ct", "ddpm-ct")) -> Path | None:
    """NVIDIA's candidate JSON in the hub cache of `maisi download <name>` (sha256-checked, with its zip beside
    it), or None when no set's mask database has been downloaded."""
    for name in names:
        wanted = [f.path for f in released_set(name).files
                  if f.path.startswith(f"datasets/{RELEASED_INDEX_PREFIX}") or f.path.endswith(".zip")]
        try:
            files = local_set(name, only=wanted)
        except MissingFilesError:
            continue
        return next(files[p] for p in wanted if p.endswith(".json"))
    return None


@functools.lru_cache(maxsize=4)
def _zip_members(zip_path: Path, stamp: tuple[int, int]) -> dict[str, str]:
    """Entry file name (relative to the all_masks_* folder) → member name in NVIDIA's zip."""
    top = zip_path.stem + "/"
    with zipfile.ZipFile(zip_path) as zf:
        return {n.removeprefix(top): n for n in zf.namelist() if not n.endswith("/")}


def extract_member(zip_path: Path, name: str) -> Path:
    """One label map of NVIDIA's zip, extracted on first use into the cache (atomically) and reused after."""
    st = zip_path.stat()
    cache = default_cache_dir() / f"released-{zip_path.stem}-{st.st_size}"
    target = (cache / name).resolve()
    if not target.is_relative_to(cache.resolve()):
        raise ValueError(f"{zip_path}: entry {name!r} points outside the database")
    if not target.is_file():
        member = _zip_members(zip_path.resolve(), (st.st_mtime_ns, st.st_size)).get(name)
        if member is None:
            raise FileNotFoundError(f"{zip_path} holds no {name} (named by its candidate JSON)")
        with zipfile.ZipFile(zip_path) as zf, zf.open(member) as src, atomic_path(target, "".join(target.suffixes)) as tmp:
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


# ---------------------------------------------------------------------------------------------
# Choosing a database mask
# ---------------------------------------------------------------------------------------------


def _resampled(path: Path, size: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A database label map on the output grid (read-only; the samples of a batch share it)."""
    st = path.stat()
    return _resampled_file(path, (st.st_mtime_ns, st.st_size), size, spacing)


@functools.lru_cache(maxsize=2)
def _resampled_file(path: Path, stamp: tuple[int, int], size: tuple[int, ...],
                    spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    vol = read_volume(path)
    label, affine = resample_label(np.asarray(vol.array).astype(np.uint8), vol.affine, size, spacing)
    label.flags.writeable = False
    return label, affine


def database_candidates(folder: str | Path, size: Sequence[int], spacing: Sequence[float],
                        regions: tuple[int, int] | None, anatomy: Sequence[int]) -> tuple[Database, list[Entry]]:
    """The database and its masks that match, best first; a ValueError that says what is missing when none does.
    Reads the index only, so a request no mask can serve is refused before any compute."""
    db = open_database(folder)
    ranked = db.rank(size, spacing, regions, anatomy)
    if not ranked:
        note = ("; NVIDIA's rule also skips masks with a tumour not asked for and masks 128 voxels or more smaller "
                "than the output" if db.kind == "released" else "")
        raise ValueError(describe_missing(db.entries, regions, anatomy) + note)
    return db, ranked


def database_mask(folder: str | Path, size: Sequence[int], spacing: Sequence[float],
                  regions: tuple[int, int] | None, anatomy: Sequence[int], attempt: int = 0) -> Mask:
    """The `attempt`-th best matching mask of a database (either format), resampled (nearest) to the output
    grid; candidates that lose a requested organ in the resampling are skipped (as NVIDIA's
    `resample_mask_check_organ_list`), and the ranking wraps around when the attempts outnumber the candidates."""
    db, ranked = database_candidates(folder, size, spacing, regions, anatomy)
    size, spacing = tuple(int(s) for s in size), tuple(float(s) for s in spacing)
    usable: list[int] = [] if anatomy else list(range(len(ranked)))  # ranks whose resampled mask keeps the organs
    for rank, entry in enumerate(ranked if anatomy else ()):
        label, _ = _resampled(db.file(entry), size, spacing)
        if all((label == i).any() for i in anatomy):
            usable.append(rank)
            if len(usable) > attempt:
                break
    if not usable:
        raise ValueError(f"every candidate of {folder} loses one of the organs {[label_name(i) for i in anatomy]} "
                         f"when resampled to {list(size)} voxels of {list(spacing)} mm; choose a larger field of view")
    rank = usable[attempt % len(usable)]
    label, affine = _resampled(db.file(ranked[rank]), size, spacing)
    return Mask(label, affine, {"kind": "database", "database": str(db.path), "format": db.kind,
                                "file": ranked[rank].file, "rank": rank, "candidates": len(ranked)})


# ---------------------------------------------------------------------------------------------
# Tumour inpainting into a healthy mask
# ---------------------------------------------------------------------------------------------


def insert_tumor(label: np.ndarray, tumor: int, spacing: Sequence[float], rng: np.random.Generator,
                 radius_mm: float | None = None) -> np.ndarray:
    """A copy of `label` with an ellipsoidal tumour blob (id `tumor`) inside its host organ."""
    if tumor not in TUMOR_HOSTS:
        raise ValueError(f"{label_name(tumor)!r} cannot be inpainted; choose from {[label_name(i) for i in TUMOR_HOSTS]}")
    hosts = tumor_hosts(tumor)
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
