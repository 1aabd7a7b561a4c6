"""Plausibility checks of generated maps on hand-made and phantom maps: components per organ, sides."""

import numpy as np

from maisi.data.phantom import make_phantom
from maisi.maskgen.checks import organ_components, sides


def test_a_phantom_has_its_organs_on_the_correct_side_and_a_mirrored_one_not():
    p = make_phantom("chest-abdomen", size=48, spacing=8.0, seed=3)
    assert sides(p.label, p.affine) == {"liver / spleen": True, "right kidney / left kidney": True,
                                        "right lung upper lobe / left lung upper lobe": True,
                                        "right lung lower lobe / left lung lower lobe": True}
    assert not any(sides(p.label[::-1], p.affine).values())  # the same voxels read through the same affine, mirrored


def test_components_are_counted_with_26_connectivity():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[1:4, 1:4, 1:4] = 1  # a liver ...
    lab[4, 4, 4] = 1  # ... touching a voxel at a corner: still one piece
    lab[8:11, 8:11, 8:11] = 1  # a second piece
    lab[1:3, 8:10, 1:3] = 3
    assert organ_components(lab) == {"liver": 2, "spleen": 1}
