"""Volume I/O: NIfTI and DICOM series in, oriented to RAS with affine and spacing kept; NIfTI out, atomically."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from maisi.io.atomic import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class Volume:
    """A 3D array in RAS orientation with its voxel-to-world (mm) affine."""

    array: np.ndarray  # X×Y×Z
    affine: np.ndarray  # 4×4, RAS+ world coordinates in mm

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm: the lengths of the affine's first three columns."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))  # type: ignore[return-value]


def affine_from_spacing(
    spacing: Sequence[float] | float,
    shape: Sequence[int] | None = None,
    origin: Sequence[float] | None = None,
) -> np.ndarray:
    """A RAS affine with the given voxel size; with `shape` and no origin, the volume is centred on 0 mm."""
    s = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    if np.any(s <= 0) or not np.all(np.isfinite(s)):
        raise ValueError(f"spacing must be positive finite mm values, got {list(s)}")
    affine = np.diag([*s, 1.0])
    if origin is not None:
        affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    elif shape is not None:
        affine[:3, 3] = -0.5 * (np.asarray(shape[:3], dtype=np.float64) - 1) * s
    return affine


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI file or a folder holding one DICOM series, re-oriented to RAS.

    Raises FileNotFoundError for a missing path and ValueError for anything that is not a readable
    3D volume (a corrupt or truncated file, a 4D image, a folder without DICOM).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        array, affine = _read_dicom_series(path)
    elif is_nifti(path):
        array, affine = _read_nifti(path)
    else:
        raise ValueError(f"{path}: unsupported volume format; use .nii, .nii.gz or a folder with one DICOM series")
    return _to_ras(array, affine)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        array = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises several types for corrupt/truncated files
        raise ValueError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from e
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {array.shape}")
    return array, np.asarray(img.affine, dtype=np.float64)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from monai.data import PydicomReader

    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise ValueError(f"{folder}: folder has no files; expected one DICOM series")
    try:
        reader = PydicomReader(affine_lps_to_ras=True)
        data = reader.read(str(folder))
        array, meta = reader.get_data(data)
    except Exception as e:
        raise ValueError(f"{folder}: cannot read as a DICOM series ({type(e).__name__}: {e})") from e
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{folder}: expected one 3D DICOM series, got shape {array.shape}")
    return array, np.asarray(meta["affine"], dtype=np.float64)


def _to_ras(array: np.ndarray, affine: np.ndarray) -> Volume:
    """Reorder and flip axes so that the array is in RAS orientation (nibabel's orientation maths)."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, ras)
    out = nib.orientations.apply_orientation(array, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return Volume(np.ascontiguousarray(out), new_affine)


def write_volume(
    path: str | Path, array: np.ndarray, affine: np.ndarray, dtype: np.dtype | type | str | None = None
) -> Path:
    """Write a 3D array as NIfTI (.nii or .nii.gz) with the given affine, atomically.

    The on-disk dtype is `dtype` (default: the array's); values are stored without scaling.
    """
    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: output must end in .nii or .nii.gz")
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {array.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4×4 matrix, got shape {affine.shape}")
    dtype = np.dtype(dtype or array.dtype)
    if dtype == np.bool_:
        dtype = np.dtype(np.uint8)
    if np.issubdtype(dtype, np.integer) and np.issubdtype(array.dtype, np.floating):
        info = np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    img = nib.Nifti1Image(array.astype(dtype, copy=False), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, str(tmp))
    return path
