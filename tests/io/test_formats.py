"""Output formats: each file is read back by an independent reader (nibabel, pynrrd, pydicom with the geometry
computed here from the tags, highdicom for SEG) and by maisi's own reader; geometry to 1e-4 mm, HU exactly."""

from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage

from maisi.io import formats
from maisi.io.formats import (
    IMAGE_EXTS,
    LABEL_EXTS,
    DicomIds,
    OutputFormatError,
    check_output_exts,
    read_label,
    write_image,
    write_label,
)
from maisi.io.volume import read_volume

TOL = 1e-4  # mm
AFFINES = {  # anisotropic, non-zero origin, each with at least one flipped axis
    "flip-x": [[-0.7, 0, 0, 12.5], [0, 1.1, 0, -30.25], [0, 0, 2.5, 101.0]],
    "flip-z-permuted": [[0, 0.8, 0, -40.0], [0, 0, 1.3, 7.75], [-2.0, 0, 0, 55.5]],
    "oblique": [[0.9 * np.cos(0.5), -1.2 * np.sin(0.5), 0, 3.0], [0.9 * np.sin(0.5), 1.2 * np.cos(0.5), 0, -8.0],
                [0, 0, -1.5, 20.0]],
}
SHAPE = (7, 5, 4)


def _affine(name: str) -> np.ndarray:
    return np.vstack([np.asarray(AFFINES[name], dtype=np.float64), [0, 0, 0, 1]])


def _hu() -> np.ndarray:
    hu = np.random.default_rng(0).integers(-1024, 3072, SHAPE).astype(np.int16)
    hu[0, 0, 0], hu[-1, -1, -1] = -32768, 32767  # the int16 extremes survive too
    return hu


def _label() -> np.ndarray:
    label = np.random.default_rng(1).choice(np.array([0, 1, 3, 14, 200], np.uint8), SHAPE)
    label[:, :, -1] = 0  # an empty last slice must keep its place in the grid
    return label


def _canonical(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """nibabel's RAS re-orientation: the oracle for maisi's readers, which return RAS volumes."""
    return nib.as_closest_canonical(nib.Nifti1Image(array, affine))


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    array, header = nrrd.read(str(path), index_order="F")
    assert header["space"] == "left-posterior-superior"
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = np.asarray(header["space directions"]).T, header["space origin"]
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray, list[pydicom.Dataset]]:
    """Voxels in HU and the RAS affine, from pydicom and the standard's image-plane tags alone."""
    slices = sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda d: int(d.InstanceNumber))
    first = slices[0]
    row, col = np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float)
    dr, dc = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    positions = np.asarray([d.ImagePositionPatient for d in slices], dtype=np.float64)
    steps = np.diff(positions, axis=0)
    np.testing.assert_allclose(steps, np.broadcast_to(steps[0], steps.shape), atol=TOL)  # evenly spaced
    assert float(first.SliceThickness) == pytest.approx(np.linalg.norm(steps[0]), abs=TOL)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * dc, col * dr, steps[0], positions[0]
    for d in slices:
        assert d.pixel_array.dtype == np.int16
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices], axis=-1)
    return hu.transpose(1, 0, 2), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, slices


def _read_independently(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if path.is_dir():
        return _read_dicom_series(path)[:2]
    if path.suffix == ".nrrd":
        return _read_nrrd(path)
    if path.suffix == ".dcm":  # a SEG: highdicom's volume maps (slice, row, column) to LPS
        vol = hd.seg.segread(path).get_volume(combine_segments=True, relabel=False)
        return vol.array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine


@pytest.mark.parametrize("affine_name", list(AFFINES))
@pytest.mark.parametrize("ext", IMAGE_EXTS)
def test_image_round_trip(tmp_path, ext, affine_name):
    hu, affine = _hu(), _affine(affine_name)
    path = write_image(tmp_path / f"image{ext}", hu.astype(np.float32) + 0.2, affine)  # rounded to int16 HU
    array, got = _read_independently(path)  # the axes as written (DICOM: int16 checked per slice, then HU)
    assert ext == ".dcm" or array.dtype == np.int16
    np.testing.assert_allclose(got, affine, atol=TOL)
    np.testing.assert_array_equal(array, hu)
    ras, vol = _canonical(hu, affine), read_volume(path)
    np.testing.assert_allclose(vol.affine, ras.affine, atol=TOL)
    np.testing.assert_array_equal(vol.array, np.asanyarray(ras.dataobj))


def test_dicom_series_tags(tmp_path):
    ids = DicomIds.new()
    _, _, slices = _read_dicom_series(write_image(tmp_path / "ct.dcm", _hu(), _affine("flip-x"), ids))
    assert len(slices) == SHAPE[2] and len({d.SOPInstanceUID for d in slices}) == SHAPE[2]
    for d in slices:
        assert (d.SOPClassUID, d.Modality, d.file_meta.MediaStorageSOPClassUID) == (CTImageStorage, "CT", CTImageStorage)
        assert (d.StudyInstanceUID, d.SeriesInstanceUID, d.FrameOfReferenceUID) == \
               (ids.study, ids.series, ids.frame_of_reference)
        assert (d.Rows, d.Columns, d.BitsStored, d.PixelRepresentation) == (SHAPE[1], SHAPE[0], 16, 1)
        assert "synthetic" in d.ImageComments.lower() and "SYNTHETIC" in d.PatientID
    other = pydicom.dcmread(next((write_image(tmp_path / "b.dcm", _hu(), _affine("flip-x"))).iterdir()))
    assert other.SeriesInstanceUID != ids.series and other.StudyInstanceUID != ids.study  # new UIDs per write


@pytest.mark.parametrize("ext", LABEL_EXTS)
def test_label_round_trip(tmp_path, ext):
    label, affine = _label(), _affine("flip-z-permuted")
    path = write_label(tmp_path / f"label{ext}", label, affine)
    array, got = _read_independently(path)
    ras = _canonical(label, affine)
    if ext == ".dcm":  # highdicom orders slices by position: compare in RAS
        got_ras = _canonical(array, got)
        np.testing.assert_allclose(got_ras.affine, ras.affine, atol=TOL)
        np.testing.assert_array_equal(np.asanyarray(got_ras.dataobj), np.asanyarray(ras.dataobj))
    else:
        assert array.dtype == np.uint8
        np.testing.assert_allclose(got, affine, atol=TOL)
        np.testing.assert_array_equal(array, label)
    vol = read_label(path)
    np.testing.assert_allclose(vol.affine, ras.affine, atol=TOL)
    np.testing.assert_array_equal(vol.array, np.asanyarray(ras.dataobj))


def test_seg_refers_to_the_image_series_of_the_same_ids(tmp_path):
    ids, affine = DicomIds.new(), _affine("oblique")
    series = write_image(tmp_path / "image.dcm", _hu(), affine, ids)
    seg = pydicom.dcmread(write_label(tmp_path / "label.dcm", _label(), affine, ids))
    assert (seg.Modality, seg.SegmentationType) == ("SEG", "LABELMAP")
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (ids.study, ids.frame_of_reference)
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == ids.series and seg.SeriesInstanceUID != ids.series
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == \
           {pydicom.dcmread(p).SOPInstanceUID for p in series.iterdir()}
    names = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert names[1] == "liver" and names[200] == "body"


@pytest.mark.parametrize("image_ext, label_ext, field", [
    (".png", ".nii.gz", "image_output_ext"),
    ("nrrd", ".nii.gz", "image_output_ext"),  # the NIM's names, with the dot
    (".NII.GZ", ".nii.gz", "image_output_ext"),
    (".nii.gz", ".mha", "label_output_ext"),
    (".dcm", "", "label_output_ext"),
    (".nii", None, "label_output_ext"),
])
def test_bad_extensions_are_refused_naming_the_field(image_ext, label_ext, field):
    with pytest.raises(OutputFormatError, match=rf"^{field} .*; use one of \.nii\.gz, \.nii, \.nrrd, \.dcm$") as e:
        check_output_exts(image_ext, label_ext)
    assert isinstance(e.value, ValueError) and e.value.field == field


@pytest.mark.parametrize("image_ext", IMAGE_EXTS)
@pytest.mark.parametrize("label_ext", LABEL_EXTS)
def test_every_nim_pair_is_accepted(image_ext, label_ext):
    assert check_output_exts(image_ext, label_ext) == (image_ext, label_ext)


def test_writers_refuse_what_they_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="must end in one of"):
        write_image(tmp_path / "x.mha", _hu(), np.eye(4))
    with pytest.raises(ValueError, match="whole ids from 0 to 255"):
        write_label(tmp_path / "x.nii.gz", np.full(SHAPE, 300), np.eye(4))
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="orthogonal"):
        write_image(tmp_path / "x.dcm", _hu(), sheared)
    assert list(tmp_path.iterdir()) == []


def _dies_after(n: int, path_arg: int):
    """A serializer that writes n files, starts one more, then the process is interrupted."""
    calls = []

    def serializer(*args, **kwargs):
        calls.append(args[path_arg])
        Path(args[path_arg]).write_bytes(b"DICM half a file")
        if len(calls) > n:
            raise KeyboardInterrupt

    return serializer


@pytest.mark.parametrize("ext, kind, obj, name, path_arg, n", [
    (".dcm", "image", pydicom.Dataset, "save_as", 1, 2),  # midway through the series
    (".dcm", "label", pydicom.Dataset, "save_as", 1, 0),  # the SEG file
    (".nrrd", "image", nrrd, "write", 0, 0),
    (".nii.gz", "label", nib, "save", 1, 0),
])
def test_a_failing_write_leaves_no_partial_output(tmp_path, monkeypatch, ext, kind, obj, name, path_arg, n):
    write = {"image": write_image, "label": write_label}[kind]
    data = {"image": _hu(), "label": _label()}[kind]
    target = tmp_path / f"out{ext}"
    with monkeypatch.context() as m:
        m.setattr(obj, name, _dies_after(n, path_arg))
        with pytest.raises(KeyboardInterrupt):
            write(target, data, _affine("flip-x"))
    assert list(tmp_path.iterdir()) == []  # no target, no temporary file or folder
    write(target, data, _affine("flip-x"))
    before = {p.name: p.read_bytes() for p in sorted(target.iterdir())} if target.is_dir() else target.read_bytes()
    with monkeypatch.context() as m:  # a failing rewrite keeps the previous output whole
        m.setattr(obj, name, _dies_after(n, path_arg))
        with pytest.raises(KeyboardInterrupt):
            write(target, data, _affine("oblique"))
    after = {p.name: p.read_bytes() for p in sorted(target.iterdir())} if target.is_dir() else target.read_bytes()
    assert after == before and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_series_replaces_old_series_and_keeps_the_umask(tmp_path):
    old_mask = os.umask(0o027)
    try:
        target = write_image(tmp_path / "ct.dcm", _hu()[:, :, :3], _affine("flip-x"))
        (tmp_path / f".ct.dcm.{2**22 + 7}-abcd_123.tmp").mkdir()  # a killed writer's folder, an hour old
        os.utime(tmp_path / f".ct.dcm.{2**22 + 7}-abcd_123.tmp", (0, 0))
        write_image(target, _hu(), _affine("flip-x"))
    finally:
        os.umask(old_mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.dcm"]
    assert len(list(target.iterdir())) == SHAPE[2]  # the 3-slice series is gone, not mixed in
    assert target.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in target.iterdir()} == {0o640}


def test_the_format_comes_from_the_name():
    assert formats.output_ext("a/b.NII.GZ") == ".nii.gz" and formats.output_ext("b.nii") == ".nii"


def test_nrrd_without_world_geometry_is_refused(tmp_path):
    """NRRD readers would take such a file as 1 mm at the origin; maisi refuses it, as it does for NIfTI."""
    nrrd.write(str(tmp_path / "bare.nrrd"), np.zeros(SHAPE, np.int16))
    with pytest.raises(ValueError, match="no world geometry"):
        read_volume(tmp_path / "bare.nrrd")
