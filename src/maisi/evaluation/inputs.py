"""Evaluation inputs: volumes from a folder or a datalist (checked before any work), image/label pairing, reading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from maisi.data.labelmap import read_label_ids
from maisi.io.volume import check_volume_file, is_nifti, read_volume

LABEL_TAGS = ("_label", "_mask", "_seg")
DATALIST_KEYS = ("testing", "validation", "training")


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _role(path: Path) -> str:
    stem = _stem(path)
    return "label" if any(stem.endswith(t) for t in LABEL_TAGS) else "image"


def _key(path: Path) -> str:
    """The shared stem of an image/label pair: 'case1_image' and 'case1_label' → 'case1'."""
    stem = _stem(path)
    for tag in ("_image", "_img", *LABEL_TAGS):
        if stem.endswith(tag):
            return stem[: -len(tag)]
    return stem


def _datalist(path: Path, role: str, key: str | None) -> list[Path]:
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    keys = [key] if key else [k for k in DATALIST_KEYS if isinstance(data, dict) and k in data]
    if not keys or not isinstance(data, dict) or not isinstance(data.get(keys[0]), list):
        raise ValueError(f"{path}: expected a datalist with a list under one of {list(DATALIST_KEYS)}"
                         + (f" (asked for {key!r})" if key else ""))
    if not data[keys[0]]:
        raise ValueError(f"{path}: {keys[0]!r} holds no entries; list at least one volume")
    field = "image" if role == "image" else "label"
    out = []
    for i, e in enumerate(data[keys[0]]):
        v = e.get(field) if isinstance(e, dict) else None
        if v is None and role == "label":
            v = e.get("mask") if isinstance(e, dict) else None
        if not isinstance(v, str):
            raise ValueError(f"{path}: entry {i} of {keys[0]!r} has no {field!r} path")
        out.append((path.parent / v).resolve())
    return out


def list_volumes(source: str | Path, role: str = "image", key: str | None = None) -> list[Path]:
    """NIfTI files (or DICOM series folders) of a folder, a datalist JSON or a single file, each checked by
    check_volume_file (readable 3D, voxel size, orientation, finite voxels) so that a bad file is refused,
    by name, before any network loads or any report is written.

    In a folder holding both images and labels (names ending _label/_mask/_seg), `role` picks which."""
    if role not in ("image", "label"):
        raise ValueError(f"role must be 'image' or 'label', got {role!r}")
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"no such file or folder: {src}")
    if src.is_file() and src.suffix == ".json":
        paths = _datalist(src, role, key)
    elif src.is_file() or any(src.glob("*.dcm")):  # one NIfTI file or one DICOM series folder
        paths = [src]
    else:
        files = sorted(p for p in src.iterdir() if is_nifti(p))
        if any(_role(p) == "label" for p in files) and any(_role(p) == "image" for p in files):
            files = [p for p in files if _role(p) == role]
        dicom = sorted(p for p in src.iterdir() if p.is_dir() and any(p.glob("*.dcm")))
        paths = files or dicom
        if not paths:
            raise ValueError(f"{src}: no volumes found (expected .nii/.nii.gz files, DICOM series folders or a "
                             f"datalist .json)")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{source}: missing files: {', '.join(missing[:3])}")
    for p in paths:
        check_volume_file(p)
    return paths


def pair_volumes(images: str | Path, labels: str | Path, key: str | None = None) -> list[tuple[Path, Path]]:
    """(image, label) pairs: by entry when both are datalists, else by shared name stem ('case1_image' with
    'case1_label'); one image and one label map pair as they are. Any other mismatch is refused, naming the
    images without a label map of their name: pairing unmatched names by sorted order would score wrong pairs."""
    a, b = list_volumes(images, "image", key), list_volumes(labels, "label", key)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} images but {len(b)} label maps: give one label map per image")
    if Path(images).suffix == ".json" and Path(labels).suffix == ".json" or len(a) == 1:
        return list(zip(a, b))
    keys_b = {_key(p): p for p in b}
    unmatched = [p.name for p in a if _key(p) not in keys_b]
    if unmatched:
        raise ValueError(f"{images}: {len(unmatched)} image(s) have no label map of the same name in {labels} "
                         f"({', '.join(unmatched[:3])}{' …' if len(unmatched) > 3 else ''}); name each pair "
                         "<case>_image / <case>_label (or _mask, _seg), or give one datalist with both")
    return [(p, keys_b[_key(p)]) for p in a]


def read_hu(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    vol = read_volume(path)
    return np.asarray(vol.array, np.float32), tuple(float(s) for s in vol.spacing)


def read_label(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A MAISI label map: integer ids of the MAISI vocabulary only (anything else would be judged as the
    wrong organ, or not at all), on its image's grid."""
    label = read_label_ids(path)
    if shape is not None and label.shape != tuple(shape):
        raise ValueError(f"{path}: label map shape {label.shape} differs from its image's {tuple(shape)}")
    return label.astype(np.int32)
