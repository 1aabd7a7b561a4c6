"""Clean-up of a generated label map, after the reference's `general_mask_generation_post_process`
(REFERENCE §8): one body, one component per organ, solid tumours, tumours without their host folded back
into it, hepatic vessel drawn as liver. scipy.ndimage does the morphology, each organ within its bounding box."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from maisi.labels import BODY, TUMOR_HOSTS

STRUCTURE = ndimage.generate_binary_structure(3, 3)  # 26-connectivity and 3×3×3 filters, as the reference
LIVER, HEPATIC_VESSEL, AIRWAY, HEART = 1, 25, 132, 115
# Where each tumour goes when it is not the one asked for, or its host is missing (the reference's
# tumor_organ_dict: maisi.labels.TUMOR_HOSTS with the bone lesion folded into the body, not a vertebra).
TUMOR_TO_HOST: dict[int, int] = {**TUMOR_HOSTS, 128: BODY}
HOST_PRESENT: dict[int, tuple[int, ...]] = {23: (28, 29, 30, 31, 32), 24: (4,), 26: (1,), 27: (62,), 128: (BODY,)}
# Organs kept to their largest component: liver, pancreas, gallbladder, stomach, spleen, lung lobes, kidneys,
# duodenum, aorta, IVC, adrenal glands; and, unless a bone lesion is asked for, the reference's range 33..59
# (the vertebrae, trachea and iliac arteries).
ORGANS: tuple[int, ...] = (1, 4, 10, 12, 3, 28, 29, 30, 31, 32, 5, 14, 13, 6, 7, 8, 9)
VERTEBRAE: tuple[int, ...] = tuple(range(33, 60))
INTESTINE: tuple[int, ...] = (12, 13, 19, 62)  # stomach, duodenum, small bowel, colon: one connected tract
LOOSE_BOWEL: tuple[int, ...] = (19, 62)  # small bowel and colon pieces off the tract are dropped
# Tumours that may have several components (the reference keeps all of them).
MULTIFOCAL: tuple[int, ...] = (26, 128)


def _box(mask: np.ndarray, margin: int = 2) -> tuple[slice, ...] | None:
    """The bounding box of `mask` grown by `margin` voxels (clipped), None when the mask is empty."""
    found = ndimage.find_objects(mask.astype(np.uint8))
    if not found:
        return None
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(found[0], mask.shape))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (all of it when it has one or none)."""
    comps, n = ndimage.label(mask, STRUCTURE)
    if n <= 1:
        return mask.astype(bool)
    return comps == 1 + int(np.argmax(np.bincount(comps.ravel())[1:]))


def keep_largest(labels: np.ndarray, ids: tuple[int, ...], fill: int) -> np.ndarray:
    """A copy of `labels` where every other component of each id in `ids` becomes `fill`."""
    out = labels.copy()
    for i in ids:
        box = _box(labels == i, 0)
        if box is None:
            continue
        mask = labels[box] == i
        out[box][mask & ~largest_component(mask)] = fill
    return out


def fill_by_closing(labels: np.ndarray, label: int, holes: bool = False) -> None:
    """Paint `label` over its morphological closing (3×3×3) in place; with `holes`, over enclosed cavities too."""
    box = _box(labels == label)
    if box is None:
        return
    mask = labels[box] == label
    filled = ndimage.binary_closing(mask, STRUCTURE, border_value=0)
    if holes:
        filled = ndimage.binary_fill_holes(filled | mask, STRUCTURE)
    labels[box][filled] = label


def postprocess_mask(labels: np.ndarray, target_tumor: int | None = None) -> np.ndarray:
    """A generated X×Y×Z map of MAISI ids, cleaned up; `target_tumor` is the tumour id that was asked for.

    Steps (the reference's, in its order): the body is the largest component of the eroded foreground,
    dilated back; tumours other than the target become their host organ, and so does the target when its
    host is missing; the target tumour is closed and its holes filled, and kept to its largest component
    (hepatic tumours and bone lesions may have several); every other piece of each organ in ORGANS becomes
    body; small bowel and colon off the largest intestinal tract become body; organs are closed; hepatic
    vessel becomes liver. Then (not in the reference) every organ, the heart too, is kept to its largest piece once
    more, so that the map has one component per organ. Not reproduced: the reference's extra lung-, liver- and
    colon-tumour refinements.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3D label map, got shape {labels.shape}")
    if target_tumor is not None and target_tumor not in TUMOR_TO_HOST:
        raise ValueError(f"target_tumor must be None or one of {sorted(TUMOR_TO_HOST)}, got {target_tumor}")
    v = np.asarray(labels).astype(np.int32)
    vessel, airway = v == HEPATIC_VESSEL, v == AIRWAY

    # one body: the largest component of the eroded foreground, dilated back
    body = ndimage.binary_erosion(v > 0, STRUCTURE, border_value=0)
    v[~ndimage.binary_dilation(largest_component(body), STRUCTURE)] = 0

    # tumours: fold the others (and a target without its host) into their hosts; make the target solid
    for tumor, host in TUMOR_TO_HOST.items():
        if tumor != target_tumor or not np.isin(v, HOST_PRESENT[tumor]).any():
            v[v == tumor] = host
        else:
            fill_by_closing(v, tumor, holes=True)
    if target_tumor is not None and target_tumor not in MULTIFOCAL:
        v = keep_largest(v, (target_tumor,), BODY)
    tumor_mask = v == target_tumor if target_tumor is not None else None

    # organs: one component each (other pieces become body), one intestinal tract, then closed
    organs = ORGANS + (VERTEBRAE if target_tumor != 128 else ())
    v = keep_largest(v, organs, BODY)
    tract = _box(np.isin(v, INTESTINE), 0)
    if tract is not None:
        sub = v[tract]
        sub[np.isin(sub, LOOSE_BOWEL) & ~largest_component(np.isin(sub, INTESTINE))] = BODY
    for organ in organs:
        fill_by_closing(v, organ)

    v[vessel] = LIVER
    v[airway] = AIRWAY
    if tumor_mask is not None:
        v[tumor_mask] = target_tumor
    # Not in the reference: one component per organ at the end. Closing one organ paints over its neighbours and
    # can cut them in two, and hepatic vessel outside the liver becomes liver; the heart is kept whole too.
    return keep_largest(v, organs + (HEART,), BODY).astype(labels.dtype)
