"""Label conversion into the MAISI vocabulary (by id, by name, TotalSegmentator names, unmapped labels) and
resampling of label maps onto another grid."""

import json

import numpy as np
import pytest

from data_helpers import organ_blocks
from maisi.cli import main
from maisi.data.labelmap import convert_labels, load_mapping, match_name, resample_label
from maisi.data.phantom import make_phantom
from maisi.io.volume import affine_from_spacing, read_volume, spacing_from_affine, write_volume


@pytest.mark.parametrize("name,expected", [
    ("liver", 1), ("kidney_right", 5), ("kidney_left", 14), ("lung_upper_lobe_left", 28),
    ("lung_middle_lobe_right", 31), ("vertebrae_L5", 33), ("vertebrae_C1", 56), ("rib_left_1", 63),
    ("rib_right_12", 86), ("femur_left", 93), ("hip_right", 96), ("urinary_bladder", 15),
    ("iliac_artery_left", 58), ("Spinal Cord", 121), ("pancreas", 4), ("femur", None), ("tumour", None),
])
def test_match_totalsegmentator_names(name, expected):
    assert match_name(name) == expected


def test_convert_by_id_name_and_report_unmapped():
    src = np.array([[[0, 1, 2], [3, 4, 4], [7, 7, 7]]], dtype=np.int16)
    names = {1: "liver", 2: "kidney_right", 3: "my_lesion", 4: "spleen", 7: "something_odd"}
    conv = convert_labels(src, mapping={"3": "hepatic tumor", "spleen": 3}, names=names)
    np.testing.assert_array_equal(conv.label, [[[0, 1, 5], [26, 3, 3], [0, 0, 0]]])
    assert conv.label.dtype == np.uint8
    assert conv.unmapped == {7: 3} and conv.mapped == {1: 1, 2: 5, 3: 26, 4: 3}
    assert "7 (something_odd): 3 voxels" in conv.summary(names)
    with pytest.raises(ValueError, match="something_odd"):
        convert_labels(src, mapping={"3": 26}, names=names, unmapped="error")


@pytest.mark.parametrize("content,match", [
    ({"1": "not an organ"}, "unknown anatomy name"), ({"1": 2}, "not in the MAISI vocabulary"), ({}, "non-empty"),
])
def test_bad_mapping_files(tmp_path, content, match):
    (tmp_path / "m.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        load_mapping(tmp_path / "m.json")


def test_missing_mapping_and_names_files_are_named(tmp_path, capsys):
    from maisi.cli import main
    from maisi.data.labelmap import load_names

    with pytest.raises(FileNotFoundError, match=r"^label mapping not found: .*missing.json$"):
        load_mapping(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match=r"^label names file not found: .*missing.json$"):
        load_names(tmp_path / "missing.json")
    assert main(["prepare", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--label-mapping",
                 str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert f"label mapping not found: {tmp_path / 'missing.json'}" in err and "Errno" not in err


def test_prepare_converts_a_foreign_label_map(tmp_path):
    """A TotalSegmentator-style map (own ids + class table) prepared into MAISI ids via --label-names."""
    ph = make_phantom("abdomen", (32, 32, 24), 8.0, seed=2)
    own = {1: 10, 3: 11, 5: 12, 14: 13, 4: 14}  # MAISI id -> foreign id
    foreign = np.zeros_like(ph.label)
    for m, f in own.items():
        foreign[ph.label == m] = f
    foreign[ph.label == 6] = 99  # aorta, left out of the class table: unmapped -> background
    names = {10: "liver", 11: "spleen", 12: "kidney_right", 13: "kidney_left", 14: "pancreas"}
    (tmp_path / "names.json").write_text(json.dumps({str(k): v for k, v in names.items()}))
    write_volume(tmp_path / "in" / "s_image.nii.gz", ph.image, ph.affine, np.int16)
    write_volume(tmp_path / "in" / "s_label.nii.gz", foreign, ph.affine, np.uint8)
    rc = main(["prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--multiple-of", "8",
               "--label-names", str(tmp_path / "names.json")])
    assert rc == 0
    lab = read_volume(tmp_path / "out" / "s_label.nii.gz").array
    present = set(np.unique(lab).tolist())
    assert {1, 3, 4, 5, 14, 200} <= present and not present & {10, 11, 12, 13, 99, 6}
    rc = main(["prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out2"), "--multiple-of", "8",
               "--label-names", str(tmp_path / "names.json"), "--unmapped", "error"])
    assert rc == 1
    report = json.loads((tmp_path / "out2" / "prepare_report.json").read_text())
    assert "99" in report["failed"]["s"]


def test_resample_keeps_ids_and_physical_extent():
    lab = organ_blocks()
    aff = affine_from_spacing(2.0, lab.shape)
    out, out_aff = resample_label(lab, aff, (40, 40, 40), (1.0, 1.0, 1.0))
    assert set(np.unique(out)) == set(np.unique(lab)) and out.dtype == np.uint8
    assert spacing_from_affine(out_aff) == (1.0, 1.0, 1.0)
    # the liver block is 12 voxels of 2 mm = 24 mm: 24 voxels of 1 mm on the new grid
    assert (out == 1).any(axis=(1, 2)).sum() + (out == 26).any(axis=(1, 2)).sum() >= 24
    assert np.count_nonzero(out == 1) + np.count_nonzero(out == 26) == pytest.approx(8 * 12**3, rel=0.02)
    # same grid: the identity
    same, _ = resample_label(lab, aff, lab.shape, (2.0, 2.0, 2.0))
    np.testing.assert_array_equal(same, lab)


def test_resample_centred_on_source():
    lab = organ_blocks()
    aff = affine_from_spacing(2.0, lab.shape)
    _, out_aff = resample_label(lab, aff, (10, 10, 10), (4.0, 4.0, 4.0))
    centre_in = aff @ np.array([9.5, 9.5, 9.5, 1.0])
    centre_out = out_aff @ np.array([4.5, 4.5, 4.5, 1.0])
    np.testing.assert_allclose(centre_in, centre_out)


@pytest.mark.parametrize("factor", [2, 3])
def test_upsampling_keeps_the_edge_voxels_whole(factor):
    # each source voxel covers ±½ voxel: a 4 mm map filling its grid, on a finer grid of the same extent, fills it
    # too (nearest-neighbour with "constant" edges lost the outer half-voxel: 216 of 512 voxels at 2×)
    lab = np.ones((4, 4, 4), np.uint8)
    out, _ = resample_label(lab, affine_from_spacing(4.0, lab.shape), (4 * factor,) * 3, (4.0 / factor,) * 3)
    assert out.all()
    # a wider output grid: exactly the source's 16 mm extent is labelled, the rest is background
    wide, _ = resample_label(lab, affine_from_spacing(4.0, lab.shape), (12, 12, 12), (2.0, 2.0, 2.0))
    assert wide[:, 6, 6].tolist() == [0, 0] + [1] * 8 + [0, 0] and np.count_nonzero(wide) == 8**3
    # one slice of 4 mm becomes two of 2 mm, not none
    flat, _ = resample_label(np.ones((4, 4, 1), np.uint8), affine_from_spacing(4.0, (4, 4, 1)), (8, 8, 2), (2.0,) * 3)
    assert flat.all()
