"""Phantoms: determinism, geometry, organ HU within the reference's quality ranges, region agreement."""

import numpy as np
import pytest
from scipy import ndimage

from maisi.cli import main
from maisi.data.phantom import TUMORS, make_phantom, write_phantom
from maisi.data.regions import parse_span, region_from_label
from maisi.io.volume import read_volume
from maisi.labels import hu_quality_ranges

GROUPS = {  # organ group of hu_quality_ranges -> MAISI ids
    "liver": (1,), "spleen": (3,), "pancreas": (4,), "kidney": (5, 14), "lung": (28, 29, 30, 31, 32),
    "bone": tuple(range(33, 57)) + tuple(range(63, 87)) + (93, 94, 95, 96, 120), "brain": (22,),
}
CASES = [  # region, size, spacing, ids that must be present
    ("head_neck", (48, 48, 48), (5.0, 5.0, 5.0), (22, 120, 200)),
    ("chest", (48, 48, 40), (6.0, 6.0, 5.0), (28, 29, 30, 31, 32, 115, 6, 132, 200) + tuple(range(66, 70))),
    ("abdomen", (48, 48, 40), (7.0, 7.0, 5.0), (1, 3, 4, 5, 14, 12, 6, 35, 36, 200)),
    ("pelvis", (48, 48, 48), (7.0, 7.0, 5.0), (15, 93, 94, 95, 96, 200)),
    ("chest-abdomen", (40, 40, 64), (8.0, 8.0, 7.0), (1, 3, 28, 32, 115, 200)),
]


@pytest.fixture(scope="module")
def phantoms():
    return {c[0]: make_phantom(c[0], c[1], c[2], seed=3) for c in CASES}


@pytest.mark.parametrize("region,size,spacing,ids", CASES)
def test_geometry_organs_and_region(phantoms, region, size, spacing, ids):
    ph = phantoms[region]
    assert ph.image.shape == size and ph.label.shape == size
    assert ph.image.dtype == np.float32 and ph.label.dtype == np.uint8
    np.testing.assert_allclose(np.diag(ph.affine)[:3], spacing)
    assert ph.spacing == pytest.approx(spacing)
    present = set(np.unique(ph.label).tolist())
    assert set(ids) <= present, f"missing {sorted(set(ids) - present)}"
    assert region_from_label(ph.label) == parse_span(region) == (ph.top_region_index, ph.bottom_region_index)
    assert ph.image[ph.label == 0].mean() < -950  # outside air
    ranges = hu_quality_ranges()
    for group, gids in GROUPS.items():
        m = np.isin(ph.label, gids)
        if m.sum() >= 20:
            lo, hi = ranges[group]
            assert lo <= float(np.median(ph.image[m])) <= hi, group


def test_deterministic_per_seed_and_varies_across_seeds():
    a = make_phantom("abdomen", (32, 32, 24), 8.0, seed=5)
    b = make_phantom("abdomen", (32, 32, 24), 8.0, seed=5)
    c = make_phantom("abdomen", (32, 32, 24), 8.0, seed=6)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert (a.label != c.label).mean() > 0.01
    assert not np.array_equal(a.image, c.image)


def test_field_of_view_follows_spacing():
    fine = make_phantom("chest", (48, 48, 32), 6.0, seed=1, noise=False)
    coarse = make_phantom("chest", (24, 24, 16), 12.0, seed=1, noise=False)
    # Same physical field of view: the body covers the same fraction of an axial mid-slice.
    f_fine = (fine.label[:, :, 16] > 0).mean()
    f_coarse = (coarse.label[:, :, 8] > 0).mean()
    assert abs(f_fine - f_coarse) < 0.08


@pytest.mark.parametrize("tumor,tid,host", [("lung_tumor", 23, (28, 29, 30, 31, 32)), ("hepatic tumor", 26, (1,)),
                                            ("pancreatic_tumor", 24, (4,)), ("bone_lesion", 128, tuple(range(33, 57)))])
def test_tumours_sit_inside_their_host(tumor, tid, host):
    region = "chest" if tid == 23 else "abdomen"
    plain = make_phantom(region, (40, 40, 32), 6.0, seed=2, noise=False)
    ph = make_phantom(region, (40, 40, 32), 6.0, seed=2, tumors=[tumor], noise=False)
    m = ph.label == tid
    assert m.sum() > 0
    assert np.isin(plain.label[m], host).all()  # painted only over host voxels


def test_tumour_radius_range_sets_the_tumour_size():
    def volumes(radius):
        return [int((make_phantom("abdomen", (48, 48, 40), 5.0, seed=s, tumors=["hepatic_tumor"], noise=False,
                                  tumor_radius_mm=radius).label == 26).sum()) for s in range(4)]

    small, large = volumes((6.0, 8.0)), volumes((30.0, 36.0))
    assert all(v > 0 for v in small)
    assert min(large) > 4 * max(small)
    # the default keeps the type's own range, drawn from the same random numbers as before
    default = make_phantom("abdomen", (48, 48, 40), 5.0, seed=1, tumors=["hepatic_tumor"], noise=False)
    same = make_phantom("abdomen", (48, 48, 40), 5.0, seed=1, tumors=["hepatic_tumor"], noise=False,
                        tumor_radius_mm=TUMORS[26][2])
    np.testing.assert_array_equal(default.label, same.label)


def test_organ_scale_sets_the_organ_size_and_leaves_the_rest_of_the_phantom():
    def label(seed, scale=None):
        return make_phantom("abdomen", (48, 48, 40), 5.0, seed=seed, noise=False,
                            organ_scale=None if scale is None else {"liver": scale}).label

    for seed in range(2):
        small, large, default = label(seed, (0.75, 0.75)), label(seed, (1.3, 1.3)), label(seed)
        assert (large == 1).sum() > 3 * (small == 1).sum() > 0
        # the factors have their own random stream: away from the liver and its vessels nothing moved
        elsewhere = ~np.isin(small, (1, 25)) & ~np.isin(large, (1, 25))
        np.testing.assert_array_equal(small[elsewhere], large[elsewhere])
        # a scaled liver stays inside the muscle wall, which the default liver reaches into
        wall = ndimage.binary_dilation(default == 0, iterations=3)
        assert ((large == 1) & wall).sum() == 0 < ((default == 1) & wall).sum()
    # a range draws a factor per seed, the same with other organs scaled too
    drawn = [(label(s, (0.75, 1.3)) == 1).sum() for s in range(4)]
    assert len(set(drawn)) == 4
    both = make_phantom("abdomen", (48, 48, 40), 5.0, seed=3, noise=False,
                        organ_scale={"liver": (0.75, 1.3), "stomach": (1.2, 1.2)}).label
    assert (both == 1).sum() == drawn[3]


@pytest.mark.parametrize("kwargs,match", [
    ({"organ_scale": {"brain": (1.0, 1.2)}}, "'brain' cannot be scaled"),
    ({"organ_scale": {"livr": (1.0, 1.2)}}, "'livr' cannot be scaled.*did you mean 'liver'"),
    ({"organ_scale": {"liver": (1.2, 1.0)}}, r"organ_scale\['liver'\]"),
    ({"organ_scale": {"liver": (0.2, 1.0)}}, "0.5 <= min <= max <= 2.0"),
    ({"tumors": ["hepatic_tumor"], "region": "abdomen", "tumor_radius_mm": (10.0, 5.0)}, "tumor_radius_mm"),
    ({"tumors": ["hepatic_tumor"], "region": "abdomen", "tumor_radius_mm": (0.0, 5.0)}, "tumor_radius_mm"),
    ({"region": "thorax-legs"}, "unknown body region"), ({"region": "pelvis-chest"}, "top region first"),
    ({"size": (4, 32, 32)}, "size"), ({"spacing": (0.0, 1, 1)}, "spacing"),
    ({"tumors": ["liver"]}, "not supported"), ({"region": "head_neck", "tumors": ["hepatic_tumor"]}, "host organ"),
])
def test_bad_arguments(kwargs, match):
    args = {"region": "chest", "size": (16, 16, 16), "spacing": 8.0} | kwargs
    with pytest.raises(ValueError, match=match):
        make_phantom(**args)


def test_written_files_round_trip(tmp_path):
    ph = make_phantom("pelvis", (24, 24, 20), 10.0, seed=0)
    entry = write_phantom(ph, tmp_path, "p0")
    img, lab = read_volume(tmp_path / entry["image"]), read_volume(tmp_path / entry["label"])
    assert img.array.dtype == np.int16 and lab.array.dtype == np.uint8
    np.testing.assert_allclose(img.affine, ph.affine)
    np.testing.assert_array_equal(lab.array, ph.label)
    assert np.abs(img.array - ph.image).max() <= 0.5
    assert entry["dim"] == [24, 24, 20] and entry["bottom_region_index"] == [0, 0, 0, 1]


def test_large_field_of_view_keeps_the_requested_region_unless_asked_not_to():
    strict = make_phantom("chest", (24, 24, 40), (16.0, 16.0, 16.0), seed=0, noise=False)  # 640 mm along z
    assert strict.region == "chest" and region_from_label(strict.label) == (1, 1)
    loose = make_phantom("chest", (24, 24, 40), (16.0, 16.0, 16.0), seed=0, noise=False, exclusive=False)
    assert loose.region != "chest" and region_from_label(loose.label) == (loose.top_region_index,
                                                                         loose.bottom_region_index)
    # Same anatomy, only marker labels differ: foreign organs are labelled body in the strict phantom.
    differ = strict.label != loose.label
    assert differ.any() and (strict.label[differ] == 200).all()
    np.testing.assert_array_equal(strict.image, loose.image)


def test_sizes_whose_extent_rounds_badly():
    """Regression: 192 slices at 1.5 mm once lost the last slice to floating-point rounding."""
    ph = make_phantom("chest", (16, 16, 192), 1.5, seed=0, noise=False)
    assert ph.label.shape == (16, 16, 192)


def test_span_needs_a_long_enough_field_of_view():
    with pytest.raises(ValueError, match="needs at least"):
        make_phantom("chest-pelvis", (32, 32, 32), 6.0)  # 192 mm cannot show lungs and femurs
    ph = make_phantom("chest-pelvis", (32, 32, 48), (12.0, 12.0, 8.0), seed=1, noise=False)
    assert region_from_label(ph.label) == (1, 3)


def test_cli_writes_phantoms_previews_and_a_growing_datalist(tmp_path, capsys):
    import json

    from maisi.cli import main

    args = ["phantom", "--region", "abdomen", "--size", "24", "24", "16", "--spacing", "10", "--out", str(tmp_path)]
    assert main(args + ["--num", "2", "--preview", "--tumor", "hepatic_tumor"]) == 0
    assert main(args + ["--seed", "7"]) == 0
    entries = json.loads((tmp_path / "datalist.json").read_text())["training"]
    assert [e["seed"] for e in entries] == [0, 1, 7]
    assert all((tmp_path / e["image"]).is_file() and (tmp_path / e["label"]).is_file() for e in entries)
    assert (tmp_path / "phantom_abdomen_s0001_preview.png").is_file()
    assert 26 in set(read_volume(tmp_path / entries[0]["label"]).array.ravel().tolist())
    assert main(args + ["--region", "legs"]) == 2
    assert "unknown body region" in capsys.readouterr().err
    assert main(args + ["--tumor", "hepatic_tumor", "--tumor-radius", "10", "5"]) == 2
    err = capsys.readouterr().err
    assert "--tumor-radius must be (min, max)" in err and "tumor_radius_mm" not in err
    assert main(args + ["--seed", "9", "--organ-scale", "liver=1.3:1.3", "stomach=0.8"]) == 0
    big = read_volume(tmp_path / "phantom_abdomen_s0009_label.nii.gz").array
    assert (big == 1).sum() > (make_phantom("abdomen", (24, 24, 16), 10.0, seed=9).label == 1).sum()
    for bad, says in (("livr=1:1.2", "--organ-scale: 'livr' cannot be scaled"), ("liver=big", "write ORGAN=MIN:MAX"),
                      ("liver=0.2:1", "--organ-scale['liver'] must be")):
        assert main(args + ["--organ-scale", bad]) == 2
        assert says in capsys.readouterr().err


def test_anatomy_sides_follow_ras():
    """RAS+: +x is the patient's right, +y anterior, +z superior (world mm through the affine)."""
    ph = make_phantom("chest-abdomen", (48, 40, 64), (8.0, 8.0, 8.0), seed=0, noise=False)

    def centre(ids):
        ijk = np.argwhere(np.isin(ph.label, ids)).mean(0)
        return (ph.affine @ np.append(ijk, 1.0))[:3]

    assert centre([1])[0] > 0 and centre([5])[0] > 0  # liver, right kidney
    assert centre([3])[0] < 0 and centre([14])[0] < 0 and centre([28, 29])[0] < 0  # spleen, left kidney, left lung
    assert centre([30, 31, 32])[0] > 0
    assert centre([115])[1] > centre(list(range(38, 50)))[1]  # heart in front of the thoracic spine
    assert centre([28, 30])[2] > centre([1])[2] > centre([5, 14])[2]  # lungs above liver above kidneys


def test_cli_refuses_a_bad_output_folder_or_seed_before_any_phantom(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "afile", "the output folder (--out) is an existing file"),
                         (tmp_path / "afile" / "sub", "afile is a file, not a folder")):
        assert main(["phantom", "--out", str(out), "--size", "16"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert main(["phantom", "--out", str(tmp_path / "p"), "--seed", "-5"]) == 2
    assert "--seed must be >= 0, got -5" in capsys.readouterr().err and not (tmp_path / "p").exists()
