"""Plausibility of a generated label map: connected components per organ and the side of paired organs."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from maisi.maskgen.postprocess import STRUCTURE

# The organs counted (MAISI ids): the abdominal organs, the heart, the aorta and the five lung lobes.
ORGANS: dict[str, int] = {
    "liver": 1, "spleen": 3, "pancreas": 4, "right kidney": 5, "aorta": 6, "gallbladder": 10, "stomach": 12,
    "left kidney": 14, "heart": 115, "left lung upper lobe": 28, "left lung lower lobe": 29,
    "right lung upper lobe": 30, "right lung middle lobe": 31, "right lung lower lobe": 32,
}
# (structure on the patient's right, structure on the patient's left)
PAIRS: tuple[tuple[str, str], ...] = (
    ("liver", "spleen"), ("right kidney", "left kidney"), ("right lung upper lobe", "left lung upper lobe"),
    ("right lung lower lobe", "left lung lower lobe"),
)


def organ_components(label: np.ndarray) -> dict[str, int]:
    """The number of 26-connected components (the post-processing's connectivity) of each organ present."""
    label = np.asarray(label)
    return {name: int(ndimage.label(label == i, STRUCTURE)[1]) for name, i in ORGANS.items() if (label == i).any()}


def sides(label: np.ndarray, affine: np.ndarray) -> dict[str, bool]:
    """For each pair present, whether the right-side structure lies on the patient's right of the left-side one:
    its centroid has the larger world x (RAS+: +x points to the patient's right, as in NIfTI and maisi's phantoms)."""
    label, affine = np.asarray(label), np.asarray(affine, dtype=np.float64)
    out = {}
    for right, left in PAIRS:
        r, lft = label == ORGANS[right], label == ORGANS[left]
        if r.any() and lft.any():
            xr = (affine @ np.append(ndimage.center_of_mass(r), 1.0))[0]
            xl = (affine @ np.append(ndimage.center_of_mass(lft), 1.0))[0]
            out[f"{right} / {left}"] = bool(xr > xl)
    return out
