"""Patch augmentations: MONAI random transforms, named presets, re-seeded per sample so each draw is reproducible."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai import transforms as mt


@dataclass(frozen=True)
class Augment:
    """What happens to a training patch (C×X×Y×Z in [0, 1]); each part is off at probability 0."""

    flip_prob: float = 0.0  # per axis
    affine_prob: float = 0.0  # one small rotation (±rotate rad per axis) and scaling (±scale) together
    rotate: float = 0.1
    scale: float = 0.1
    intensity_prob: float = 0.0  # intensity scale (±10 %) and shift (±0.05), each with this probability

    def __post_init__(self) -> None:
        for k in ("flip_prob", "affine_prob", "intensity_prob"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"{k} must be in [0, 1], got {getattr(self, k)}")

    @property
    def active(self) -> bool:
        return max(self.flip_prob, self.affine_prob, self.intensity_prob) > 0


AUGMENTS: dict[str, Augment] = {
    "none": Augment(),
    "flip": Augment(flip_prob=0.5),
    "standard": Augment(flip_prob=0.5, affine_prob=0.5, intensity_prob=0.5),
}


def augment_transform(augment: Augment) -> mt.Compose:
    """The MONAI chain of `augment`: flips, then affine (trilinear, border padding), then intensity, clipped to
    [0, 1]. Call `.set_random_state(seed)` before each patch to make its draw a function of that seed."""
    steps: list[mt.Transform] = []
    if augment.flip_prob > 0:
        steps += [mt.RandFlip(prob=augment.flip_prob, spatial_axis=a) for a in range(3)]
    if augment.affine_prob > 0:
        steps.append(mt.RandAffine(prob=augment.affine_prob, rotate_range=[augment.rotate] * 3,
                                   scale_range=[augment.scale] * 3, mode="bilinear", padding_mode="border"))
    if augment.intensity_prob > 0:
        steps += [mt.RandScaleIntensity(factors=0.1, prob=augment.intensity_prob),
                  mt.RandShiftIntensity(offsets=0.05, prob=augment.intensity_prob),
                  mt.ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True)]  # clip
    steps.append(mt.EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False))
    return mt.Compose(steps)
