"""Volume I/O: NIfTI, NRRD and DICOM series in (checked, oriented to RAS, affine kept); NIfTI out, atomically."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
from monai.data import PydicomReader

from maisi.io.atomic import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIX = ".nrrd"
# NRRD "space" → the sign that turns each of its world axes into RAS (spelled out or abbreviated)
NRRD_SPACES = {"right-anterior-superior": (1, 1, 1), "RAS": (1, 1, 1), "left-anterior-superior": (-1, 1, 1),
               "LAS": (-1, 1, 1), "left-posterior-superior": (-1, -1, 1), "LPS": (-1, -1, 1)}


class VolumeError(ValueError):
    """A volume file that cannot be used: unreadable, not 3D, non-finite voxels, or no valid geometry."""


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


def is_nrrd(path: str | Path) -> bool:
    return str(path).lower().endswith(NRRD_SUFFIX)


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI or NRRD file or a folder holding one DICOM series, checked and re-oriented to RAS.

    Raises FileNotFoundError for a missing path and VolumeError (a ValueError) naming the file and the rule
    for anything that is not a usable 3D volume: a corrupt or truncated file, a 4D image, a folder without
    DICOM, NaN or infinite voxels, a zero, negative or missing voxel size, or no orientation (NIfTI
    qform_code = sform_code = 0; NRRD without space, space directions or space origin). Nothing is guessed:
    such files are refused, not read as 1 mm.
    """
    path = _existing(path)
    if path.is_dir():
        array, affine = _read_dicom_series(path)
    elif is_nrrd(path):
        array, affine = _read_nrrd(path)
    else:
        img = _open_nifti(path)
        try:
            array = np.asanyarray(img.dataobj)
        except Exception as e:  # nibabel raises several types for truncated data
            raise VolumeError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from e
        array, affine = _squeeze(path, array), np.asarray(img.affine, dtype=np.float64)
    check_affine(path, affine)
    check_finite(path, array)
    return to_ras(array, affine)


def check_volume_file(path: str | Path) -> None:
    """The checks of read_volume, made before any work: a NIfTI's header (3D, voxel size, orientation,
    affine) and its voxels only where they can be non-finite (float storage or scaling); an NRRD file is read
    whole. A DICOM folder is only checked for files here; read_volume checks the rest when it reads the series."""
    path = _existing(path)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        if not files:
            raise VolumeError(f"{path}: folder has no files; expected one DICOM series")
        if all(is_nifti(p) or is_nrrd(p) or p.suffix.lower() in (".json", ".png", ".txt") for p in files):
            raise VolumeError(f"{path}: a folder is read as one DICOM series, and this one holds "
                              f"{'volume files' if any(is_nifti(p) or is_nrrd(p) for p in files) else 'no DICOM files'}"
                              f" ({files[0].name}, …); give a volume file itself")
        return
    if is_nrrd(path):
        array, affine = _read_nrrd(path)
        check_affine(path, affine)
        check_finite(path, array)
        return
    img = _open_nifti(path)
    shape = img.shape[:3] if len(img.shape) == 4 and img.shape[3] == 1 else img.shape
    if len(shape) != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got shape {img.shape}")
    check_affine(path, np.asarray(img.affine, dtype=np.float64))
    proxy = img.dataobj
    check_complete(path, int(getattr(proxy, "offset", 0)) + int(np.prod(img.shape)) * img.get_data_dtype().itemsize)
    scaled = [float(v) for v in (getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)) if v is not None]
    if img.get_data_dtype().kind in "fc" or not np.all(np.isfinite(scaled)):
        try:
            array = np.asanyarray(proxy)
        except Exception as e:
            raise VolumeError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from e
        check_finite(path, array)


def check_complete(path: Path, needed: int) -> None:
    """A NIfTI file holds the `needed` bytes (voxel offset + voxels) its header promises. A .nii is measured; a
    .nii.gz's trailer (ISIZE, the uncompressed size mod 2^32) is read first, and only when it disagrees (a cut file,
    or several gzip members) is the stream decompressed and counted."""
    if not path.name.lower().endswith(".gz"):
        have = path.stat().st_size
    else:
        with open(path, "rb") as f:
            f.seek(max(path.stat().st_size - 4, 0))
            if int.from_bytes(f.read(4), "little") == needed % 2**32:
                return
        have = 0
        try:
            with gzip.open(path, "rb") as f:
                while have < needed and (chunk := f.read(1 << 16)):
                    have += len(chunk)
        except (OSError, EOFError, zlib.error):
            pass  # a cut stream: `have` is what could be read
    if have < needed:
        raise VolumeError(f"{path}: truncated: the header promises {needed:,} bytes (voxel offset + voxels) and "
                          f"the file holds {have:,}{' uncompressed' if path.name.lower().endswith('.gz') else ''}; "
                          "copy or write it again")


def check_finite(path: str | Path, array: np.ndarray) -> None:
    """Every voxel must be a finite number: NaN or infinity would silently become some HU value later."""
    if array.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise VolumeError(f"{path}: {int(bad.sum())} of {array.size} voxels are NaN or infinite (first at voxel "
                          f"{first}); a volume must hold finite values only: replace them (e.g. with air, "
                          f"-1000 HU, or background 0 in a label map) or fix the tool that wrote the file")


def check_affine(path: str | Path, affine: np.ndarray) -> None:
    """A voxel-to-world affine must be finite and invertible, with positive voxel sizes."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or not np.all(spacing > 0) \
            or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{path}: no valid voxel-to-world geometry (affine {np.round(affine, 4).tolist()}); the "
                          f"affine must be finite with positive voxel sizes along three independent axes")


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if not path.is_dir() and not is_nifti(path) and not is_nrrd(path):
        raise VolumeError(f"{path}: unsupported volume format; use .nii, .nii.gz, .nrrd or a folder with one DICOM "
                          f"series")
    return path


def _open_nifti(path: Path) -> nib.Nifti1Image:
    """The image (voxels not yet read) after its raw header has passed the geometry rules."""
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for corrupt/truncated files
        raise VolumeError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from e
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise VolumeError(f"{path}: not a NIfTI-1/2 image ({type(img).__name__})")
    # nibabel silently turns zero or negative pixdim into 1 or |pixdim| at load: read the header as written.
    with nib.openers.ImageOpener(str(path)) as f:
        raw = type(img.header).from_fileobj(f, check=False)
    zooms = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise VolumeError(f"{path}: voxel size (NIfTI pixdim[1..3]) is {zooms.tolist()}; each must be a positive "
                          f"number of mm (maisi does not guess a spacing): re-export the scan with its spacing")
    if int(raw["qform_code"]) == 0 and int(raw["sform_code"]) == 0:
        raise VolumeError(f"{path}: no orientation (NIfTI qform_code and sform_code are both 0), so its "
                          f"voxel-to-world mapping is unknown and maisi will not guess it; set the sform or qform "
                          f"(e.g. nibabel: img.set_sform(affine, code=1)) or re-export the scan from its DICOM")
    return img


def _squeeze(path: Path, array: np.ndarray) -> np.ndarray:
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got shape {array.shape}")
    return array


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise VolumeError(f"{folder}: folder has no files; expected one DICOM series")
    try:
        reader = PydicomReader(affine_lps_to_ras=True)
        data = reader.read(str(folder))
        array, meta = reader.get_data(data)
    except Exception as e:
        raise VolumeError(f"{folder}: cannot read as a DICOM series ({type(e).__name__}: {e})") from e
    array = np.asarray(array)
    if array.ndim != 3:
        raise VolumeError(f"{folder}: expected one 3D DICOM series, got shape {array.shape}")
    return array, np.asarray(meta["affine"], dtype=np.float64)


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (x fastest, as written) and the RAS affine from the header's space, directions and origin."""
    try:
        array, header = nrrd.read(str(path), index_order="F")
    except Exception as e:  # pynrrd raises several types for corrupt or truncated files
        raise VolumeError(f"{path}: cannot read as NRRD ({type(e).__name__}: {e})") from e
    array = _squeeze(path, np.asarray(array))
    space, directions, origin = header.get("space"), header.get("space directions"), header.get("space origin")
    if space not in NRRD_SPACES or directions is None or origin is None:
        raise VolumeError(f"{path}: no world geometry (NRRD space {space!r}, space directions and space origin are "
                          f"required, with space one of {', '.join(NRRD_SPACES)}); maisi will not guess it")
    directions = np.asarray(directions, dtype=np.float64)
    if directions.shape != (3, 3):
        raise VolumeError(f"{path}: expected 3 spatial NRRD axes in 3D, got space directions {directions.tolist()}")
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = directions.T, np.asarray(origin, dtype=np.float64)  # rows of directions: axes
    return array, np.diag([*NRRD_SPACES[space], 1.0]) @ affine


def to_ras(array: np.ndarray, affine: np.ndarray) -> Volume:
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
    array = cast_for_storage(array, dtype)
    dtype = array.dtype
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, str(tmp))
    return path


def cast_for_storage(array: np.ndarray, dtype: np.dtype | type | str | None = None) -> np.ndarray:
    """The array in the on-disk dtype (default: its own; bool → uint8); floats stored as integers are rounded
    and clipped to the integer type's range rather than wrapped."""
    array = np.asarray(array)
    dtype = np.dtype(dtype or array.dtype)
    if dtype == np.bool_:
        dtype = np.dtype(np.uint8)
    if np.issubdtype(dtype, np.integer) and np.issubdtype(array.dtype, np.floating):
        info = np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    return array.astype(dtype, copy=False)
