"""Post-processing of generated label maps on hand-made maps: one piece per organ, tumours with their host,
solid tumours, hepatic vessel as liver, one body."""

import numpy as np
import pytest

from maisi.labels import BODY
from maisi.maskgen.checks import organ_components
from maisi.maskgen.postprocess import largest_component, postprocess_mask


def body(shape=(24, 24, 24)) -> np.ndarray:
    """A body block (200) with a margin of background around it."""
    v = np.zeros(shape, np.uint8)
    v[2:-2, 2:-2, 2:-2] = BODY
    return v


def test_a_split_organ_keeps_its_largest_piece_and_the_rest_becomes_body():
    v = body()
    v[4:12, 4:12, 4:12] = 1  # liver, 512 voxels
    v[16:19, 16:19, 16:19] = 1  # a stray piece, 27 voxels
    out = postprocess_mask(v)
    assert (out[4:12, 4:12, 4:12] == 1).all()
    assert (out[16:19, 16:19, 16:19] == BODY).all()
    assert out.dtype == np.uint8


def test_a_tumour_without_its_host_becomes_the_host():
    v = body()
    v[8:12, 8:12, 8:12] = 26  # a hepatic tumour, no liver anywhere
    out = postprocess_mask(v, target_tumor=26)
    assert (out[8:12, 8:12, 8:12] == 1).all() and not (out == 26).any()


def test_a_tumour_that_was_not_asked_for_becomes_its_host_organ():
    v = body()
    v[4:14, 4:14, 4:14] = 4  # pancreas
    v[7:10, 7:10, 7:10] = 24  # a pancreatic tumour nobody asked for
    out = postprocess_mask(v, target_tumor=None)
    assert (out[4:14, 4:14, 4:14] == 4).all()


def test_the_asked_for_tumour_keeps_its_place_and_its_hole_is_filled():
    v = body()
    v[4:18, 4:18, 4:18] = 1  # liver
    v[7:14, 7:14, 7:14] = 26  # hepatic tumour with a one-voxel hole of liver inside
    v[10, 10, 10] = 1
    out = postprocess_mask(v, target_tumor=26)
    assert (out[7:14, 7:14, 7:14] == 26).all()
    assert out[5, 5, 5] == 1


def test_the_asked_for_tumour_keeps_only_its_largest_piece():
    v = body()
    v[4:18, 4:18, 4:18] = 62  # colon
    v[5:9, 5:9, 5:9] = 27  # the primary, 64 voxels
    v[14:16, 14:16, 14:16] = 27  # a satellite, 8 voxels
    out = postprocess_mask(v, target_tumor=27)
    assert (out[5:9, 5:9, 5:9] == 27).all() and (out[14:16, 14:16, 14:16] == BODY).all()


def test_hepatic_vessel_becomes_liver_and_stray_body_is_dropped():
    v = body()
    v[4:12, 4:12, 4:12] = 1
    v[6:8, 6:8, 6:8] = 25
    v[0, 0, 0:3] = BODY  # a speck of foreground off the body
    out = postprocess_mask(v)
    assert (out[4:12, 4:12, 4:12] == 1).all()
    assert not (out[0, 0, 0:3]).any()


def test_a_small_bowel_piece_off_the_intestinal_tract_becomes_body():
    v = body()
    v[4:10, 4:10, 4:20] = 12  # stomach
    v[10:14, 4:10, 4:20] = 62  # colon touching it: one tract
    v[18:21, 18:21, 18:21] = 19  # small bowel far away
    out = postprocess_mask(v)
    assert (out[10:14, 4:10, 4:20] == 62).all() and (out[18:21, 18:21, 18:21] == BODY).all()


def test_largest_component_uses_26_connectivity():
    m = np.zeros((5, 5, 5), bool)
    m[1, 1, 1] = m[2, 2, 2] = True  # touching at a corner: one component
    m[4, 4, 4] = False
    assert largest_component(m).sum() == 2


@pytest.mark.parametrize("labels,tumor,message", [
    (np.zeros((4, 4)), None, "3D label map"),
    (np.zeros((4, 4, 4), np.uint8), 25, "target_tumor must be None or one of"),
])
def test_bad_inputs_are_refused(labels, tumor, message):
    with pytest.raises(ValueError, match=message):
        postprocess_mask(labels, target_tumor=tumor)


def test_every_organ_and_the_heart_end_in_one_piece():
    v = body()
    v[4:12, 4:12, 4:12] = 115  # heart: not in the reference's list ...
    v[16:19, 16:19, 16:19] = 115  # ... but a second piece of it becomes body
    v[2:6, 16:20, 2:6] = 1  # liver
    v[18:20, 2:4, 18:20] = 25  # hepatic vessel far from the liver: liver after the clean-up, then dropped
    out = postprocess_mask(v)
    assert organ_components(out) == {"heart": 1, "liver": 1}
    assert (out[16:19, 16:19, 16:19] == BODY).all() and (out[18:20, 2:4, 18:20] == BODY).all()
