"""Volume I/O: NIfTI round trips keep affine and dtype, re-orientation to RAS, DICOM series, bad files."""

import nibabel as nib
import numpy as np
import pytest

from maisi.io.volume import (
    affine_from_spacing,
    check_volume_file,
    read_volume,
    spacing_from_affine,
    write_volume,
)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_nifti_round_trip_keeps_affine_and_dtype(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    array = (rng.random((5, 6, 7)) * 100).astype(dtype)
    affine = affine_from_spacing((0.8, 0.9, 2.5), origin=(-10.0, 20.0, 5.0))
    path = write_volume(tmp_path / f"v{suffix}", array, affine)
    vol = read_volume(path)
    assert vol.array.dtype == dtype
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.affine, affine)
    assert vol.spacing == pytest.approx((0.8, 0.9, 2.5))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_reads_non_ras_file_into_ras(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    # LPS-like storage: x and y flipped, voxel (0,0,0) at the far corner.
    affine = np.diag([-1.0, -2.0, 3.0, 1.0])
    affine[:3, 3] = [3.0, 8.0, 0.0]
    nib.save(nib.Nifti1Image(array, affine), str(tmp_path / "lps.nii.gz"))
    vol = read_volume(tmp_path / "lps.nii.gz")
    np.testing.assert_array_equal(vol.array, array[::-1, ::-1, :])
    assert np.all(np.diag(vol.affine)[:3] > 0)
    # The same physical point maps to the same value before and after.
    world = affine @ np.array([1, 2, 3, 1.0])
    ijk = np.linalg.solve(vol.affine, world)[:3].round().astype(int)
    assert vol.array[tuple(ijk)] == array[1, 2, 3]


def test_affine_from_spacing_centres_volume():
    a = affine_from_spacing(1.5, shape=(171, 171, 100))
    centre = a @ np.array([85, 85, 49.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    assert spacing_from_affine(a) == pytest.approx((1.5, 1.5, 1.5))
    with pytest.raises(ValueError, match="positive"):
        affine_from_spacing((1.0, 0.0, 1.0))


def _write_dicom_series(folder, array, spacing):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series = generate_uid()
    for k in range(array.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series, series
        ds.Rows, ds.Columns = array.shape[1], array.shape[0]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = k + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(array[:, :, k].T).astype(np.int16).tobytes()
        ds.save_as(str(folder / f"{k}.dcm"), enforce_file_format=True)


def test_dicom_series_reads_with_spacing(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(-1000, 1000, size=(6, 5, 4)).astype(np.int16)
    _write_dicom_series(tmp_path / "series", array, (0.7, 0.8, 2.0))
    vol = read_volume(tmp_path / "series")
    assert vol.shape == (6, 5, 4)
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.0))
    # DICOM is LPS: RAS orientation flips x and y.
    np.testing.assert_array_equal(vol.array, array[::-1, ::-1, :])


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x1f\x8b\x08\x00truncated"])
def test_corrupt_nifti_gets_clear_error(tmp_path, content):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot read as NIfTI"):
        read_volume(path)


def test_truncated_nifti_and_other_bad_inputs(tmp_path):
    good = write_volume(tmp_path / "g.nii", np.zeros((8, 8, 8), np.float32), np.eye(4))
    data = good.read_bytes()
    (tmp_path / "t.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read as NIfTI"):
        read_volume(tmp_path / "t.nii")
    with pytest.raises(FileNotFoundError):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "x.png").write_bytes(b"png")
    with pytest.raises(ValueError, match="unsupported volume format"):
        read_volume(tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        read_volume(tmp_path / "empty")
    with pytest.raises(ValueError, match="3D"):
        write_volume(tmp_path / "y.nii", np.zeros((2, 2)), np.eye(4))


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = write_volume(tmp_path / "keep.nii.gz", np.ones((4, 4, 4), np.int16), np.eye(4))
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(OSError):
        write_volume(path, np.zeros((4, 4, 4), np.int16), np.eye(4))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.nii.gz"]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8])
def test_a_cut_integer_nifti_is_refused_by_the_up_front_check(tmp_path, suffix, dtype):
    # integer voxels are not read by the check (no NaN to find), so the size the header promises is compared
    arr = np.random.default_rng(0).integers(0, 100, (40, 40, 40)).astype(dtype)
    good = write_volume(tmp_path / f"g{suffix}", arr, np.eye(4), dtype)
    check_volume_file(good)
    data = good.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(ValueError, match=r"cut.nii(.gz)?: truncated: the header promises [\d,]+ bytes"):
        check_volume_file(cut)


def test_a_gzip_stream_of_several_members_is_complete(tmp_path):
    # its trailer gives only the last member's size: the check then counts the stream rather than refuse it
    import gzip

    arr = np.arange(20 * 20 * 20, dtype=np.int16).reshape(20, 20, 20)
    raw = write_volume(tmp_path / "v.nii", arr, np.eye(4), np.int16).read_bytes()
    half = len(raw) // 2
    (tmp_path / "m.nii.gz").write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    check_volume_file(tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(read_volume(tmp_path / "m.nii.gz").array, arr)


def test_a_folder_of_nifti_files_is_not_taken_for_a_dicom_series(tmp_path):
    write_volume(tmp_path / "f" / "a_label.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4), np.uint8)
    (tmp_path / "f" / "index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"f: a folder is read as one DICOM series, and this one holds volume files"):
        check_volume_file(tmp_path / "f")
