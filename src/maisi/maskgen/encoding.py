"""Label maps in and out of the mask autoencoder: MAISI ids ↔ the 125 class indices of
label_dict_124_to_132.json, 8 bit planes in, argmax of the class logits out (REFERENCE §8)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from maisi.config import BITS, NUM_CLASSES
from maisi.networks.controlnet import mask_to_bit_planes

REMAP_FILE = "label_dict_124_to_132.json"


@lru_cache(maxsize=1)
def index_to_label() -> torch.Tensor:
    """Lookup table: class index 0..124 → MAISI id (122 → 129 kidney mass, 123 → 132 airway, 124 → 200 body)."""
    pairs = json.loads(resources.files("maisi.resources").joinpath(REMAP_FILE).read_text()).values()
    table = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
    for index, label in pairs:
        table[int(index)] = int(label)
    if (table < 0).any():
        raise ValueError(f"{REMAP_FILE} does not map every class index 0..{NUM_CLASSES - 1}")
    return table


@lru_cache(maxsize=1)
def label_to_index() -> torch.Tensor:
    """Lookup table: MAISI id 0..255 → class index, −1 for ids outside the mask model's vocabulary."""
    table = torch.full((2**BITS,), -1, dtype=torch.long)
    table[index_to_label()] = torch.arange(NUM_CLASSES)
    return table


def to_class_index(label_map: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A map of MAISI ids → the same map in class indices; ids the mask model does not know raise."""
    ids = torch.as_tensor(np.asarray(label_map) if isinstance(label_map, np.ndarray) else label_map).long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= 2**BITS):
        raise ValueError(f"label_map: ids must be in 0..{2**BITS - 1}, got {int(ids.min())}..{int(ids.max())}")
    index = label_to_index().to(ids.device)[ids]
    if (index < 0).any():
        unknown = sorted({int(i) for i in ids[index < 0].unique()})
        raise ValueError(f"label_map: ids {unknown} are not in the mask model's vocabulary ({REMAP_FILE})")
    return index


def encode_label_map(label_map: torch.Tensor | np.ndarray) -> torch.Tensor:
    """N×1×spatial map of MAISI ids → N×8×spatial float bit planes of the class indices (plane k = bit k,
    as the reference's `binarize_labels`), the mask autoencoder's input."""
    return mask_to_bit_planes(to_class_index(label_map), bits=BITS)


def decode_logits(logits: torch.Tensor) -> torch.Tensor:
    """N×125×spatial class logits → N×1×spatial MAISI ids (uint8: 0..200) by argmax, then the remap."""
    if logits.ndim < 3 or logits.shape[1] != NUM_CLASSES:
        raise ValueError(f"logits must be N×{NUM_CLASSES}×spatial, got {tuple(logits.shape)}")
    return index_to_labels(logits.argmax(dim=1, keepdim=True))  # softmax first, as the reference does, changes nothing


def index_to_labels(index: torch.Tensor) -> torch.Tensor:
    """Class indices (0..124, any shape) → MAISI ids (uint8: 0..200), label_dict_124_to_132.json's remap."""
    if index.numel() and (index.min() < 0 or index.max() >= NUM_CLASSES):
        raise ValueError(f"class indices must be in 0..{NUM_CLASSES - 1}, got {int(index.min())}..{int(index.max())}")
    return index_to_label().to(index.device)[index.long()].to(torch.uint8)
